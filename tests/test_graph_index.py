"""GraphIndex commit and the paused garbage collector."""
from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
from bnfold.cli.gcpause import paused_gc
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.graph.index import GraphIndex


def _conv_bn_chain(n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, vis = [], [], []
    cur = "x"
    for k in range(n):
        inits += [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), f"w{k}")]
        for p, v in (("s", rng.uniform(0.5, 2, 3)), ("b", rng.standard_normal(3)), ("m", rng.standard_normal(3)),
                     ("v", rng.uniform(0.5, 2, 3))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{k}"))
        nodes.append(helper.make_node("Conv", [cur, f"w{k}"], [f"c{k}"], name=f"conv{k}"))
        nodes.append(helper.make_node("BatchNormalization", [f"c{k}", f"s{k}", f"b{k}", f"m{k}", f"v{k}"],
                                      [f"bn{k}"], name=f"bn{k}"))
        nodes.append(helper.make_node("Relu", [f"bn{k}"], [f"r{k}"], name=f"relu{k}"))
        vis += [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 3, 4, 4]) for t in (f"c{k}", f"bn{k}", f"r{k}")]
        cur = f"r{k}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 3, 4, 4])], inits,
                          value_info=vis)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_drops_exactly_the_dead_names():
    m = _conv_bn_chain(5)
    out = bnfold.fold(m, verify=False).model
    g = out.graph
    assert [n.op_type for n in g.node] == ["Conv", "Relu"] * 5
    produced = {o for n in g.node for o in n.output}
    vi = [v.name for v in g.value_info]
    assert set(vi) <= produced and len(vi) == len(set(vi))
    assert {f"bn{k}" for k in range(5)} <= set(vi)  # the BN outputs live on, now written by the Convs
    assert not any(v.startswith("c") for v in vi)  # the Convs' old outputs are gone
    assert sorted(t.name for t in g.initializer) == sorted([f"w{k}" for k in range(5)] +
                                                            [f"conv{k}.bias_folded" for k in range(5)])
    onnx.checker.check_model(out)


def test_commit_twice_is_refused():
    m = _conv_bn_chain(1)
    idx = GraphIndex(m.graph, 17)
    idx.commit()
    with pytest.raises(RuntimeError, match="build a new one"):
        idx.commit()


def test_remove_node_keeps_reader_counts_right():
    m = _conv_bn_chain(1)
    node = m.graph.node[0]
    node.input.append("w0")  # the Conv reads w0 twice (as weight and, oddly, as bias)
    idx = GraphIndex(m.graph, 17)
    assert idx.use_count("w0") == 2
    idx.remove_node(0)
    assert idx.use_count("w0") == 0 and idx.use_count("x") == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_fold_restores_the_collector_state(enabled):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        bnfold.fold(_conv_bn_chain(2), verify=False)
        assert gc.isenabled() is enabled
        with pytest.raises(ZeroDivisionError), paused_gc():
            assert not gc.isenabled()
            1 / 0
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_fresh_names_never_reuse_a_removed_tensor_name():
    m = _conv_bn_chain(1)
    idx = GraphIndex(m.graph, 17)
    idx.remove_node(1)  # the BN: its output bn0 loses its producer
    idx.set_output(0, 0, "renamed")  # the Conv's old output c0 is orphaned too
    assert idx.fresh_name("bn0") != "bn0" and idx.fresh_name("c0") != "c0"
    assert idx.fresh_name("s0") == "s0_1"  # an initializer's name is taken
    assert idx.fresh_name("brand_new") == "brand_new"
    assert idx.fresh_node_name("conv0") == "conv0_1"


def _fresh_lists(idx: GraphIndex) -> dict[str, list[int]]:
    """Consumer lists computed from scratch from the index's nodes (the reference)."""
    out: dict[str, list[int]] = {}
    for pos, node in enumerate(idx.nodes):
        if pos in idx.removed:
            continue
        for name in node.input:
            if name:
                out.setdefault(name, []).append(pos)
    return out


@pytest.mark.parametrize("build_lists_first", [True, False])
def test_reader_counts_and_consumer_lists_follow_every_mutation(build_lists_first):
    # counts are kept from the start; the consumer lists are built on first use and then kept too
    m = _conv_bn_chain(3)
    idx = GraphIndex(m.graph, 17)
    if build_lists_first:
        assert idx.consumer_nodes("c0") == [1]
    idx.set_input(3, 0, "x")  # conv1 now reads x instead of r0
    idx.set_input(6, 2, "b2")  # conv2 gains a bias slot (slot 1 .. 2 padded)
    idx.remove_node(1)  # bn0
    idx.remove_node(1)  # removing twice changes nothing
    ident = helper.make_node("Identity", ["w0"], ["w0_copy"], name="ident")
    pos = idx.insert_node(0, ident)
    idx.set_output(pos, 0, "w0_alias")
    cut = idx.drop_outputs(7, 0)  # bn2 loses its output
    assert cut == ["bn2"] and idx.node_of("bn2") is None and idx.outs[7] == []
    ref = _fresh_lists(idx)
    for name in {*ref, "r0", "c0", "bn2", "w0", "b2", "x"}:
        assert idx.consumer_nodes(name) == ref.get(name, []), name
        assert idx.readers(name) == len(ref.get(name, [])), name
        assert idx.use_count(name) == len(ref.get(name, [])) + (name in idx.graph_outputs)
    for p, node in enumerate(idx.nodes):  # the cached name lists match the protobuf nodes
        assert idx.ins[p] == list(node.input) and idx.outs[p] == list(node.output)
    assert idx.producer["w0_alias"] == pos and "w0_copy" not in idx.producer


def test_bn_and_subgraph_positions():
    m = _conv_bn_chain(2)
    body = helper.make_graph([helper.make_node("Identity", ["r0"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    m.graph.node.insert(3, helper.make_node("If", ["cond"], ["y_if"], then_branch=body, else_branch=body))
    m.graph.node.append(helper.make_node("BatchNormalization", ["r1", "s0", "b0", "m0", "v0"], ["z"],
                                         domain="com.example"))  # not the standard operator
    idx = GraphIndex(m.graph, 17)
    assert idx.bn_positions == [1, 5]
    assert idx.subgraph_positions == [3]
    assert idx.use_count("r0") == 2  # conv1, and the If (both branches: once) reads it from the outer scope
    assert idx.consumer_nodes("r0") == [3, 4]
