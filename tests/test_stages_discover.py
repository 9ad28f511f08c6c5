"""bnfold.stages.discover: every BN found, with its mode, producer, channels and location."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import bn, bn_params, init, make_model, vi
from onnx import helper

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.records import Mode
from bnfold.stages.discover import BnSite, default_opset, find_bns, name_nodes, training_bn_names

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _sites(model: onnx.ModelProto) -> dict[str, BnSite]:
    index = GraphIndex(model.graph, default_opset(model))
    return {s.info.name: s for s in find_bns(model, index, Constants(index))}


def _conv_bn(rng: np.random.Generator) -> onnx.ModelProto:
    node, inits = bn("bn", "z", "y", bn_params(rng, 4))
    return make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), node], [vi("x", ["N", 3, 5, 5])],
                      [vi("y", ["N", 4, 5, 5])], [init("w", np.ones((4, 3, 1, 1), np.float32))] + inits)


def test_inference_bn_with_its_producer_and_channels(rng: np.random.Generator) -> None:
    (site,) = _sites(_conv_bn(rng)).values()
    info = site.info
    assert (info.name, info.mode, info.producer, info.producer_op, info.channels) == (
        "bn", Mode.INFERENCE, "conv", "Conv", 4)
    assert (info.input, info.output, info.graph_path) == ("z", "y", "")
    assert site.pos == 1 and info.epsilon == np.float32(1e-5)


def test_training_mode_attribute(rng: np.random.Generator) -> None:
    node, inits = bn("bn", "z", "y", bn_params(rng, 4), training_mode=1)
    node.output.extend(["rm", "rv"])
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), node], [vi("x", ["N", 3, 5, 5])],
                       [vi("y", ["N", 4, 5, 5])], [init("w", np.ones((4, 3, 1, 1), np.float32))] + inits,
                       opset=15)
    assert _sites(model)["bn"].info.mode is Mode.TRAINING
    assert training_bn_names(model) == ["bn"]


def test_a_bn_on_a_graph_input_has_no_producer(rng: np.random.Generator) -> None:
    node, inits = bn("bn", "x", "y", bn_params(rng, 3))
    model = make_model([node], [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])], inits)
    info = _sites(model)["bn"].info
    assert info.producer is None and info.producer_op is None and info.channels == 3


def test_decomposed_track_running_stats_false_pattern() -> None:
    """The sample exported from torch with track_running_stats=False: every BN normalises with
    statistics the graph computes from the BN's own input (ReduceMean/Sub/Mul) -- a training BN."""
    model = onnx.load(str(SAMPLES / "resnet_trs.onnx"))
    sites = _sites(model)
    decomposed = sorted(n for n, s in sites.items() if s.info.mode is Mode.DECOMPOSED)
    assert len(sites) == 9 and len(decomposed) == 8  # the ninth is an ordinary inference BN
    assert sorted(training_bn_names(model)) == decomposed
    # the stored-statistics sample, by contrast, is all inference
    plain = onnx.load(str(SAMPLES / "unfoldable.onnx"))
    assert {s.info.mode for s in _sites(plain).values()} == {Mode.INFERENCE} and training_bn_names(plain) == []


def test_bn_inside_a_subgraph_is_listed_with_its_path(rng: np.random.Generator) -> None:
    node, inits = bn("inner", "x", "t", bn_params(rng, 3))
    then_g = helper.make_graph([node], "then", [], [vi("t", ["N", 3, 4, 4])], initializer=inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", ["N", 3, 4, 4])])
    model = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                       [vi("x", ["N", 3, 4, 4]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", ["N", 3, 4, 4])])
    sites = list(_sites(model).values())
    assert len(sites) == 1
    (site,) = sites
    assert site.pos is None and "if" in site.info.graph_path and "inner" in site.info.name


def test_unnamed_and_duplicate_nodes_get_unique_names(rng: np.random.Generator) -> None:
    model = _conv_bn(rng)
    model.graph.node[0].name = ""
    model.graph.node[1].name = ""
    before = [n.name for n in model.graph.node]
    assert name_nodes(model.graph) is True
    after = [n.name for n in model.graph.node]
    assert all(after) and len(set(after)) == len(after) and after != before
    assert name_nodes(model.graph) is False  # nothing left to rename


def test_duplicate_node_names_are_made_unique(rng: np.random.Generator) -> None:
    model = _conv_bn(rng)
    for node in model.graph.node:
        node.name = "dup"
    assert name_nodes(model.graph) is True
    names = [n.name for n in model.graph.node]
    assert names == ["dup_0", "dup_1"]  # every holder of a shared name gets its position
