"""Build the *training network* used for calibration (Algorithm 2).

Every BN of the main graph normalises with its batch statistics, and those statistics become
graph outputs, so one onnxruntime run per mini-batch yields, per BN, the batch mean, the
biased batch variance and the input's shape (for m_b). The original outputs are dropped and
nodes that no statistic depends on are pruned, so the run stops after the last BN.

- opset >= 14: the BN itself, switched to ``training_mode=1`` with ``momentum=0`` and three named
  outputs (with momentum 0 its running-stat outputs *are* the batch statistics; onnxruntime
  computes the variance in two passes). Never with empty optional outputs: onnxruntime crashes.
- older opsets: an explicit two-pass decomposition over ``Reshape(X, [0, 0, -1])`` (works for any
  rank >= 2 and needs no BN training support from the runtime).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import UnsupportedModelError
from bnfold.graph.attrs import set_attr
from bnfold.graph.constants import _RAW_DTYPES, Constants
from bnfold.graph.index import GraphIndex, has_subgraph, subgraph_free_names
from bnfold.onnx import deferred
from bnfold.onnx.serialize import _copy_except
from bnfold.stages.discover import BnSite
from bnfold.stages.freeze import stats_dtype

# raw initializers of at least this many bytes reach onnxruntime from memory, not through the
# serialised calibration model (see ``build_calibration_model``)
IN_MEMORY_MIN_BYTES = 1024
IN_MEMORY_LOCATION = "bnfold-in-memory"  # the placeholder location their heads carry


def _copy_heads(model: onnx.ModelProto, cal: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Copy ``model`` into ``cal`` but for the data of large raw initializers: those get a head
    (name, type, dims) marked external, and are returned by name (the model's own tensors)."""
    _copy_except(model, cal, "graph")
    _copy_except(model.graph, cal.graph, "initializer")
    held: dict[str, onnx.TensorProto] = {}
    for t in model.graph.initializer:
        if t.name not in held and (deferred.is_deferred(t) or (  # a deferred one: read only if the net keeps it
                t.data_type in _RAW_DTYPES and t.data_location != onnx.TensorProto.EXTERNAL
                and t.HasField("raw_data") and t.ByteSize() >= IN_MEMORY_MIN_BYTES)):
            head = cal.graph.initializer.add()
            _copy_except(t, head, "raw_data")
            del head.external_data[:]  # a deferred tensor's own entries
            head.data_location = onnx.TensorProto.EXTERNAL
            entry = head.external_data.add()
            entry.key, entry.value = "location", IN_MEMORY_LOCATION
            held[t.name] = t
        else:
            cal.graph.initializer.add().CopyFrom(t)
    return held


@dataclass(frozen=True)
class StatOutputs:
    bn: str
    mean: str  # (C,) or (1, C, 1)
    var: str  # biased batch variance, same shape
    shape: str  # int64 shape of the BN input


def _prune(graph: onnx.GraphProto, wanted: set[str]) -> None:
    """Keep only the nodes that some wanted output depends on (one backward sweep)."""
    needed = set(wanted)
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            if has_subgraph(node):
                needed.update(subgraph_free_names(node))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    dead = {t.name for t in graph.initializer if t.name not in needed}
    inits = [i for i, t in enumerate(graph.initializer) if t.name in dead]
    for i in reversed(inits):
        del graph.initializer[i]
    # old IR lists initializers among the inputs too: an input without its initializer is required
    stale = [i for i, v in enumerate(graph.input) if v.name in dead]
    for i in reversed(stale):
        del graph.input[i]


def build_calibration_model(
    model: onnx.ModelProto, index: GraphIndex, consts: Constants, sites: list[BnSite]
) -> tuple[onnx.ModelProto, list[StatOutputs], dict[str, onnx.TensorProto]]:
    """A copy of ``model`` that outputs the batch statistics of every main-graph BN, its outputs,
    and the initializers whose data it does not hold.

    The weights are not copied: each large raw initializer appears as a head marked external (at
    ``IN_MEMORY_LOCATION``), and the returned mapping names the model's own tensor for it, whose
    bytes the session receives directly (``SessionOptions.add_external_initializers``). Copying
    and serialising the weights, then parsing them back, was most of the calibration's set-up.
    """
    cal = onnx.ModelProto()
    held = _copy_heads(model, cal)
    g = cal.graph
    nodes = list(g.node)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    outputs: list[StatOutputs] = []
    value_infos: list[onnx.ValueInfoProto] = []
    taken = set(index._names)

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    for site in sites:
        if site.pos is None:
            continue
        node = nodes[site.pos]
        orig = index.nodes[site.pos]
        name = orig.name
        if not site.spatial:
            raise UnsupportedModelError(
                f"BN '{name}' uses spatial=0 (per-activation statistics); bnfold calibrates per-channel BN only"
            )
        scale = consts.default(orig.input[1])
        if scale is None or scale.ndim != 1:
            raise UnsupportedModelError(
                f"BN '{name}' has a non-constant scale, so its channel count is unknown; bnfold cannot calibrate it"
            )
        c = int(scale.shape[0])
        dt = stats_dtype(index, orig)
        elem = helper.np_dtype_to_tensor_dtype(dt)
        mean_out, var_out, shape_out = (fresh(f"__bnfold_{k}_{site.pos}") for k in ("mean", "var", "shape"))
        extra: list[onnx.NodeProto] = [helper.make_node("Shape", [node.input[0]], [shape_out])]
        if index.opset >= 14:
            zero, one = fresh(f"__bnfold_zero_{site.pos}"), fresh(f"__bnfold_one_{site.pos}")
            g.initializer.extend([
                numpy_helper.from_array(np.zeros(c, dt), zero),
                numpy_helper.from_array(np.ones(c, dt), one),
            ])
            node.input[3], node.input[4] = zero, one
            set_attr(node, "training_mode", 1)
            set_attr(node, "momentum", 0.0)
            y = node.output[0]
            del node.output[:]
            node.output.extend([y, mean_out, var_out])
            shape = [c]
        else:
            extra.extend(_decomposed(node, orig, consts, c, dt, mean_out, var_out, fresh, g))
            shape = [1, c, 1]
        new_nodes[site.pos] = extra
        value_infos += [
            helper.make_tensor_value_info(mean_out, elem, shape),
            helper.make_tensor_value_info(var_out, elem, shape),
            helper.make_tensor_value_info(shape_out, onnx.TensorProto.INT64, None),
        ]
        outputs.append(StatOutputs(name, mean_out, var_out, shape_out))

    ordered: list[onnx.NodeProto] = []
    for i, node in enumerate(nodes):
        if index.opset < 14 and i in new_nodes:
            ordered.extend(new_nodes[i])  # the decomposition replaces the BN
            continue
        ordered.append(node)
        ordered.extend(new_nodes.get(i, ()))
    del g.node[:]
    g.node.extend(ordered)
    del g.output[:]
    g.output.extend(value_infos)
    del g.value_info[:]
    _prune(g, {v.name for v in value_infos})
    kept = {t.name for t in g.initializer}
    return cal, outputs, {name: t for name, t in held.items() if name in kept}


def _decomposed(
    node: onnx.NodeProto, orig: onnx.NodeProto, consts: Constants, c: int, dt: np.dtype, mean_out: str,
    var_out: str, fresh: Callable[[str], str], g: onnx.GraphProto,
) -> list[onnx.NodeProto]:
    """Two-pass batch normalisation with statistics outputs, for opsets without training_mode."""
    eps = 1e-5
    for a in orig.attribute:
        if a.name == "epsilon":
            eps = a.f
    gamma_v = consts.default(orig.input[1])
    assert gamma_v is not None  # the caller checked that the scale is a constant
    gamma = gamma_v.astype(dt).reshape(1, c, 1)
    beta_v = consts.default(orig.input[2])
    beta = (beta_v if beta_v is not None else np.zeros(c)).astype(dt).reshape(1, c, 1)
    x, y = orig.input[0], orig.output[0]
    n = {k: fresh(f"__bnfold_{k}_{mean_out}") for k in
         ("shape3", "x3", "d", "sq", "ve", "sd", "k", "dk", "y3", "xshape", "gamma", "beta", "eps")}
    g.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), n["shape3"]),
        numpy_helper.from_array(gamma, n["gamma"]),
        numpy_helper.from_array(beta, n["beta"]),
        numpy_helper.from_array(np.array(eps, dt), n["eps"]),
    ])
    mk = helper.make_node
    return [
        mk("Reshape", [x, n["shape3"]], [n["x3"]]),
        mk("ReduceMean", [n["x3"]], [mean_out], axes=[0, 2], keepdims=1),
        mk("Sub", [n["x3"], mean_out], [n["d"]]),
        mk("Mul", [n["d"], n["d"]], [n["sq"]]),
        mk("ReduceMean", [n["sq"]], [var_out], axes=[0, 2], keepdims=1),
        mk("Add", [var_out, n["eps"]], [n["ve"]]),
        mk("Sqrt", [n["ve"]], [n["sd"]]),
        mk("Div", [n["gamma"], n["sd"]], [n["k"]]),
        mk("Mul", [n["d"], n["k"]], [n["dk"]]),
        mk("Add", [n["dk"], n["beta"]], [n["y3"]]),
        mk("Shape", [x], [n["xshape"]]),
        mk("Reshape", [n["y3"], n["xshape"]], [y]),
    ]
