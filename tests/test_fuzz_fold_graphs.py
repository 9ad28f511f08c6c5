"""Fuzz: random fold graphs (tests/fuzz_graphs.py) folded by ``bnfold.fold`` keep their function.

For each case the INPUT model and the folded model are both evaluated by the independent float64
numpy interpreter ``tests/reference_eval.py`` on the same inputs; a training-mode BN is evaluated
with population statistics computed here (Algorithm 2 over the same calibration batches, from the
numpy interpreter), which must also match the statistics bnfold reports. Every BN must be
accounted for (folded into a named node that is in the output, or kept with a reason), a node that
shares the weight without a BN must be unaffected, and the folded model must run in onnxruntime
(where onnxruntime runs the dtype: its CPU provider has no float64 Conv/ConvTranspose) and match.

Bounded for CI: ``BNFOLD_FUZZ_EXAMPLES`` cases (default 100, derandomized, no example database);
set it higher for a long run (``BNFOLD_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_fold_graphs.py``).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import ort_run
from fuzz_graphs import Case, build, cases, report_line
from hypothesis import HealthCheck, given, settings
from numpy.typing import NDArray
from onnx import numpy_helper
from reference_eval import Stats, evaluate

import bnfold
from bnfold.records import Action, Reason

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "100"))
COUNTS: Counter[str] = Counter()

# Tolerances on max|folded - reference| / max(1, max|reference|), both evaluated in float64 here.
# The only error is the folded weights and biases rounded back to the model's dtype: a relative
# half-ulp per value (1.1e-16, 6e-8, 4.9e-4), summed over at most ~110 products per output (3x3x3
# kernel, 4 input channels per group) with magnitudes up to ~3x the output scale. float64: 1e-9
# (a million ulps of headroom: the float64 fold itself reassociates); float32: 1e-4 (the brief's
# "relative to the output scale"); float16: 3e-2, ~5x a worst-case sum of 110 half-ulps/sqrt.
REL = {"float64": 1e-9, "float32": 1e-4, "float16": 3e-2}
# onnxruntime computes in the model's dtype (float16: every intermediate rounded, ~3 ops deep)
ORT_REL = {"float64": 1e-9, "float32": 1e-4, "float16": 5e-2}
# bnfold's statistics come from onnxruntime in the model's dtype; ours from float64: the BN
# inputs differ by the producer's rounding (float16: ~1e-3 relative; float32: ~1e-6)
STATS_REL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report_line(request, "fuzz fold graphs: " + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())))


def _ort_runs(case: Case) -> bool:
    """Whether onnxruntime's CPU provider has kernels for this case (no float64 Conv/ConvTranspose)."""
    return not (case.dtype == "float64" and case.op in ("Conv", "ConvTranspose"))


def _batches(data: NDArray[np.floating], batch_size: int | None) -> list[NDArray[np.floating]]:
    size = batch_size or len(data)
    return [data[i:i + size] for i in range(0, len(data), size)]


def _population_stats(model: onnx.ModelProto, batches: list[NDArray[np.floating]]) -> Stats:
    """Algorithm 2 (weighted): E = sum m_b mu_b / sum m_b, Var = sum m_b var_b / sum (m_b - 1),
    the batch statistics taken with every BN normalising by its batch (the training network)."""
    bns = {n.name: n.input[0] for n in model.graph.node if n.op_type == "BatchNormalization"}
    sums: dict[str, list[NDArray[np.float64] | int]] = {}
    for batch in batches:
        values = evaluate(model, {"x": batch}, outputs=list(bns.values()))
        for name, x in bns.items():
            v = values[x]
            axes = (0, *range(2, v.ndim))
            m = v.size // v.shape[1]
            s = sums.setdefault(name, [0, 0, np.zeros(v.shape[1]), np.zeros(v.shape[1])])
            s[0] = int(s[0]) + m
            s[1] = int(s[1]) + m - 1
            s[2] = s[2] + m * v.mean(axis=axes)
            s[3] = s[3] + m * v.var(axis=axes)
    return {name: (np.asarray(s[2]) / int(s[0]), np.asarray(s[3]) / int(s[1])) for name, s in sums.items()}


def _max_rel(got: NDArray[np.floating], ref: NDArray[np.floating]) -> float:
    assert got.shape == ref.shape
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _check_accounting(case: Case, built_expect: dict[str, str], result: bnfold.FoldResult,
                      folded: onnx.ModelProto) -> None:
    """Every BN folded into a node of the output, or kept (still there) with a reason."""
    records = {r.name: r for r in result.report.bns}
    assert set(records) == set(built_expect)
    node_names = {n.name for n in folded.graph.node}
    kept_bns = {n.name for n in folded.graph.node if n.op_type == "BatchNormalization"}
    for name, rec in records.items():
        COUNTS[f"{name}:{rec.action.value}"] += 1
        if rec.action is Action.FOLDED:
            assert rec.target in node_names and name not in kept_bns, (name, rec)
        else:
            assert rec.reason is not None and rec.detail and name in kept_bns, (name, rec)
        expected = built_expect[name]
        if expected == "folded" and rec.action is not Action.FOLDED:
            # float16 may refuse a value it cannot hold; nothing else may stop a fold the case allows
            assert case.dtype == "float16" and rec.reason is Reason.DTYPE_OVERFLOW, (name, rec, case)
        if expected == "kept":
            assert rec.action is Action.FROZEN_KEPT, (name, rec, case)
    for node in folded.graph.node:  # a frozen BN is in inference mode
        if node.op_type == "BatchNormalization":
            assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_a_random_fold_graph_keeps_its_function(case: Case) -> None:
    ort_ok = _ort_runs(case)
    if case.training and not ort_ok:  # calibration runs in onnxruntime
        case = replace(case, training=False)
    built = build(case)
    model = built.model
    rng = np.random.default_rng(case.seed + 1)
    dtype = np.dtype(case.dtype)
    x = rng.standard_normal((3, *built.input_shape)).astype(dtype)

    if ort_ok:  # the numpy interpreter agrees with onnxruntime on the input model itself
        got = ort_run(model, {"x": x})
        ref_batch = evaluate(model, {"x": x})  # training BNs use the batch's statistics, as in onnxruntime
        for o, r in zip(got, ref_batch.values()):
            assert _max_rel(o, r) <= ORT_REL[case.dtype], case

    data: NDArray[np.floating] | None = None
    batch_size: int | None = None
    stats: Stats = {}
    if case.training:
        data = rng.standard_normal((int(rng.integers(6, 13)), *built.input_shape)).astype(dtype)
        batch_size = [None, 2, 3, 4][int(rng.integers(0, 4))]
        stats = _population_stats(model, _batches(data, batch_size))

    result = bnfold.fold(model, data={"x": data} if data is not None else None, batch_size=batch_size,
                         verify=ort_ok)
    folded = result.model
    assert folded is not None
    # a correct fold passes verification (before the noise floor of issue 15, float16 outputs of
    # magnitude >= 16 failed by one ulp: test_float16_verification_... below)
    assert result.ok, result.report.verification
    _check_accounting(case, built.expect, result, folded)
    COUNTS[f"{case.op}/{case.dtype}/{'training' if case.training else 'inference'}"] += 1

    for rec in result.report.bns:  # bnfold's frozen statistics are Algorithm 2's
        if case.training:
            assert rec.stats is not None
            mean, var = stats[rec.name]
            tol = STATS_REL[case.dtype]
            np.testing.assert_allclose(rec.stats.mean, mean, rtol=tol, atol=tol * float(np.sqrt(var.max())))
            np.testing.assert_allclose(rec.stats.var, var, rtol=tol, atol=tol * float(var.max()))

    ref = evaluate(model, {"x": x}, stats=stats)
    out = evaluate(folded, {"x": x})
    assert list(out) == list(ref)
    for name in ref:
        assert _max_rel(out[name], ref[name]) <= REL[case.dtype], (name, case)

    if case.shared:  # the node that shares the weight but has no BN reads it unchanged
        shared = next(n for n in folded.graph.node if n.name == "op_shared")
        w = next(t for t in folded.graph.initializer if t.name == shared.input[1])
        np.testing.assert_array_equal(numpy_helper.to_array(w), built.weight)

    if ort_ok:
        for name, o in zip(ref, ort_run(folded, {"x": x})):
            assert _max_rel(o, ref[name]) <= ORT_REL[case.dtype], (name, case)


def test_float16_calibration_of_two_training_bns() -> None:
    """Found by this fuzz: onnxruntime's optimised calibration session returned the LAST training
    BN's batch statistics for an earlier one in a float16 model; float16 networks are calibrated
    unoptimised now (bnfold/stages/calibrate.py)."""
    case = Case(op="Conv", dtype="float16", where="both", chain=(), shared=False, training=True, bias=False,
                kernel=(1,), strides=(1,), dilations=(1,), pads=(0, 0), spatial=(1,))
    model = build(case).model
    data = np.random.default_rng(0).standard_normal((8, 1, 1)).astype(np.float16)
    mine = _population_stats(model, [data])
    result = bnfold.fold(model, data={"x": data})
    before = next(r for r in result.report.bns if r.name == "bn_before")
    assert before.stats is not None
    # bn_before normalises the input itself: its mean is the data's mean (float16 input, exact in float64)
    np.testing.assert_allclose(before.stats.mean, mine["bn_before"][0], rtol=1e-2)
    np.testing.assert_allclose(before.stats.var, mine["bn_before"][1], rtol=2e-2)


def test_float16_verification_of_a_correct_fold_with_large_outputs() -> None:
    """Found by this fuzz: onnxruntime's float16 results differ by one ulp (1/64 at 16..32) where the
    reference is near 0, above the default float16 atol of 1e-2, so a correct fold failed. The
    noise floor (issue 15; float16 weights perturbed by one ulp) now accepts it."""
    case = Case(op="Conv", dtype="float16", where="both", chain=("add",), shared=False, training=False, bias=True,
                groups=2, cin_g=2, cout_g=2, kernel=(3, 3, 2), strides=(1, 1, 1), dilations=(1, 1, 1),
                pad_mode="SAME_UPPER", pads=(0,) * 6, spatial=(7, 4, 2), seed=351330)
    model = build(case).model
    result = bnfold.fold(model)
    folded = result.model
    assert folded is not None
    x = np.random.default_rng(1).standard_normal((2, 4, 7, 4, 2)).astype(np.float16)
    ref, out = evaluate(model, {"x": x})["y"], evaluate(folded, {"x": x})["y"]
    assert _max_rel(out, ref) <= REL["float16"]  # the fold is right ...
    assert result.ok, result.report.verification  # ... and its verification should say so
