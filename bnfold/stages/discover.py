"""Find every BatchNormalization and tell how it normalises (training, decomposed, inference).

Recognised training-mode BN: ``training_mode=1`` (opset >= 14); extra outputs before opset 14;
``is_test=0`` (opset < 7); and a BN whose mean/var inputs are computed from its own input (what
torch exports for ``track_running_stats=False``). BNs inside If/Loop/Scan bodies and functions
are listed with their location so that none is skipped silently.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import onnx

from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.records import Mode
from bnfold.run_records import BnInfo

_TRACE_LIMIT = 16


@dataclass(slots=True)  # one per BN: not frozen, for speed (see records.BnInfo); read-only all the same
class BnSite:
    """A BN found in the main graph (``pos`` set) or in a subgraph/function (``pos`` None)."""

    info: BnInfo
    pos: int | None
    spatial: bool = True  # legacy spatial=0 means per-activation statistics


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def name_nodes(graph: onnx.GraphProto) -> bool:
    """Give every unnamed or duplicate-named node of the main graph a unique name (in place).
    Returns whether any node was renamed."""
    names = [n.name for n in graph.node]
    counts = Counter(names)
    if len(counts) == len(names) and "" not in counts:
        return False  # the common case: nothing to rename
    renamed = False
    used = set(counts)
    used.discard("")
    for i, (node, name) in enumerate(zip(graph.node, names)):
        if name and counts[name] == 1:
            continue
        base = f"{name or node.op_type}_{i}"
        new, k = base, 1
        while new in used:
            new, k = f"{base}_{k}", k + 1
        used.add(new)
        renamed = renamed or new != name
        node.name = new
    return renamed


_STD = ("", "ai.onnx")


def is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in _STD


def attr_training(node: onnx.NodeProto, opset: int,
                  attrs: dict[str, onnx.AttributeProto] | None = None) -> bool:
    """Training mode as the node's attributes and outputs declare it."""
    attrs = attrs if attrs is not None else {a.name: a for a in node.attribute}
    if opset >= 14:
        return "training_mode" in attrs and bool(attrs["training_mode"].i)
    if opset < 7 and ("is_test" not in attrs or attrs["is_test"].i == 0):
        return True
    return any(list(node.output)[1:])


def training_bn_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's BNs that declare training mode (attributes and outputs only: no
    index is built, and the weights need not be loaded)."""
    opset = default_opset(model)
    return [n.name or f"BatchNormalization_{i}" for i, n in enumerate(model.graph.node)
            if is_bn(n) and attr_training(n, opset)]


def _depends_on(index: GraphIndex, name: str, target: str) -> bool:
    """Whether ``name`` is computed from ``target`` within a few producer steps."""
    stack, seen = [name], set[str]()
    while stack and len(seen) < _TRACE_LIMIT * 4:
        cur = stack.pop()
        if cur == target:
            return True
        if cur in seen:
            continue
        seen.add(cur)
        node = index.node_of(cur)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return False


def _bn_info(node: onnx.NodeProto, mode: Mode, index: GraphIndex | None, consts: Constants | None,
             graph_path: str, attrs: dict[str, onnx.AttributeProto] | None = None,
             ins: list[str] | None = None, output: str | None = None) -> BnInfo:
    ins = ins if ins is not None else list(node.input)
    attrs = attrs if attrs is not None else {a.name: a for a in node.attribute}
    producer = producer_op = None
    channels = None
    if index is not None:
        p = index.node_of(ins[0])
        if p is not None:
            producer, producer_op = p.name, p.op_type
    if consts is not None:
        inits = consts.index.initializers
        for slot in (1, 3, 2, 4):
            name = ins[slot] if slot < len(ins) else ""
            if not name:
                continue
            init = inits.get(name)
            if init is not None:
                dims = init.dims
            else:
                v = consts.value(name)
                dims = v.shape if v is not None else ()
            if len(dims) == 1:
                channels = int(dims[0])
                break
    return BnInfo(
        name=node.name,
        mode=mode,
        input=ins[0],
        output=output if output is not None else node.output[0],
        producer=producer,
        producer_op=producer_op,
        epsilon=float(attrs["epsilon"].f) if "epsilon" in attrs else 1e-5,
        channels=channels,
        graph_path=graph_path,
    )


def _subgraph_bns(graph: onnx.GraphProto, opset: int, path: str) -> list[BnSite]:
    """BNs of a subgraph or function, named ``<path>::<node name>`` so that none collides with a
    main-graph BN or with another subgraph's (unnamed nodes: ``BatchNormalization_<i>``)."""
    sites: list[BnSite] = []
    for i, node in enumerate(graph.node):
        if is_bn(node):
            mode = Mode.TRAINING if attr_training(node, opset) else Mode.INFERENCE
            info = _bn_info(node, mode, None, None, path)
            info = replace(info, name=f"{path}::{node.name or f'BatchNormalization_{i}'}")
            sites.append(BnSite(info, None))
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for k, g in enumerate(subs):
                sub_path = f"{path}/{node.name or node.op_type}.{a.name}" + (f"[{k}]" if len(subs) > 1 else "")
                sites.extend(_subgraph_bns(g, opset, sub_path))
    return sites


def _refuse_read_saved_stats(index: GraphIndex, node: onnx.NodeProto, outs: list[str]) -> None:
    """A training BN's saved_mean/saved_var outputs (opsets 6-13, outputs 4 and 5) hold the batch's
    statistics in a form each runtime chooses (onnxruntime: the inverse standard deviation); the
    frozen BN has no such outputs and nothing to serve them with. Refuse a model that reads one."""
    for k, what in ((3, "saved_mean"), (4, "saved_var")):
        out = outs[k] if k < len(outs) else ""
        if out and index.use_count(out):
            raise UnsupportedModelError(
                f"BN '{node.name}' is in training mode and its {what} output '{out}' is read "
                f"({'a graph output' if out in index.graph_outputs else 'by another node'}); that training-only "
                "output has no value once the BN is frozen: export the model without it (or in eval mode)")


_PARAM_NAMES = ((1, "scale"), (2, "B"), (3, "mean"), (4, "var"))


def _check_param_shapes(node: onnx.NodeProto, ins: list[str], consts: Constants) -> None:
    """Refuse a BN whose constant scale/B/mean/var is not a vector of one common length (C,):
    converters write a scalar ``Constant`` (``value_float``) or a (1,) tensor; onnxruntime
    refuses such a BN at run time, and the fold arithmetic cannot take it."""
    inits = consts.index.initializers
    seen: tuple[str, str, int] | None = None
    for slot, what in _PARAM_NAMES:
        name = ins[slot] if slot < len(ins) else ""
        if not name:
            continue
        init = inits.get(name)
        if init is not None:
            dims: tuple[int, ...] = tuple(init.dims)
        elif name in consts.index.overridable or name in consts.index.graph_inputs:
            continue
        else:
            v = consts.value(name)
            if v is None:
                continue
            dims = tuple(v.shape)
        if len(dims) != 1 or (seen is not None and dims[0] != seen[2]):
            against = ""
            if seen is not None and len(dims) == 1:
                against = f", but {seen[0]} '{seen[1]}' has {seen[2]} channels"
            raise BadInputError(f"BN '{node.name}' {what} '{name}' has shape {list(dims)}{against}: BatchNormalization "
                                "takes scale, B, mean and var as vectors of shape (C,), one value per channel; "
                                "fix the model so that each holds C values")
        if seen is None:
            seen = (what, name, dims[0])


def find_bns(model: onnx.ModelProto, index: GraphIndex, consts: Constants) -> list[BnSite]:
    """Every BN of the model: main graph first (in node order), then subgraphs and functions."""
    opset = index.opset
    sites: list[BnSite] = []
    sub: list[BnSite] = []
    nodes = index.nodes
    inits = index.initializers
    # the index knows where the BNs and the subgraph-carrying nodes are: no walk over every node
    for pos in index.bn_positions:
        if pos in index.removed:
            continue
        node = nodes[pos]
        attrs = {a.name: a for a in node.attribute}
        training = attr_training(node, opset, attrs)
        if training:
            _refuse_read_saved_stats(index, node, index.outs[pos])
        ins = index.ins[pos]
        computed = [n for n in ins[3:5] if n not in inits and not consts.is_constant(n)]
        if computed and any(_depends_on(index, n, ins[0]) for n in computed):
            mode = Mode.DECOMPOSED
        else:
            mode = Mode.TRAINING if training else Mode.INFERENCE
        spatial = bool(attrs["spatial"].i) if opset < 9 and "spatial" in attrs else True
        if spatial:
            _check_param_shapes(node, ins, consts)
        sites.append(BnSite(_bn_info(node, mode, index, consts, "", attrs, ins, index.outs[pos][0]), pos, spatial))
    for pos in index.subgraph_positions:
        node = nodes[pos]
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
                list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
            for k, g in enumerate(subs):
                path = f"{node.name}.{a.name}" + (f"[{k}]" if len(subs) > 1 else "")
                sub.extend(_subgraph_bns(g, opset, path))
    for fn in model.functions:
        sub.extend(_subgraph_bns(onnx.GraphProto(node=fn.node), opset, f"function:{fn.domain}.{fn.name}"))
    return sites + sub
