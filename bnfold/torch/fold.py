"""Fold BatchNorm modules of a PyTorch module into their producers (math.md sections 1 and 3).

The data flow comes from ``torch.fx`` symbolic tracing of the frozen (eval-mode) module: a BN node
folds backward into the node that produces its input when that node is

* a ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` module (any ``groups``), or a ``Linear``
  module feeding a ``BatchNorm1d`` on ``(N, C)``, called as a module; or
* ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` or ``F.linear`` whose weight (and bias) are
  parameters read directly (``get_attr``), as in modules that call the functional form in their
  own ``forward`` (EfficientNet's same-padding convolutions);

its output feeds nothing but the BN and its weight and bias are floating point. Otherwise the BN
stays, frozen, with the :class:`bnfold.records.Reason`. Where the weights also serve other calls
(a module applied twice, a weight tied to another layer, a parameter read by two functional
calls), this call gets a private folded copy and the others keep the original, as a shared
ONNX initializer does (``SHARED_WEIGHT_CLONED``).

The arithmetic is :mod:`bnfold.formulas.arith` in float64 on host copies, cast back to the
producer's dtype with the same overflow/underflow refusal (``DTYPE_OVERFLOW``). ConvTranspose with
``groups > 1`` scales each group's slice of the weight (``torch.nn.utils.fusion`` gets this wrong).

The result is the ``fx.GraphModule`` with the folded producers' parameters replaced (new
``Parameter`` objects: the module that was traced keeps its own) and the folded BN nodes removed.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.errors import BadInputError
from bnfold.formulas import arith
from bnfold.records import Action, BnRecord, FrozenStats, Mode, Reason, Report
from bnfold.torch.batches import Batch, as_batch
from bnfold.torch.calibrate import (
    _calibration_targets,
    _check_estimator,
    bn_mode,
    copy_module,
    float_dtype,
    module_device,
    run_calibration,
)
from bnfold.torch.trace import hooked_modules, trace

__all__ = ["TorchFoldResult", "fold", "trace"]  # trace: re-exported from .trace


@dataclass
class TorchFoldResult:
    """The folded module (an ``fx.GraphModule`` in eval mode) and the report of every BN."""

    module: nn.Module
    report: Report


# ----------------------------------------------------------------------------- producers

_MODULE_KINDS: tuple[tuple[type, str, int], ...] = (
    (nn.Conv1d, "conv", 1), (nn.Conv2d, "conv", 2), (nn.Conv3d, "conv", 3),
    (nn.ConvTranspose1d, "convT", 1), (nn.ConvTranspose2d, "convT", 2), (nn.ConvTranspose3d, "convT", 3),
    (nn.Linear, "linear", 0),
)

# functional producers: (kind, spatial dims); argument order of each signature is fixed below
_FUNC_KINDS: dict[Any, tuple[str, int]] = {
    F.conv1d: ("conv", 1), F.conv2d: ("conv", 2), F.conv3d: ("conv", 3),
    F.conv_transpose1d: ("convT", 1), F.conv_transpose2d: ("convT", 2), F.conv_transpose3d: ("convT", 3),
    F.linear: ("linear", 0),
}
_WEIGHT_POS, _BIAS_POS, _GROUPS_POS = 1, 2, 6  # conv: (x, w, b, stride, padding, dilation, groups);
# conv_transpose: (x, w, b, stride, padding, output_padding, groups, dilation); linear: (x, w, b)


def _module_kind(m: nn.Module) -> tuple[str, int] | None:
    for cls, kind, dims in _MODULE_KINDS:
        if isinstance(m, cls):
            return (kind, dims) if type(m).forward is cls.forward else None
    return None


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)} ('{node.name}')"
    return f"{node.op} '{node.name}'"


def _resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> tuple[Any, str]:
    """The value of argument ``name`` (positional ``pos``) and where it is: 'args', 'kwargs' or 'default'."""
    if len(node.args) > pos:
        return node.args[pos], "args"
    if name in node.kwargs:
        return node.kwargs[name], "kwargs"
    return default, "default"


@dataclass
class _Producer:
    node: fx.Node
    kind: str  # conv | convT | linear
    dims: int
    name: str  # module name for the report
    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    module: nn.Module | None = None  # call_module producers
    label: str = ""  # "Conv2d 'layer1.conv'" or "conv2d on 'stem.weight'", for the report
    weight_target: str | None = None  # call_function producers: get_attr targets
    bias_target: str | None = None
    shared: bool = False  # the module or its weight serves other calls too: fold into a private copy


class _Refusal(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _tensor_uses(gm: fx.GraphModule) -> tuple[Counter, Counter]:
    """How often each parameter/buffer (by id) is used by a node, and each module target is called."""
    uses: Counter = Counter()
    calls: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
            sub = gm.get_submodule(node.target)
            for t in list(sub.parameters()) + list(sub.buffers()):
                uses[id(t)] += 1
        elif node.op == "get_attr":
            obj = _resolve_attr(gm, node.target)
            if isinstance(obj, torch.Tensor):
                uses[id(obj)] += max(1, len(node.users))
    return uses, calls


def _refuse_run_time_parts(mod: nn.Module, label: str, hook_effect: str) -> None:
    """HOOKED for forward hooks or pre-hooks, NOT_CONSTANT for parametrizations (weight_norm,
    spectral_norm, ...: parameters computed at run time) of a producer or BN module."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        raise _Refusal(Reason.HOOKED, f"{label} has forward hooks or pre-hooks, {hook_effect}")
    if getattr(mod, "parametrizations", None):
        raise _Refusal(Reason.NOT_CONSTANT, f"{label} has parametrizations (weight_norm, spectral_norm, ...) "
                       "that compute its parameters at run time")


def _producer(node: Any, gm: fx.GraphModule, uses: Counter, calls: Counter) -> _Producer:
    if not isinstance(node, fx.Node):
        raise _Refusal(Reason.NO_PRODUCER, "its input is not produced by a node of the traced graph")
    if node.op == "placeholder":
        raise _Refusal(Reason.NO_PRODUCER, f"its input is the model input '{node.target}'")
    if node.op == "get_attr":
        raise _Refusal(Reason.NO_PRODUCER, f"its input is the constant '{node.target}'")
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        kind = _module_kind(mod)
        if kind is None:
            raise _Refusal(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {_describe(node, gm)}, "
                           "not from a Conv, ConvTranspose or Linear")
        _refuse_run_time_parts(mod, f"'{node.target}'", "which would then see the folded output")
        w, b = mod.weight, mod.bias
        # a module called again elsewhere, or a weight tied to another layer: scaling it in place
        # would change those other calls, so this call gets its own folded copy (``_apply``)
        shared = calls[node.target] > 1 or uses[id(w)] > 1 or (b is not None and uses[id(b)] > 1)
        groups = int(getattr(mod, "groups", 1))
        return _Producer(node, kind[0], kind[1], node.target, w, b, groups, module=mod,
                         label=f"{type(mod).__name__} '{node.target}'", shared=shared)
    if node.op == "call_function" and node.target in _FUNC_KINDS:
        kind, dims = _FUNC_KINDS[node.target]
        w_node, _ = _arg(node, _WEIGHT_POS, "weight")
        b_node, _ = _arg(node, _BIAS_POS, "bias")
        if not (isinstance(w_node, fx.Node) and w_node.op == "get_attr"):
            raise _Refusal(Reason.NOT_CONSTANT, f"the weight of {_describe(node, gm)} is computed in forward, "
                           "not a parameter")
        if b_node is not None and not (isinstance(b_node, fx.Node) and b_node.op == "get_attr"):
            raise _Refusal(Reason.NOT_CONSTANT, f"the bias of {_describe(node, gm)} is computed in forward, "
                           "not a parameter")
        w = _resolve_attr(gm, w_node.target)
        b = _resolve_attr(gm, b_node.target) if b_node is not None else None
        if not isinstance(w, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
            raise _Refusal(Reason.NOT_CONSTANT, f"the weight or bias of {_describe(node, gm)} is not a tensor")
        owner = w_node.target.rpartition(".")[0]
        shared = uses[id(w)] > 1 or (b is not None and uses[id(b)] > 1)
        groups = 1
        if kind != "linear":
            g, _ = _arg(node, _GROUPS_POS, "groups", 1)
            if not isinstance(g, int):
                raise _Refusal(Reason.NOT_CONSTANT, f"the group count of {_describe(node, gm)} is computed in forward")
            groups = g
        return _Producer(node, kind, dims, owner or w_node.target, w, b, groups,
                         weight_target=w_node.target, bias_target=b_node.target if b_node is not None else None,
                         label=f"{node.target.__name__} of '{owner or w_node.target}'", shared=shared)
    raise _Refusal(Reason.UNSUPPORTED_PRODUCER, f"its input comes from {_describe(node, gm)}, "
                   "not from a Conv, ConvTranspose or Linear")


# ----------------------------------------------------------------------------- arithmetic


def _host64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _cast_back(v64: np.ndarray, like: torch.Tensor, original: torch.Tensor | None) -> torch.Tensor:
    """``arith.cast_back`` for torch dtypes: float16/32/64 through numpy, bfloat16 here."""
    if like.dtype in (torch.float16, torch.float32, torch.float64):
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[like.dtype]
        out = arith.cast_back(v64, np.dtype(np_dtype), None if original is None else _host64(original))
        return torch.from_numpy(out).to(like.device)
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


def _scale_shift(bn: _BatchNorm, name: str) -> tuple[np.ndarray, np.ndarray]:
    gamma = _host64(bn.weight) if bn.affine else None
    beta = _host64(bn.bias) if bn.affine else None
    try:
        return arith.bn_scale_shift(gamma, beta, _host64(bn.running_mean), _host64(bn.running_var), bn.eps)
    except ValueError as exc:
        raise BadInputError(f"BN '{name}' has unusable statistics: {exc}") from None


def _folded_tensors(p: _Producer, s: np.ndarray, t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    w64, b64 = _host64(p.weight), _host64(p.bias)
    if p.kind == "conv":
        w_new, b_new = arith.fold_conv(w64, b64, s, t)
    elif p.kind == "convT":
        w_new, b_new = arith.fold_conv_transpose(w64, b64, s, t, p.groups)
    else:  # Linear: y = x @ W.T + b, W is (out, in): Gemm with transB=1
        w_new, b_new = arith.fold_gemm(w64, b64, s, t, trans_b=True, alpha=1.0, beta=1.0, n=w64.shape[0])
    bias_like = p.bias if p.bias is not None else p.weight
    return _cast_back(w_new, p.weight, p.weight), _cast_back(b_new, bias_like, p.bias)


def _out_channels(p: _Producer) -> int:
    if p.kind == "convT":
        return int(p.weight.shape[1]) * p.groups
    return int(p.weight.shape[0])


def _plan_site(bn_node: fx.Node, bn: _BatchNorm, name: str, gm: fx.GraphModule, uses: Counter,
               calls: Counter, ranks: set[int] | None) -> tuple[_Producer, torch.Tensor, torch.Tensor]:
    """The producer of one BN call and its folded weight and bias, or a :class:`_Refusal`."""
    _refuse_run_time_parts(bn, f"BN '{name}'", "which folding would remove with the BN call")
    x = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    p = _producer(x, gm, uses, calls)
    if len(p.node.users) > 1:
        others = ", ".join(sorted(u.name for u in p.node.users if u is not bn_node))
        raise _Refusal(Reason.PRODUCER_FANOUT, f"the output of '{p.name}' also feeds {others}")
    tensors = [p.weight, p.bias, bn.running_mean, bn.running_var, bn.weight if bn.affine else None]
    bad = [t.dtype for t in tensors if t is not None and not t.is_floating_point()]
    if bad:
        raise _Refusal(Reason.UNSUPPORTED_DTYPE, f"'{p.name}' or the BN holds non-floating values ({bad[0]})")
    c = int(bn.running_mean.shape[0])
    if _out_channels(p) != c:
        raise _Refusal(Reason.CHANNEL_MISMATCH, f"'{p.name}' has {_out_channels(p)} output channels, the BN {c}")
    if p.kind == "linear":
        if ranks is None:
            raise _Refusal(Reason.UNKNOWN_RANK, f"the rank of the output of Linear '{p.name}' is unknown (its "
                           "features are on axis 1 only for (N, C)); pass data or example_inputs")
        if ranks != {2}:
            raise _Refusal(Reason.CHANNEL_MISMATCH, f"Linear '{p.name}' output has rank {max(ranks)}: its "
                           "features are on the last axis while the BN normalises axis 1")
    elif ranks is not None and ranks != {p.dims + 2}:
        raise _Refusal(Reason.CHANNEL_MISMATCH, f"the BN input has rank {sorted(ranks)}, not (N, C) plus "
                       f"{p.dims} spatial axes: '{p.name}' was called without a batch axis")
    elif ranks is None:
        accepted = _bn_input_ranks(bn)
        if accepted is not None and p.dims + 2 not in accepted:
            raise _Refusal(Reason.CHANNEL_MISMATCH, f"{type(bn).__name__} takes inputs of rank {sorted(accepted)}: "
                           f"it can only follow '{p.name}' called without a batch axis, which it then "
                           "normalises along another axis")
        if accepted is None or p.dims + 1 in accepted:
            raise _Refusal(Reason.UNKNOWN_RANK, f"{type(bn).__name__} also takes the output of '{p.name}' called "
                           "without a batch axis (then it normalises another axis); pass data or example_inputs")
    s, t = _scale_shift(bn, name)
    try:
        w_new, b_new = _folded_tensors(p, s, t)
    except arith.FoldValueError as exc:
        raise _Refusal(Reason.DTYPE_OVERFLOW, f"folding into '{p.name}' ({p.weight.dtype}): {exc}") from None
    except ValueError as exc:  # shapes the arithmetic refuses
        raise _Refusal(Reason.CHANNEL_MISMATCH, f"cannot fold into '{p.name}': {exc}") from None
    return p, w_new, b_new


def _bn_input_ranks(bn: _BatchNorm) -> set[int] | None:
    """The input ranks a BN module accepts (None: any rank from 2, as SyncBatchNorm)."""
    for cls, ranks in ((nn.BatchNorm1d, {2, 3}), (nn.BatchNorm2d, {4}), (nn.BatchNorm3d, {5})):
        lazy = getattr(nn, f"Lazy{cls.__name__}")
        if isinstance(bn, (cls, lazy)) and not isinstance(bn, nn.SyncBatchNorm):
            return ranks
    return None


def _new_param(value: torch.Tensor, like: torch.Tensor | None) -> nn.Parameter:
    return nn.Parameter(value, requires_grad=bool(like.requires_grad) if like is not None else True)


def _fresh_attr(owner: nn.Module, base: str) -> str:
    name, k = base, 1
    while hasattr(owner, name):
        name, k = f"{base}{k}", k + 1
    return name


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    """Set a call's argument where it was given (positionally, else as a keyword)."""
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _functional_private_copy(gm: fx.GraphModule, p: _Producer, w_new: torch.Tensor, b_new: torch.Tensor) -> None:
    """Point this functional call alone at new, folded parameters; the shared ones stay for the
    other calls."""
    owner_name, _, w_attr = p.weight_target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    for pos, key, value, like in ((_WEIGHT_POS, "weight", w_new, p.weight),
                                  (_BIAS_POS, "bias", b_new, p.bias if p.bias is not None else p.weight)):
        attr = _fresh_attr(owner, f"{w_attr if key == 'weight' else 'bias'}_bnfold")
        owner.register_parameter(attr, _new_param(value, like))
        with gm.graph.inserting_before(p.node):
            ref = gm.graph.get_attr(f"{owner_name}.{attr}" if owner_name else attr)
        _set_arg(p.node, pos, key, ref)


def _apply(gm: fx.GraphModule, bn_node: fx.Node, p: _Producer, w_new: torch.Tensor, b_new: torch.Tensor,
           private: bool) -> None:
    """Write the folded parameters (new Parameter objects) and remove the BN node."""
    if p.module is not None:
        mod = p.module if private and not p.shared else copy_module(p.module)
        mod.weight = _new_param(w_new, p.weight)
        mod.bias = _new_param(b_new, p.bias if p.bias is not None else p.weight)
        if mod is not p.module:
            parent_name, _, attr = p.node.target.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            if p.shared:  # the module's other calls keep it: this call moves to the copy
                attr = _fresh_attr(parent, f"{attr}_bnfold")
                p.node.target = f"{parent_name}.{attr}" if parent_name else attr
            setattr(parent, attr, mod)
    elif p.shared:
        _functional_private_copy(gm, p, w_new, b_new)
    else:
        owner_name, _, w_attr = p.weight_target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        setattr(owner, w_attr, _new_param(w_new, p.weight))
        if p.bias_target is not None:
            b_owner_name, _, b_attr = p.bias_target.rpartition(".")
            b_owner = gm.get_submodule(b_owner_name) if b_owner_name else gm
            setattr(b_owner, b_attr, _new_param(b_new, p.bias))
        else:
            b_attr = "bias"
            k = 0
            while getattr(owner, b_attr, None) is not None:
                k += 1
                b_attr = f"bnfold_bias{k}"
            if b_attr in owner._parameters:
                owner._parameters.pop(b_attr)
            owner.register_parameter(b_attr, _new_param(b_new, p.weight))
            with gm.graph.inserting_before(p.node):
                b_node = gm.graph.get_attr(f"{owner_name}.{b_attr}" if owner_name else b_attr)
            _set_arg(p.node, _BIAS_POS, "bias", b_node)
    bn_node.replace_all_uses_with(p.node)
    gm.graph.erase_node(bn_node)


# ----------------------------------------------------------------------------- the front end


def _probe_ranks(work: nn.Module, batch: Batch, bns: list[tuple[str, _BatchNorm]]) -> dict[str, set[int]]:
    """BN input ranks from one eval-mode forward on the example ``batch``."""
    ranks: dict[str, set[int]] = {}
    handles = []
    for name, m in bns:
        def hook(mod, args, _name=name):
            if args and isinstance(args[0], torch.Tensor):
                ranks.setdefault(_name, set()).add(args[0].dim())
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            work(*batch.args, **batch.kwargs)
    except Exception as exc:
        raise BadInputError(f"the model does not run on example_inputs: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]}") from exc
    finally:
        for h in handles:
            h.remove()
    return ranks


def fold(
    module: nn.Module,
    data: Any = None,
    *,
    device: str | torch.device | None = None,
    estimator: str = "unbiased",
    allow_reused_bn: bool = False,
    inplace: bool = False,
    example_inputs: Any = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> TorchFoldResult:
    """Freeze (with ``data``) and fold the BatchNorm modules of ``module``.

    With ``data`` every BN is calibrated first (:func:`bnfold.torch.calibrate`, Algorithm 2 or
    ``estimator='pooled'``). Without, a BN in training mode or with ``track_running_stats=False``
    is an error; eval-mode BNs keep their running statistics. ``example_inputs`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs) lets bnfold see BN input ranks when no
    data is given; a Linear -> BatchNorm1d fold needs them (the BN input must be (N, C)).

    Returns :class:`TorchFoldResult`: ``module`` is an ``fx.GraphModule`` in eval mode that computes
    the frozen model's function (folded BNs removed, their producers' weights scaled in float64 and
    cast back), and ``report`` has one :class:`BnRecord` per BN. ``module`` passed in is not changed
    unless ``inplace=True``; then it is frozen in place (it becomes the frozen, unfolded model) and
    shares its unfolded parameters with the result.

    Raises :class:`UnsupportedModelError` where ``torch.fx`` cannot trace the module (export it to
    ONNX instead), :class:`BadInputError` for missing or bad data.
    """
    _check_estimator(estimator)
    if not isinstance(module, nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    flags = {m: m.training for m in module.modules()}
    try:  # fail before calibrating when the module cannot be traced (as the eval-mode module it becomes)
        module.eval()
        trace(module, allow_unchecked_hooks=data is not None or example_inputs is not None)
    finally:
        for m, flag in flags.items():
            m.training = flag
    modes = {name: bn_mode(m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)}

    warnings: list[str] = []
    stats: dict[str, FrozenStats] = {}
    batch_size = samples = None
    ranks: dict[str, set[int]] | None = None
    if data is not None:
        run = run_calibration(module, data, device=device, estimator=estimator, allow_reused_bn=allow_reused_bn,
                              inplace=inplace, progress=progress)
        work, stats, ranks = run.module, run.stats, run.ranks
        warnings.extend(run.warnings)
        batch_size, samples = run.batch_size, run.samples
        dev = torch.device(device) if device is not None else module_device(work)
    else:
        targets = _calibration_targets(module, warnings)
        live = [n for n, m in targets if bn_mode(m) is Mode.TRAINING]
        if live:
            shown = ", ".join(f"'{n}'" for n in live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
            raise BadInputError(
                f"BN {shown} normalise with batch statistics (training mode or track_running_stats=False); "
                "pass calibration data so bnfold can compute population statistics, or call .eval() first "
                "if their running statistics are the ones to keep"
            )
        work = module if inplace else copy_module(module)
        dev = torch.device(device) if device is not None else module_device(work)
        if device is not None and module_device(work) != dev:
            work.to(dev)
        work.eval()
    bns = [(n, m) for n, m in _calibration_targets(work, []) if m.running_mean is not None]
    example = run.first_batch if data is not None else None
    if data is None and example_inputs is not None:
        example = as_batch(tuple(example_inputs) if isinstance(example_inputs, list) else example_inputs,
                           dev, float_dtype(work))
        ranks = _probe_ranks(work, example, bns)

    gm = trace(work, example)  # checked against the frozen module on the example
    gm.eval()
    hooked = hooked_modules(work)
    if hooked:
        warnings.append("forward hooks on " + ", ".join(f"'{h}'" if h else "the root module" for h in hooked)
                        + " are not part of the folded module (torch.fx traces through those modules); it was "
                        "checked to compute the same outputs on the data")
    private = not inplace
    uses, calls = _tensor_uses(gm)
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _BatchNorm):
            sites.setdefault(node.target, []).append(node)

    # graph order, so that in conv -> bn1 -> bn2 the second BN sees the conv once the first is folded
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    order = sorted(bns, key=lambda nb: position[sites[nb[0]][0]] if nb[0] in sites else len(position))
    records: dict[str, BnRecord] = {}
    for name, bn in order:
        nodes = sites.get(name, [])
        rec = BnRecord(name=name, mode_before=modes.get(name, Mode.INFERENCE), action=Action.FROZEN_KEPT,
                       channels=int(bn.running_mean.shape[0]), stats=stats.get(name))
        if not nodes:
            warnings.append(f"BN '{name}' is not used by forward; it is not part of the folded module")
            continue
        site_ranks = ranks.get(name) if ranks is not None else None
        plans = []
        try:
            for node in nodes:
                plans.append(_plan_site(node, bn, name, gm, uses, calls, site_ranks))
        except _Refusal as ref:
            rec.reason, rec.detail = ref.reason, ref.detail
            if len(nodes) > 1:
                rec.detail = f"applied at {len(nodes)} places; {ref.detail}"
            records[name] = rec
            continue
        for node, (p, w_new, b_new) in zip(nodes, plans):
            _apply(gm, node, p, w_new, b_new, private)
        rec.action = Action.FOLDED
        rec.direction = "backward"
        rec.target = ", ".join(p.name for p, _, _ in plans)
        rec.detail = (f"applied at {len(nodes)} places; folded into each producer" if len(nodes) > 1
                      else f"folded into {plans[0][0].label}")
        if any(p.shared for p, _, _ in plans):
            rec.reason = Reason.SHARED_WEIGHT_CLONED
            rec.detail += " (its weights serve other calls too: folded into a private copy)"
        records[name] = rec

    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()
    extra: dict[str, Any] = {"frontend": "torch", "torch_version": torch.__version__}
    if samples is not None and data is not None:
        extra["calibration_samples"] = samples
    report = Report(
        input_path=None, output_path=None, input_sha256=None, output_sha256=None, estimator=estimator,
        batch_size=batch_size, calibrated=data is not None,
        bns=[records[name] for name, _ in bns if name in records], warnings=warnings, extra=extra,
    )
    return TorchFoldResult(module=gm, report=report)
