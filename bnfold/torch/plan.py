"""Plan the PyTorch fold: one :class:`bnfold.records.FoldDecision` for every BN of the traced
module (the same Reason codes as the ONNX planner), and for each folded BN the producer of each
of its calls with the folded weight and bias. Nothing here changes the module.

A later BN sees the folds planned before it: in conv -> bn1 -> bn2, bn2's input is the conv once
bn1 is folded, with bn1's folded weights (``_Planner.alias`` and ``_Planner.current``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import fx, nn

from bnfold.errors import BadInputError
from bnfold.formulas import arith
from bnfold.records import Action, Reason
from bnfold.rules import Refuse
from bnfold.run_records import FoldDecision, FoldPlan
from bnfold.torch.bn_kinds import BnKind, bn_kind
from bnfold.torch.producers import (
    Producer,
    channels_of,
    find_producer,
    refuse_run_time_parts,
    target_of,
    tensor_uses,
)


@dataclass
class SiteFold:
    """One BN call folded into its producer: the weight and bias that producer gets."""

    bn_node: fx.Node
    producer: Producer
    weight: torch.Tensor
    bias: torch.Tensor
    copy_attr: str | None = None  # a shared producer: the attribute its private copy gets
    keep_act: bool = False  # a BatchNormAct2d: its call stays, as its drop and act (bn_kinds.ActPart)


@dataclass
class TorchPlan:
    """The decisions (``plan``) and, per folded BN, its calls' folds in graph order."""

    plan: FoldPlan
    folds: dict[str, list[SiteFold]]


def _host64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _cast_back(v64: np.ndarray, like: torch.Tensor, original: torch.Tensor | None) -> torch.Tensor:
    """``arith.cast_back`` for torch dtypes: float16/32/64 through numpy, bfloat16 here."""
    if like.dtype in (torch.float16, torch.float32, torch.float64):
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[like.dtype]
        cast = arith.cast_back(v64, np.dtype(np_dtype), None if original is None else _host64(original))
        return torch.from_numpy(cast).to(like.device)
    t64 = torch.from_numpy(v64)
    if not torch.isfinite(t64).all():
        raise arith.FoldValueError("overflow", "folded value(s) are not finite (inf or nan)")
    out = t64.to(like.dtype)
    back = out.to(torch.float64)
    if not torch.isfinite(back).all():
        raise arith.FoldValueError("overflow", f"folded value(s) overflow {like.dtype}")
    tiny = torch.finfo(like.dtype).tiny
    lost = (t64 != 0) & (back.abs() < tiny)
    if original is not None:
        lost &= original.detach().cpu().to(torch.float64).abs() >= tiny
    if lost.any():
        raise arith.FoldValueError("underflow", f"folded value(s) become zero or subnormal in {like.dtype}")
    return out.to(like.device)


def _affine(bn: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The BN's weight and bias (buffers of a FrozenBatchNorm2d), None where it has none."""
    if not getattr(bn, "affine", True):
        return None, None
    w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
    return (w if isinstance(w, torch.Tensor) else None), (b if isinstance(b, torch.Tensor) else None)


def _scale_shift(bn: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray]:
    w, b = _affine(bn)
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    try:
        return arith.bn_scale_shift(_host64(w), _host64(b), _host64(mean), _host64(var), float(cast(float, bn.eps)))
    except ValueError as exc:
        raise BadInputError(f"BN '{name}' has unusable statistics or parameters: {exc}; they are corrupt: load "
                            "finite weights (stored statistics can be re-estimated: recalibrate='all')") from None


def folded_tensors(p: Producer, s: np.ndarray, t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer's rule on float64 host copies, cast back to the producer's dtypes."""
    w64, b64 = _host64(p.weight), _host64(p.bias)
    assert w64 is not None
    w_new, b_new = p.rule.fold(w64, b64, s, t, p.attrs)
    bias_like = p.bias if p.bias is not None else p.weight
    return _cast_back(w_new, p.weight, p.weight), _cast_back(b_new, bias_like, p.bias)


def _bn_input_ranks(bn: nn.Module) -> set[int] | None:
    """The input ranks a BN module accepts (None: any rank from 2, as SyncBatchNorm)."""
    if bn_kind(bn) in (BnKind.BN_ACT, BnKind.FROZEN_AFFINE):
        return {4}  # BatchNormAct2d asserts 4-D input; FrozenBatchNorm2d reshapes to (1, C, 1, 1)
    for cls, ranks in ((nn.BatchNorm1d, {2, 3}), (nn.BatchNorm2d, {4}), (nn.BatchNorm3d, {5})):
        lazy = getattr(nn, f"Lazy{cls.__name__}")
        if isinstance(bn, (cls, lazy)) and not isinstance(bn, nn.SyncBatchNorm):
            return ranks
    return None


def _check_rank(p: Producer, bn: nn.Module, ranks: set[int] | None) -> None:
    """The BN normalises axis 1: the producer's channels must be there (CHANNEL_MISMATCH, or
    UNKNOWN_RANK where the ranks were not seen and the BN type allows both)."""
    if p.is_linear:
        if ranks is None:
            raise Refuse(Reason.UNKNOWN_RANK, f"the rank of the output of Linear '{p.name}' is unknown (its "
                         "features are on axis 1 only for (N, C)); pass data or example_inputs")
        if ranks != {2}:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"Linear '{p.name}' output has rank {max(ranks)}: its "
                         "features are on the last axis while the BN normalises axis 1")
    elif ranks is not None and ranks != {p.dims + 2}:
        raise Refuse(Reason.CHANNEL_MISMATCH, f"the BN input has rank {sorted(ranks)}, not (N, C) plus "
                     f"{p.dims} spatial axes: '{p.name}' was called without a batch axis")
    elif ranks is None:
        accepted = _bn_input_ranks(bn)
        if accepted is not None and p.dims + 2 not in accepted:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"{type(bn).__name__} takes inputs of rank {sorted(accepted)}: "
                         f"it can only follow '{p.name}' called without a batch axis, which it then "
                         "normalises along another axis")
        if accepted is None or p.dims + 1 in accepted:
            raise Refuse(Reason.UNKNOWN_RANK, f"{type(bn).__name__} also takes the output of '{p.name}' called "
                         "without a batch axis (then it normalises another axis); pass data or example_inputs")


def _fresh_attr(owner: nn.Module, base: str, taken: set[str]) -> str:
    name, k = base, 1
    while hasattr(owner, name) or name in taken:
        name, k = f"{base}{k}", k + 1
    return name


class _Planner:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uses, self.calls = tensor_uses(gm)
        self.alias: dict[fx.Node, fx.Node] = {}  # folded BN call -> the producer that replaces it
        self.current: dict[fx.Node, SiteFold] = {}  # producer -> the last fold planned into it
        self.copies: dict[int, set[str]] = {}  # id(parent module) -> attributes planned for copies

    def users(self, node: fx.Node) -> list[fx.Node]:
        """The readers of ``node`` once the folds planned so far are done."""
        out: list[fx.Node] = []
        for u in node.users:
            out.extend(self.users(u) if self.alias.get(u) is node else [u])
        return out

    def producer(self, x: object) -> Producer:
        if isinstance(x, fx.Node) and x in self.alias:
            x = self.alias[x]
        if isinstance(x, fx.Node) and x in self.current:  # a second fold into the same call
            prev = self.current[x]
            p = prev.producer
            name, label = p.name, p.label
            if prev.copy_attr is not None:  # that call reads a private copy from now on
                parent_name = (target_of(p.node).rpartition(".")[0] if p.module is not None
                               else (p.weight_target or "").rpartition(".")[0])
                target = f"{parent_name}.{prev.copy_attr}" if parent_name else prev.copy_attr
                if p.module is not None:
                    name, label = target, f"{type(p.module).__name__} '{target}'"
                elif not parent_name:
                    name = target
                    label = f"{getattr(p.node.target, '__name__', '')} of '{target}'"
            return dataclasses.replace(p, weight=prev.weight, bias=prev.bias, shared=False, name=name, label=label)
        return find_producer(x, self.gm, self.uses, self.calls)

    def site(self, bn_node: fx.Node, bn: nn.Module, name: str, ranks: set[int] | None) -> SiteFold:
        """The fold of one BN call into its producer, or a :class:`Refuse`."""
        kind = bn_kind(bn)
        if kind is BnKind.CUSTOM:
            raise Refuse(Reason.UNKNOWN_BN_FORWARD, f"{type(bn).__name__} computes its own forward (besides or "
                         "instead of BatchNorm's), which bnfold cannot fold; it is kept with its statistics")
        refuse_run_time_parts(bn, f"BN '{name}'", "which folding would remove with the BN call")
        x = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
        p = self.producer(x)
        users = self.users(p.node)
        if len(users) > 1:
            others = ", ".join(sorted(u.name for u in users if u is not bn_node))
            raise Refuse(Reason.PRODUCER_FANOUT, f"the output of '{p.name}' also feeds {others}")
        tensors = [p.weight, p.bias, getattr(bn, "running_mean", None), getattr(bn, "running_var", None),
                   _affine(bn)[0]]
        bad = [t.dtype for t in tensors if t is not None and not t.is_floating_point()]
        if bad:
            raise Refuse(Reason.UNSUPPORTED_DTYPE, f"'{p.name}' or the BN holds non-floating values ({bad[0]})")
        c = channels_of(bn)
        if p.out_channels != c:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"'{p.name}' has {p.out_channels} output channels, the BN {c}")
        _check_rank(p, bn, ranks)
        s, t = _scale_shift(bn, name)
        try:
            w_new, b_new = folded_tensors(p, s, t)
        except arith.FoldValueError as exc:
            raise Refuse(Reason.DTYPE_OVERFLOW, f"folding into '{p.name}' ({p.weight.dtype}): {exc}") from None
        except ValueError as exc:  # shapes the arithmetic refuses
            raise Refuse(Reason.CHANNEL_MISMATCH, f"cannot fold into '{p.name}': {exc}") from None
        return SiteFold(bn_node, p, w_new, b_new, keep_act=kind is BnKind.BN_ACT)

    def commit(self, folds: list[SiteFold]) -> None:
        """Record the folds of one BN, so that BNs planned later see them."""
        for f in folds:
            if f.producer.shared:
                f.copy_attr = self._copy_attr(f.producer)
            if not f.keep_act:  # a BatchNormAct2d's call stays (its act): later BNs see it, not the producer
                self.alias[f.bn_node] = f.producer.node
            self.current[f.producer.node] = f

    def _copy_attr(self, p: Producer) -> str:
        """The attribute of the private copy a shared producer's call will read (reserved now)."""
        if p.module is not None:
            owner_name, _, base = target_of(p.node).rpartition(".")
        else:
            assert p.weight_target is not None
            owner_name, _, base = p.weight_target.rpartition(".")
        owner = self.gm.get_submodule(owner_name) if owner_name else self.gm
        taken = self.copies.setdefault(id(owner), set())
        attr = _fresh_attr(owner, f"{base}_bnfold", taken)
        taken.add(attr)
        return attr


def plan_folds(gm: fx.GraphModule, bns: list[tuple[str, nn.Module]], ranks: dict[str, set[int]] | None,
               warnings: list[str]) -> TorchPlan:
    """One decision for every BN of ``bns`` called in ``gm`` (a BN that forward never calls gets
    a warning instead), in graph order; ``gm`` is not changed."""
    planner = _Planner(gm)
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and bn_kind(gm.get_submodule(node.target)) is not None:
            sites.setdefault(node.target, []).append(node)
    # graph order, so that in conv -> bn1 -> bn2 the second BN sees the conv once the first is folded
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    order = sorted(bns, key=lambda nb: position[sites[nb[0]][0]] if nb[0] in sites else len(position))
    decisions: list[FoldDecision] = []
    folds: dict[str, list[SiteFold]] = {}
    for name, bn in order:
        nodes = sites.get(name, [])
        if not nodes:
            warnings.append(f"BN '{name}' is not used by forward; it is not part of the folded module")
            continue
        site_ranks = ranks.get(name) if ranks is not None else None
        try:
            planned = [planner.site(node, bn, name, site_ranks) for node in nodes]
        except Refuse as ref:
            detail = f"applied at {len(nodes)} places; {ref.detail}" if len(nodes) > 1 else ref.detail
            decisions.append(FoldDecision(name, Action.FROZEN_KEPT, reason=ref.reason, detail=detail))
            continue
        planner.commit(planned)
        folds[name] = planned
        detail = (f"applied at {len(nodes)} places; folded into each producer" if len(nodes) > 1
                  else f"folded into {planned[0].producer.label}")
        reason = None
        if any(f.producer.shared for f in planned):
            reason = Reason.SHARED_WEIGHT_CLONED
            detail += " (its weights serve other calls too: folded into a private copy)"
        decisions.append(FoldDecision(name, Action.FOLDED, target=", ".join(f.producer.name for f in planned),
                                      direction="backward", reason=reason, detail=detail))
    return TorchPlan(FoldPlan(tuple(decisions)), folds)
