"""Builders of hand-made VerifyResult and Report records shared by the tests of bnfold.report
(test_report_json.py, test_report_summary.py, test_report_junit.py, test_report_markdown.py,
test_report_html.py): real metrics from compute_metrics, fold sites, passing and failing results."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bnfold.records import Action, FrozenStats, Mode, Reason
from bnfold.run_records import BnRecord, ProviderRun, Report, SiteResult, VerifyResult
from bnfold.verification.metrics import OutputMetrics, compute_metrics

SHA_IN = "a" * 64
SHA_OUT = "0123456789abcdef" * 4


def make_metrics(name: str = "logits", error: float = 1e-6, *, shape=(4, 10), atol: float = 1e-4,
                 rtol: float = 1e-4, seed: int = 0, dtype=np.float32, **kw) -> OutputMetrics:
    """Real metrics: a random reference and the same plus ``error`` (an all-positive shift)."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=shape).astype(dtype)
    cand = (ref.astype(np.float64) + error).astype(dtype)
    return compute_metrics(name, ref, cand, atol=atol, rtol=rtol, **kw)


def make_site(bn: str, position: int, max_abs: float, *, passed: bool | None = None,
              atol: float = 1e-4, channels=()) -> SiteResult:
    if passed is None:
        passed = bool(max_abs <= atol)
    return SiteResult(bn=bn, tensor=f"{bn}_out", target=f"{bn}_conv", direction="backward",
                      position=position, max_abs=max_abs, max_rel=max_abs * 10, atol=atol,
                      rtol=1e-4, passed=passed, worst_channels=tuple(channels))


SETTINGS = {
    "graph_optimization_level": "disabled",
    "tf32": False,
    "deterministic": True,
    "cudnn_conv_algo_search": "DEFAULT",
    "error_stat": "max",
    "quantile": None,
    "tolerances": {"atol": None, "rtol": None, "per_output": {}},
}
INPUTS = {
    "source": "random",
    "seed": 0,
    "val_range": (-1.0, 1.0),
    "iterations": 2,
    "data": None,
    "batch_size": 4,
    "sha256": {"input": "c" * 64},
}


def make_passing_result() -> VerifyResult:
    logits = make_metrics("logits", 2.5e-6)
    features = make_metrics("features", 1e-6, shape=(4, 3, 2, 2), seed=1)
    run = ProviderRun("cpu", "ran", ("CPUExecutionProvider",), True, (logits, features))
    sites = (make_site("layer1.0.bn1", 2, 3e-7), make_site("layer1.0.bn2", 5, 0.0))
    return VerifyResult(passed=True, samples=8, runs=(run,), sites=sites, settings=dict(SETTINGS),
                        inputs=dict(INPUTS), note="batch size 1")


def make_failing_result() -> VerifyResult:
    """cpu ran and fails on one output, cuda ran with a noise floor, rocm skipped; a fold site
    with '<' in its name diverges, one later site is inf and one nan."""
    ok = make_metrics("logits", 2e-6)
    bad = make_metrics("probs<&>", 0.25, shape=(4, 6), seed=2)
    cpu = ProviderRun("cpu", "ran", ("CPUExecutionProvider",), False, (ok, bad))
    cuda = ProviderRun("cuda", "ran", ("CUDAExecutionProvider", "CPUExecutionProvider"), False,
                       (make_metrics("logits", 3e-6), make_metrics("probs<&>", 0.5, shape=(4, 6))),
                       noise_floor=(("logits", 1.5e-6), ("probs<&>", float("inf"))),
                       note="TF32 off")
    rocm = ProviderRun("rocm", "skipped", (), False, note="ROCMExecutionProvider not available")
    sites = (
        make_site("stem.bn", 1, 1e-7),
        make_site("layer1.bn<1>", 4, 0.125, channels=((7, 0.125), (2, 0.01))),
        make_site("layer2.bn", 9, float("inf")),
        make_site("layer3.bn", 12, float("nan"), passed=False),
        make_site("head.bn", 15, 0.0),
    )
    return VerifyResult(
        passed=False, samples=4, runs=(cpu, cuda, rocm), sites=sites,
        first_divergent_site="layer1.bn<1>", settings=dict(SETTINGS, tf32=True),
        inputs=dict(INPUTS), environment={"gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54"},
        repro_dir="/tmp/bnfold-repro", note="2 of 3 providers ran",
    )


REF = {"path": "model.onnx", "sha256": SHA_IN}
CAND = {"path": "model.folded.onnx", "sha256": SHA_OUT}


def make_stats(gap: float, samples: int = 96) -> FrozenStats:
    return FrozenStats(
        mean=np.array([-0.5, 0.25, 1.5]),
        var=np.array([0.5, 2.0, 4.0]),
        var_unbiased=np.array([0.5, 2.0, 4.0]),
        var_pooled=np.array([0.75, 2.5, 4.5]),
        gap=gap,
        samples=samples,
        batches=np.int64(3),  # numpy ints must come out as JSON ints
    )


def make_report(**overrides) -> Report:
    bns = [
        BnRecord(
            name="layer1.0.bn1",
            mode_before=Mode.TRAINING,
            action=Action.FOLDED,
            target="layer1.0.conv1",
            direction="backward",
            channels=3,
            stats=make_stats(0.125),
        ),
        BnRecord(
            name="layer1.0.bn2",
            mode_before=Mode.DECOMPOSED,
            action=Action.FOLDED,
            target="layer1.0.conv2",
            direction="backward",
            reason=Reason.SHARED_WEIGHT_CLONED,
            detail="weight shared with layer2.0.conv2; folded into a copy",
            channels=3,
            stats=make_stats(0.5),
        ),
        BnRecord(
            name="head.bn",
            mode_before=Mode.INFERENCE,
            action=Action.FROZEN_KEPT,
            reason=Reason.PRODUCER_FANOUT,
            detail="head.conv output also feeds aux.conv",
            channels=np.int64(3),
            stats=None,
        ),
    ]
    verification = make_passing_result()
    fields = dict(
        input_path="in/model.onnx",
        output_path=Path("out/model.folded.onnx"),
        input_sha256=SHA_IN,
        output_sha256=SHA_OUT,
        estimator="unbiased",
        batch_size=32,
        calibrated=True,
        bns=bns,
        verification=verification,
        warnings=["opset 9 model: upgraded to 15"],
        dry_run=False,
        extra={"timing_s": {"fold": np.float64(0.25)}, "shape": (1, 3), "mode": Mode.TRAINING,
               "arr": np.arange(3)},
    )
    fields.update(overrides)
    return Report(**fields)
