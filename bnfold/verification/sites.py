"""Fold-site localisation: which tensors of the folded model should equal which of the reference.

bnfold keeps tensor names across a fold: a backward fold makes the producer write the BN's
output name, and a forward fold leaves the following Conv's output name unchanged. So the sites
can be found from the two graphs alone (no fold record needed, which also serves ``bnfold
verify`` on models folded elsewhere, as long as they keep names):

- the reference BN's output exists in the candidate          -> site on that tensor
  (direction "backward" when a non-BN node now writes it, "kept" when a BN still does);
- otherwise a consumer of the BN's output whose output exists in the candidate -> "forward".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class Site:
    bn: str  # BN node name in the reference
    tensor: str  # tensor compared in both models
    target: str  # node writing ``tensor`` in the candidate
    direction: str  # "backward" | "forward" | "kept"
    position: int  # the BN's position in the reference's node order (depth along the network)


def find_sites(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[Site]:
    writer = {o: n for n in candidate.graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in reference.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    sites: list[Site] = []
    for pos, node in enumerate(reference.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        y = node.output[0]
        if y in writer:
            w = writer[y]
            kept = w.op_type == "BatchNormalization"
            sites.append(Site(node.name, y, w.name, "kept" if kept else "backward", pos))
            continue
        for r in readers.get(y, ()):
            out = r.output[0] if r.output else ""
            if out in writer:
                sites.append(Site(node.name, out, writer[out].name, "forward", pos))
                break
    return sites


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names`` (intermediate tensors)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    types = {v.name: v for v in list(out.graph.value_info) + list(out.graph.input)}
    for name in names:
        if name in existing:
            continue
        vi = types.get(name)
        if vi is not None:
            out.graph.output.append(vi)
        else:
            out.graph.output.append(helper.make_empty_tensor_value_info(name))
        existing.add(name)
    return out


def worst_channels(ref: np.ndarray, cand: np.ndarray, k: int = 3) -> tuple[tuple[int, float], ...]:
    """The ``k`` channels (axis 1) with the largest absolute difference, with that difference."""
    if ref.ndim < 2 or ref.shape != cand.shape:
        return ()
    with np.errstate(invalid="ignore"):  # inf - inf is a NaN difference, ranked worst below
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    per = diff.max(axis=tuple(i for i in range(diff.ndim) if i != 1))
    per = np.where(np.isnan(per), np.inf, per)
    order = np.argsort(-per)[:k]
    return tuple((int(c), float(per[c])) for c in order)
