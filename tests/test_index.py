"""GraphIndex commit and the paused garbage collector."""
from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.gcpause import paused_gc
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
