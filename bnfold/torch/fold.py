"""Fold BatchNorm modules of a PyTorch module into their producers (docs/math.md sections 1 and 3).

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

As on the ONNX path, the fold is planned first (:mod:`bnfold.torch.plan`: a
:class:`bnfold.records.FoldPlan` with one decision per BN), then applied
(:mod:`bnfold.torch.apply`). The folded tensors are the producer kind's rule
(:mod:`bnfold.rules`: a Linear is the Gemm rule with transB=1) in float64 on host copies, cast back
to the producer's dtype with the same overflow/underflow refusal (``DTYPE_OVERFLOW``).
ConvTranspose with ``groups > 1`` scales each group's slice of the weight
(``torch.nn.utils.fusion`` gets this wrong).

The result is the ``fx.GraphModule`` with the folded producers' parameters replaced (new
``Parameter`` objects: the module that was traced keeps its own) and the folded BN nodes removed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold.data.stream import refuse_read_generator
from bnfold.errors import BadInputError
from bnfold.formulas.sufficiency import DEFAULT_TARGET_SE
from bnfold.records import Action, Drift, FrozenStats, Mode, Reason
from bnfold.run_records import BnRecord, Report
from bnfold.torch.apply import apply_folds
from bnfold.torch.batches import Batch, as_batch
from bnfold.torch.bn_kinds import bn_like_modules
from bnfold.torch.calibrate import (
    _calibration_targets,
    _check_estimator,
    bn_mode,
    check_recalibrate,
    copy_module,
    float_dtype,
    fold_candidates,
    module_device,
    run_calibration,
)
from bnfold.torch.device import check_device
from bnfold.torch.plan import plan_folds
from bnfold.torch.producers import channels_of
from bnfold.torch.trace import hooked_modules, trace
from bnfold.torch.wrappers import unwrap

__all__ = ["TorchFoldResult", "check_device", "fold", "trace"]  # trace: re-exported from .trace


@dataclass
class TorchFoldResult:
    """The folded module (an ``fx.GraphModule`` in eval mode) and the report of every BN."""

    module: nn.Module
    report: Report


# ----------------------------------------------------------------------------- the front end


def _probe_ranks(work: nn.Module, batch: Batch, bns: list[tuple[str, nn.Module]]) -> dict[str, set[int]]:
    """BN input ranks from one eval-mode forward on the example ``batch``."""
    ranks: dict[str, set[int]] = {}
    handles = []
    for name, m in bns:
        if isinstance(m, torch.jit.ScriptModule):  # takes no hooks (and is never folded: UNKNOWN_BN_FORWARD)
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
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
    recalibrate: str = "training",
    training_graph: bool = False,
    target_se: float = DEFAULT_TARGET_SE,
    distributed: bool | str = "auto",
) -> TorchFoldResult:
    """Freeze (with ``data``) and fold the BatchNorm modules of ``module``.

    With ``data`` the BNs ``recalibrate`` selects are calibrated first (Algorithm 2 or
    ``estimator='pooled'``): ``'training'`` (default) only those that normalise with batch
    statistics (``train()`` or ``track_running_stats=False``), eval-mode BNs keep their running
    statistics; ``'all'`` every BN, as :func:`bnfold.torch.calibrate` does, with each one's drift
    from its running statistics on its record. Without, a BN in training mode or with ``track_running_stats=False``
    is an error; eval-mode BNs keep their running statistics. ``example_inputs`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs) lets bnfold see BN input ranks when no
    data is given; a Linear -> BatchNorm1d fold needs them (the BN input must be (N, C)).
    ``training_graph=True`` calibrates on the module's training-time forward with Dropout and
    stochastic depth off (:mod:`bnfold.torch.training_graph`), so BNs reached only in training mode
    (auxiliary heads) get population statistics too; they are not in the folded (eval-mode) module.
    ``distributed``: as :func:`bnfold.torch.calibrate`'s (each rank passes its own part of ``data``;
    every rank gets the same statistics and the same folded module).

    Returns :class:`TorchFoldResult`: ``module`` is an ``fx.GraphModule`` in eval mode that computes
    the frozen model's function (folded BNs removed, their producers' weights scaled in float64 and
    cast back), and ``report`` has one :class:`BnRecord` per BN. ``module`` passed in is not changed
    unless ``inplace=True``; then it is frozen in place (it becomes the frozen, unfolded model) and
    shares its unfolded parameters with the result.

    Raises :class:`UnsupportedModelError` where ``torch.fx`` cannot trace the module (export it to
    ONNX instead), :class:`BadInputError` for missing or bad data or a ``device`` torch does not
    know, :class:`ProviderUnavailable` for a ``device`` this machine lacks (``'cuda'`` without CUDA).
    """
    _check_estimator(estimator)
    check_recalibrate(recalibrate)
    refuse_read_generator(data)
    if recalibrate == "all" and data is None:
        raise BadInputError("recalibrate='all' re-estimates every BN on data; pass calibration data (the data "
                            "argument)")
    if training_graph and data is None:
        raise BadInputError("training_graph=True calibrates on the training-time forward; pass calibration data "
                            "(the data argument)")
    if not isinstance(module, nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    module, unwrapped = unwrap(module)  # torch.compile / DataParallel / AveragedModel: fold the model inside
    check_device(device)
    flags = {m: m.training for m in module.modules()}
    try:  # fail before calibrating when the module cannot be traced (as the eval-mode module it becomes)
        module.eval()
        trace(module, allow_unchecked_hooks=data is not None or example_inputs is not None)
    finally:
        for m, flag in flags.items():
            m.training = flag
    modes = {name: bn_mode(m) for name, m in bn_like_modules(module)}

    warnings: list[str] = list(unwrapped)
    stats: dict[str, FrozenStats] = {}
    drift: dict[str, Drift] = {}
    batch_size = samples = None
    ranks: dict[str, set[int]] | None = None
    if data is not None:
        run = run_calibration(module, data, device=device, estimator=estimator, allow_reused_bn=allow_reused_bn,
                              inplace=inplace, progress=progress, recalibrate=recalibrate,
                              training_graph=training_graph, target_se=target_se, distributed=distributed)
        work, stats, ranks, drift = run.module, run.stats, run.ranks, run.drift
        warnings.extend(run.warnings)
        batch_size, samples = run.batch_size, (run.samples if run.batches else None)
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
    bns = fold_candidates(work)
    example = run.first_batch if data is not None else None
    if data is not None and example is not None and ranks is not None:
        unseen = [(n, m) for n, m in bns if n not in ranks]  # BNs the calibration pass did not patch
        if unseen:
            ranks.update(_probe_ranks(work, example, unseen))
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
    plan = plan_folds(gm, bns, ranks, warnings)
    decided = {d.bn for d in plan.plan.decisions}
    leaf_calls = {str(node.target) for node in gm.graph.nodes if node.op == "call_module"}
    inside: dict[str, str] = {}  # BN -> the module fx calls whole (a leaf) that holds it
    for name, _ in bns:
        if name not in decided:
            owner = next((t for t in sorted(leaf_calls) if name.startswith(t + ".")), None)
            if owner is not None:
                inside[name] = owner
                unused = f"BN '{name}' is not used by forward; it is not part of the folded module"
                warnings[:] = [w for w in warnings if w != unused]
    training_only = [n for n in stats if n not in decided and n not in inside]
    for name in training_only:  # calibrated on the training-time forward, absent from the eval graph
        unused = f"BN '{name}' is not used by forward; it is not part of the folded module"
        warnings[:] = [w for w in warnings if w != unused]
        warnings.append(f"BN '{name}' runs only in the training-time forward: calibrated (training_graph=True), "
                        "not part of the folded (eval-mode) module")
    apply_folds(gm, plan, private=not inplace)
    bn_of = dict(bns)
    records = {d.bn: BnRecord(name=d.bn, mode_before=modes.get(d.bn, Mode.INFERENCE), action=d.action,
                              target=d.target, direction=d.direction, reason=d.reason, detail=d.detail,
                              channels=channels_of(bn_of[d.bn]), stats=stats.get(d.bn), drift=drift.get(d.bn))
               for d in plan.plan.decisions}
    for name, owner in inside.items():
        records[name] = BnRecord(
            name=name, mode_before=modes.get(name, Mode.INFERENCE), action=Action.FROZEN_KEPT,
            reason=Reason.IN_SUBGRAPH, channels=channels_of(bn_of[name]), stats=stats.get(name),
            drift=drift.get(name), detail=f"inside '{owner}', which torch.fx calls as one module (a leaf): "
            "kept there, frozen")

    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()
    extra: dict[str, Any] = {"frontend": "torch", "torch_version": torch.__version__}
    if samples is not None and data is not None:
        extra["calibration_samples"] = samples
    if data is not None:
        extra["calibration"] = {"world_size": run.world_size, "samples": samples, "batches": run.batches}
    if training_graph:
        extra["training_graph"] = True
        extra["training_only_bns"] = training_only
    report = Report(
        input_path=None, output_path=None, input_sha256=None, output_sha256=None, estimator=estimator,
        batch_size=batch_size, calibrated=data is not None,
        bns=[records[name] for name, _ in bns if name in records], warnings=warnings, extra=extra,
        recalibrate=recalibrate,
    )
    return TorchFoldResult(module=gm, report=report)
