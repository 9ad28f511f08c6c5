"""Stage 6: verification. Reference (frozen, unfolded) vs candidate (folded) under onnxruntime.

Per execution provider: both models run with graph optimisations off on the same inputs, and
every output is compared (``metrics.compute_metrics``). Where more than one provider ran, the
reference is compared across providers too: that noise floor tells a folding error from provider
noise. Then, on the CPU, every fold site (see ``sites``) is compared, so a failure names the first
layer where the two models part. On failure, with ``repro_dir`` set, a repro bundle is written (``repro``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from bnfold.environment import runtime_environment
from bnfold.errors import BadInputError, ProviderUnavailable, UnsupportedModelError, first_line
from bnfold.onnx.runtime import CUDA_SETTINGS, make_session, make_session_from_model
from bnfold.run_records import ProviderRun, SiteResult, VerifyResult
from bnfold.verification import noise_floor as nf
from bnfold.verification.config import VerifyConfig
from bnfold.verification.metrics import compute_metrics_batched
from bnfold.verification.reference_session import ReferenceSession, needs_reference
from bnfold.verification.repro import write_bundle
from bnfold.verification.sites import Site, find_sites, with_outputs, worst_channels
from bnfold.verification.tolerances import check_tolerance_names, resolve_tolerances

log = logging.getLogger(__name__)

Feeds = Sequence[Mapping[str, np.ndarray]]
_SITE_FEEDS = 2  # fold-site localisation runs on the first few feeds: bounded memory
#: how a provider run's note begins when the candidate could not run (it then compares no outputs)
CANDIDATE_FAILED = "candidate failed to run"


def _dtype_name(ort_type: str) -> str:
    t = ort_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(t, t)


def _hash_feeds(feeds: Feeds) -> dict[str, str]:
    out: dict[str, Any] = {}
    for feed in feeds:
        for name, arr in feed.items():
            out.setdefault(name, hashlib.sha256()).update(np.ascontiguousarray(arr).tobytes())
    return {k: h.hexdigest() for k, h in out.items()}


class _CandidateFailed(Exception):
    pass


def _whole_reason(exc: BaseException, limit: int = 600) -> str:
    """onnxruntime's whole message on one line (its later lines say what was expected: "index: 0
    Got: 1 Expected: 8"), cut at ``limit`` characters."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Ticker:
    """The progress hook: ``config.progress(done, total)`` after each model run on one batch."""

    def __init__(self, config: VerifyConfig, total: int) -> None:
        self.fn, self.done, self.total = config.progress, 0, total

    def __call__(self, steps: int = 1) -> None:
        if self.fn is not None:
            self.done = min(self.total, self.done + steps)
            self.fn(self.done, self.total)

    def finish(self) -> None:
        if self.done < self.total:
            self(self.total - self.done)


Session = Any  # an onnxruntime.InferenceSession or a ReferenceSession (the same few methods)


def _open(path: str, provider: str, tf32: bool) -> Session:
    """A session of the model at ``path``; on the CPU, onnx's reference evaluator where onnxruntime
    lacks a kernel the model needs (float64 Conv)."""
    try:
        return make_session(path, provider, tf32=tf32)
    except UnsupportedModelError as exc:
        if provider != "cpu" or not needs_reference(str(exc), onnx.load(path, load_external_data=False)):
            raise
        log.info("onnxruntime cannot run %s (%s): onnx's reference evaluator runs it", path, first_line(exc))
        return ReferenceSession(path)


def _run_all(sess: Session, names: list[str], feeds: Feeds, *,
             reference: bool = True, tick: _Ticker | None = None) -> list[list[np.ndarray]]:
    """Outputs per name (a list over feeds). A reference that cannot run is bad input."""
    inputs = [i.name for i in sess.get_inputs()]
    per: list[list[np.ndarray]] = [[] for _ in names]
    for k, feed in enumerate(feeds):
        missing = [n for n in inputs if n not in feed]
        if missing:
            raise BadInputError(f"verification batch {k} lacks model input(s) {', '.join(missing)}; "
                                "give a value for every model input")
        try:
            values = sess.run(names, {n: feed[n] for n in inputs})
        except Exception as exc:  # onnxruntime's own exception types
            if not reference:
                raise _CandidateFailed(f"(verification batch {k}): {_whole_reason(exc)}") from exc
            raise BadInputError(f"onnxruntime cannot run the reference model on verification batch {k}: "
                                f"{first_line(exc)}; check the inputs' shapes and dtypes") from None
        for slot, value in enumerate(values):
            per[slot].append(value)
        if tick is not None:
            tick()
    return per


def _provider_run(reference: str, candidate: str, provider: str, feeds: Feeds, config: VerifyConfig,
                  floors: dict[str, np.ndarray],
                  tick: _Ticker | None = None) -> tuple[ProviderRun, dict[str, list[np.ndarray]] | None]:
    try:
        ref = _open(reference, provider, config.tf32)
        cand = _open(candidate, provider, config.tf32)
    except ProviderUnavailable as exc:
        if not config.allow_missing_providers:
            raise
        return ProviderRun(provider, "skipped", (), True, note=str(exc)), None
    names = [o.name for o in ref.get_outputs()]
    cand_names = {o.name for o in cand.get_outputs()}
    if set(names) != cand_names:
        raise BadInputError(
            f"reference and candidate have different outputs ({sorted(names)} vs {sorted(cand_names)}); "
            "compare models with the same interface")
    ref_inputs = {i.name: i.type for i in ref.get_inputs()}
    cand_inputs = {i.name: i.type for i in cand.get_inputs()}
    if ref_inputs != cand_inputs:
        def listed(inputs: dict[str, str]) -> str:
            return ", ".join(f"{n!r}: {t}" for n, t in sorted(inputs.items())) or "none"
        raise BadInputError(
            f"reference and candidate have different inputs ({listed(ref_inputs)} vs {listed(cand_inputs)}); "
            "compare models with the same interface")
    check_tolerance_names(names, config.atol, config.rtol)
    dtypes = {o.name: _dtype_name(o.type) for o in ref.get_outputs()}
    ref_out = _run_all(ref, names, feeds, tick=tick)
    try:
        cand_out = _run_all(cand, names, feeds, reference=False, tick=tick)
    except _CandidateFailed as exc:  # the candidate crashes where the reference runs: a failure
        return ProviderRun(provider, "ran", tuple(cand.get_providers()), False,
                           note=f"{CANDIDATE_FAILED} {exc}"), dict(zip(names, ref_out))
    metrics = []
    for name, r, c in zip(names, ref_out, cand_out):
        atol, rtol = resolve_tolerances(name, dtypes[name], config.atol, config.rtol)
        metrics.append(compute_metrics_batched(name, r, c, dtype=dtypes[name], atol=atol, rtol=rtol,
                                               error_stat=config.error_stat, quantile=config.quantile,
                                               floor=floors.get(name), margin=nf.MARGIN))
    passed = all(m.passed for m in metrics)
    cand_types = {o.name: _dtype_name(o.type) for o in cand.get_outputs()}
    other = [f"{m.name!r} is {cand_types[m.name]} in the candidate, {dtypes[m.name]} in the reference"
             for m in metrics if not m.passed and cand_types[m.name] != dtypes[m.name]]
    note = f"output dtypes differ: {'; '.join(other)}" if other else ""
    return (ProviderRun(provider, "ran", tuple(cand.get_providers()), passed, tuple(metrics), note=note),
            dict(zip(names, ref_out)))


def _noise_floor(base: dict[str, list[np.ndarray]], other: dict[str, list[np.ndarray]]
                 ) -> tuple[tuple[str, float], ...]:
    floor = []
    for name, refs in base.items():
        worst = 0.0
        for a, b in zip(refs, other.get(name, ())):
            if a.dtype.kind in "fc" and a.shape == b.shape and a.size:
                worst = max(worst, float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        floor.append((name, worst))
    return tuple(floor)


def _site_session(model: onnx.ModelProto, names: list[str], path: str, workdir: Path,
                  label: str) -> Session:
    """A CPU session of ``model`` (read without its external data) with ``names`` as outputs too.

    The copy is built in memory, without the weights: onnxruntime reads those from the folder of
    ``path`` (``make_session_from_model``), so a model of any size costs neither a load of its
    weights nor a copy of them. Where this onnxruntime cannot do that, the weights are loaded and
    the copy is written to ``workdir`` (with external data beyond protobuf's 2 GiB limit).
    """
    exposed = with_outputs(model, names)
    try:
        return make_session_from_model(exposed, Path(path).parent)
    except Exception:  # an onnxruntime without the external-data folder option, or not serialisable
        pass
    del exposed
    full = with_outputs(onnx.load(path), names)
    out = workdir / f"{label}_sites.onnx"
    try:
        out.write_bytes(full.SerializeToString())
    except (ValueError, EncodeError):  # over 2 GiB (EncodeError with upb protobuf): weights beside it
        onnx.save_model(full, str(out), save_as_external_data=True, location=f"{label}.data")
    del full
    return _open(str(out), "cpu", False)


def _localize(reference: str, candidate: str, feeds: Feeds, config: VerifyConfig, workdir: Path,
              floors: dict[str, np.ndarray]) -> tuple[SiteResult, ...]:
    """Fold sites compared on the CPU. A diagnosis: any failure here means no sites, never a
    different verdict or an error."""
    try:
        return _localize_sites(reference, candidate, feeds, workdir, floors)
    except Exception as exc:  # noqa: BLE001 - localisation must never hide the verdict
        log.debug("fold-site localisation skipped: %s", first_line(exc))
        return ()


def _localize_sites(reference: str, candidate: str, feeds: Feeds, workdir: Path,
                    floors: dict[str, np.ndarray]) -> tuple[SiteResult, ...]:
    models = (onnx.load(reference, load_external_data=False), onnx.load(candidate, load_external_data=False))
    sites = find_sites(*models)
    if not sites:
        return ()
    names = [s.tensor for s in sites]
    few = list(feeds[:_SITE_FEEDS])
    ref_s = _site_session(models[0], names, reference, workdir, "ref")
    cand_s = _site_session(models[1], names, candidate, workdir, "cand")
    ref_v = _run_all(ref_s, names, few)
    cand_v = _run_all(cand_s, names, few, reference=False)
    results = []
    for site, r, c in zip(sites, ref_v, cand_v):
        dtype = str(r[0].dtype)
        atol, rtol = resolve_tolerances(site.tensor, dtype, (None, {}), (None, {}))
        m = compute_metrics_batched(site.tensor, r, c, dtype=dtype, atol=atol, rtol=rtol,
                                    floor=floors.get(site.tensor), margin=nf.MARGIN)
        ra, ca = np.concatenate(r), np.concatenate(c)
        results.append(SiteResult(site.bn, site.tensor, site.target, site.direction, site.position,
                                  m.max_abs, m.max_rel, atol, rtol, m.passed, worst_channels(ra, ca),
                                  m.floor_max))
    return tuple(results)


RULE_STRICT = "|candidate - reference| <= atol + rtol * |reference|"
RULE = f"{RULE_STRICT} or |candidate - reference| <= {nf.MARGIN:g} * floor"


def _floors(reference: str, candidate: str, feeds: Feeds, config: VerifyConfig
            ) -> tuple[nf.FloorSettings, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The noise floors of the reference's outputs and fold-site tensors (``noise_floor``).

    Measured on the CPU (the floor is a property of the reference's conditioning, not of the
    provider). Estimation never decides a verdict by failing: any error means no floor (recorded
    with the reason), i.e. the strict tolerance rule.
    """
    if not config.noise_floor:
        return nf.FloorSettings(None, note="off (noise_floor=False)"), {}, {}
    try:
        return _estimate_floors(reference, candidate, feeds)
    except BadInputError:
        raise  # the reference cannot run on these inputs: the provider runs say so the same way
    except Exception as exc:  # noqa: BLE001 - a floor that cannot be estimated is no floor
        log.debug("noise floor not estimated: %s", first_line(exc))
        return nf.FloorSettings("perturbation", note=f"not estimated: {first_line(exc)}"), {}, {}


def _estimate_floors(reference: str, candidate: str, feeds: Feeds
                     ) -> tuple[nf.FloorSettings, dict[str, np.ndarray], dict[str, np.ndarray]]:
    ref_light = onnx.load(reference, load_external_data=False)
    sites: list[Site] = find_sites(ref_light, onnx.load(candidate, load_external_data=False))
    full = nf.load_with_weights(reference)
    if full is None:
        return nf.FloorSettings("perturbation", note=f"not estimated: weights over {nf.MAX_BYTES} bytes"), {}, {}
    outputs = [o.name for o in full.graph.output]
    site_names = [s.tensor for s in sites if s.tensor not in outputs]
    few = list(feeds[:_SITE_FEEDS])
    base = _ref_values(with_outputs(full, site_names), outputs, site_names, feeds, few)
    draws = [_ref_values(with_outputs(m, site_names), outputs, site_names, feeds, few)
             for m in nf.perturbed_models(full, sites)]
    floors = nf.deviation_floors(base, draws)
    site_floors = nf.deviation_floors({k: v[:_SITE_FEEDS] for k, v in base.items()},
                                      [{k: v[:_SITE_FEEDS] for k, v in d.items()} for d in draws])
    return nf.FloorSettings("perturbation"), {k: floors[k] for k in outputs if k in floors}, site_floors


def _ref_values(model: onnx.ModelProto, outputs: list[str], extra: list[str], feeds: Feeds,
                few: Feeds) -> dict[str, list[np.ndarray]]:
    """The model's outputs over every feed, and ``extra`` tensors over the first few."""
    try:
        sess: Session = make_session_from_model(model, ".")
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        if not needs_reference(str(exc), model):
            raise
        sess = ReferenceSession(model)
    values = dict(zip(outputs, _run_all(sess, outputs, feeds)))
    if extra:
        values.update(zip(extra, _run_all(sess, extra, few)))
    return values


def _judge(reference: str, candidate: str, feeds: Feeds, config: VerifyConfig, out_floors: dict[str, np.ndarray],
           site_floors: dict[str, np.ndarray]
           ) -> tuple[list[ProviderRun], dict[str, dict[str, list[np.ndarray]]], tuple[SiteResult, ...]]:
    """Every provider run and the fold sites, judged with the given floors (none: the strict rule)."""
    runs: list[ProviderRun] = []
    outputs_by_provider: dict[str, dict[str, list[np.ndarray]]] = {}
    tick = _Ticker(config, 2 * len(feeds) * len(config.providers))
    for provider in config.providers:
        run, ref_out = _provider_run(reference, candidate, provider, feeds, config, out_floors, tick)
        if ref_out is not None:
            outputs_by_provider[provider] = ref_out
        runs.append(run)
    tick.finish()  # a skipped provider or a candidate that stopped early: the bar still ends
    ran = [p for p in config.providers if p in outputs_by_provider]
    if len(ran) > 1:
        base = outputs_by_provider[ran[0]]
        runs = [r if r.status != "ran" or r.provider == ran[0] else
                ProviderRun(r.provider, r.status, r.used, r.passed, r.outputs,
                            _noise_floor(base, outputs_by_provider[r.provider]), r.note) for r in runs]
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as tmp:
        sites = _localize(reference, candidate, feeds, config, Path(tmp), site_floors) if config.localize else ()
    return runs, outputs_by_provider, tuple(sites)


def verify(reference: str | os.PathLike[str], candidate: str | os.PathLike[str], feeds: Feeds,
           config: VerifyConfig | None = None) -> VerifyResult:
    """Compare ``candidate`` with ``reference`` on ``feeds`` (a list of input dicts)."""
    config = config or VerifyConfig()
    reference, candidate = os.fspath(reference), os.fspath(candidate)
    feeds = list(feeds)
    if not feeds:
        raise BadInputError("no verification inputs: give at least one sample")
    # The floor costs two more runs of the reference, so it is measured only where the strict rule
    # (atol + rtol*|ref|) fails somewhere: then everything is judged again with it. A verification
    # that passes strictly records why no floor was measured.
    floor_settings = nf.FloorSettings("perturbation" if config.noise_floor else None,
                                      note="not needed: every output and fold site is within atol + rtol*|ref|"
                                      if config.noise_floor else "off (noise_floor=False)")
    runs, outputs_by_provider, sites = _judge(reference, candidate, feeds, config, {}, {})
    strict_failed = any(r.status == "ran" and not r.passed for r in runs) or any(not s.passed for s in sites)
    if config.noise_floor and strict_failed:
        floor_settings, out_floors, site_floors = _floors(reference, candidate, feeds, config)
        if out_floors or site_floors:
            runs, outputs_by_provider, sites = _judge(reference, candidate, feeds, replace(config, progress=None),
                                                      out_floors, site_floors)
    ran = [p for p in config.providers if p in outputs_by_provider]
    passed = bool(ran) and all(r.passed for r in runs if r.status == "ran")
    first = next((s.bn for s in sorted(sites, key=lambda s: s.position) if not s.passed), None)
    repro = None
    if not passed and ran and config.repro_dir:
        first_outputs = {name: values[0] for name, values in outputs_by_provider[ran[0]].items()}
        repro = write_bundle(config.repro_dir, reference, candidate, feeds, config, first_outputs)
    settings = {
        "graph_optimization_level": "ORT_DISABLE_ALL",
        "deterministic_compute": True,
        "tf32": config.tf32,
        "cuda": CUDA_SETTINGS if "cuda" in ran else None,
        "error_stat": config.error_stat,
        "quantile": config.quantile if config.error_stat == "quantile" else None,
        "atol": {"global": config.atol[0], "per_output": config.atol[1]},
        "rtol": {"global": config.rtol[0], "per_output": config.rtol[1]},
        "providers_requested": list(config.providers),
        "allow_missing_providers": config.allow_missing_providers,
        "noise_floor": nf.settings_record(floor_settings),
    }
    samples = sum(int(next(iter(f.values())).shape[0]) if f and np.ndim(next(iter(f.values()))) else 1 for f in feeds)
    inputs = dict(config.inputs, sha256=_hash_feeds(feeds))
    note = "" if ran else "no requested execution provider could run"
    rule = RULE if floor_settings.method else RULE_STRICT
    return VerifyResult(passed, samples, tuple(runs), sites, first, rule=rule, settings=settings, inputs=inputs,
                        environment=runtime_environment(), repro_dir=repro, note=note)
