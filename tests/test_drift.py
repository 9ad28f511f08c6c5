"""Issue 15 point 3: drift of stored BN statistics from the data's (``bnfold inspect --data``,
``bnfold.inspect(model, data=...)``, ``fold(recalibrate='all')``'s records). Figures against a numpy
float64 computation on models whose stored statistics the test sets; real onnxruntime."""
from __future__ import annotations

import json
import math
from pathlib import Path

import npref
import numpy as np
import onnx
import pytest
from bnfold.cli.main import main
from conftest import bn, bn_params, init, make_model, rand, vi
from onnx import helper

from bnfold.api import fold, inspect
from bnfold.formulas.drift import drift, flagged
from bnfold.records import Drift

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
UNFOLDABLE, UNFOLDABLE_DATA = SAMPLES / "unfoldable.onnx", SAMPLES / "unfoldable_calib.npz"
EPS = 1e-5


def _alg2(acts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    s_m = s_m1 = 0
    s_mu = s_var = 0.0
    for a in acts:
        a = np.asarray(a, np.float64)
        m = a.shape[0] * int(np.prod(a.shape[2:]))
        s_m, s_m1 = s_m + m, s_m1 + m - 1
        s_mu = s_mu + m * a.mean(axis=(0, 2, 3))
        s_var = s_var + m * a.var(axis=(0, 2, 3))
    return s_mu / s_m, s_var / s_m1


def _expected(mu_s: np.ndarray, var_s: np.ndarray, mu_d: np.ndarray, var_d: np.ndarray) -> tuple[float, float, int]:
    """The issue's figures in float64 (with the BN's eps, see bnfold/formulas/drift.py)."""
    mu_s, var_s = mu_s.astype(np.float64), var_s.astype(np.float64)
    shift = np.abs(mu_s - mu_d) / np.sqrt(var_d + EPS)
    ratio = np.abs(np.log((var_s + EPS) / (var_d + EPS)))
    return float(shift.max()), float(ratio.max()), int(np.argmax(np.maximum(shift, ratio)))


def _conv_bn(rng: np.random.Generator, x: np.ndarray, batch: int) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray,
                                                                         np.ndarray, np.ndarray]:
    """Conv -> inference BN whose stored statistics are the data's, moved by known amounts: channel 2's
    mean by 0.5 sigma, channel 1's variance by a factor e^0.3, channel 3's variance by e^-0.1."""
    w = rand(rng, 4, 3, 3, 3)
    mu_d, var_d = _alg2([npref.conv(x[i:i + batch], w) for i in range(0, len(x), batch)])
    mu_s, var_s = mu_d.copy(), var_d.copy()
    mu_s[2] += 0.5 * math.sqrt(var_d[2] + EPS)
    var_s[1] = (var_d[1] + EPS) * math.exp(0.3) - EPS
    var_s[3] = (var_d[3] + EPS) * math.exp(-0.1) - EPS
    p = bn_params(rng, 4)
    p["mean"], p["var"] = mu_s.astype(np.float32), var_s.astype(np.float32)
    node, inits = bn("bn", "z", "y", p, eps=EPS)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), node],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", w)] + inits)
    return model, p["mean"], p["var"], mu_d, var_d


def test_inspect_drift_matches_a_float64_computation(rng: np.random.Generator) -> None:
    x = (rng.standard_normal((12, 3, 6, 5)) * 2.0 + 3.0).astype(np.float32)
    model, mu_s, var_s, mu_d, var_d = _conv_bn(rng, x, 4)
    (row,) = inspect(model, data={"x": x}, batch_size=4)
    d = row.drift
    assert d is not None and d.note == ""
    shift, ratio, worst = _expected(mu_s, var_s, mu_d, var_d)
    assert abs(shift - 0.5) < 1e-5 and abs(ratio - 0.3) < 1e-5 and worst == 2  # the amounts the test set
    # data statistics from float32 activations (27-term convs, ~1e-7 relative): figures of order 0.5
    # agree to ~1e-6 absolute; 1e-5 leaves a factor of 10
    assert d.mean_shift_sigma_max == pytest.approx(shift, abs=1e-5)
    assert d.log_var_ratio_max == pytest.approx(ratio, abs=1e-5)
    assert d.worst_channel == worst and flagged(d)
    assert inspect(model)[0].drift is None  # without data: nothing computed


def test_fold_recalibrate_all_carries_the_same_drift_record(rng: np.random.Generator) -> None:
    x = (rng.standard_normal((12, 3, 6, 5)) * 2.0 + 3.0).astype(np.float32)
    model, *_ = _conv_bn(rng, x, 4)
    (row,) = inspect(model, data={"x": x}, batch_size=4)
    res = fold(model, data={"x": x}, batch_size=4, recalibrate="all", dry_run=True)
    (rec,) = res.report.bns
    assert rec.drift == row.drift  # the same computation, the same numbers
    assert fold(model, data={"x": x}, batch_size=4, dry_run=True).report.bns[0].drift is None  # default: kept


def test_stats_equal_to_the_data_have_no_drift_and_a_training_bn_has_a_note(rng: np.random.Generator) -> None:
    x = (rng.standard_normal((8, 3, 4, 4)) + 1.0).astype(np.float32)
    p = bn_params(rng, 3)
    mu, var = _alg2([x])
    p["mean"], p["var"] = mu.astype(np.float32), var.astype(np.float32)
    n1, i1 = bn("fresh", "x", "h", p, eps=EPS)
    p2 = bn_params(rng, 3)
    names = [f"t.{k}" for k in ("scale", "bias", "mean", "var")]
    n2 = helper.make_node("BatchNormalization", ["h", *names], ["y", "t.rm", "t.rv"], name="t", epsilon=EPS,
                          training_mode=1)
    model = make_model([n1, n2], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)],
                       i1 + [init(n, p2[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))])
    fresh, train = inspect(model, data={"x": x})
    assert fresh.drift is not None and fresh.drift.mean_shift_sigma_max is not None
    # only the float32 rounding of the stored values (~6e-8 relative) separates them
    assert fresh.drift.mean_shift_sigma_max < 1e-5 and fresh.drift.log_var_ratio_max < 1e-5
    assert not flagged(fresh.drift)
    assert train.drift == Drift(None, None, None, train.drift.note) and "training mode" in train.drift.note


def test_formula_edge_cases() -> None:
    # a dead channel (variance 0 in both) stays finite thanks to eps; channel counts that differ say so
    d = drift(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), EPS)
    assert d.mean_shift_sigma_max == 0.0 and d.log_var_ratio_max == 0.0
    d = drift(np.array([1.0]), np.array([0.0]), np.array([0.0]), np.array([0.0]), 0.0)
    assert d.mean_shift_sigma_max == math.inf and flagged(d) and d.worst_channel == 0
    assert drift(np.zeros(2), np.ones(2), np.zeros(3), np.ones(3), EPS).note.startswith("stored statistics have 2")


def test_unfoldable_sample_before_and_after_reestimation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sample's stored statistics are far from its calibration data (every BN flagged); after
    fold --recalibrate all its frozen model's statistics are the data's (no BN flagged)."""
    assert main(["inspect", str(UNFOLDABLE), "--data", str(UNFOLDABLE_DATA)]) == 0
    text = capsys.readouterr().out
    assert "mean shift (sigma)" in text and text.count("DRIFT") == 4 and "4 of 4 BN over the drift thresholds" in text
    assert main(["inspect", str(UNFOLDABLE), "--data", str(UNFOLDABLE_DATA), "--batch-size", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["drift"]["worst_channel"] is not None for r in rows] == [True] * 4
    assert min(r["drift"]["mean_shift_sigma_max"] for r in rows) > 0.1
    frozen = tmp_path / "frozen.onnx"
    assert main(["fold", str(UNFOLDABLE), "--data", str(UNFOLDABLE_DATA), "--recalibrate", "all", "-o",
                 str(tmp_path / "f.onnx"), "--frozen-output", str(frozen)]) == 0
    capsys.readouterr()
    after = inspect(str(frozen), data=str(UNFOLDABLE_DATA))
    # float32 storage of the written statistics only (same data, same estimator)
    assert all(r.drift is not None and r.drift.mean_shift_sigma_max is not None for r in after)
    assert max(r.drift.mean_shift_sigma_max for r in after) < 1e-4  # type: ignore[union-attr]
    assert max(r.drift.log_var_ratio_max for r in after) < 1e-4  # type: ignore[union-attr]


def test_inspect_cli_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(UNFOLDABLE), "--batch-size", "4"]) == 2
    assert "--batch-size needs --data" in capsys.readouterr().err
    assert main(["inspect", str(UNFOLDABLE), "--data", str(tmp_path / "missing.npz")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("bnfold: error:") and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(UNFOLDABLE), "--json"]) == 0
    assert all("drift" not in r for r in json.loads(capsys.readouterr().out))  # without --data: as before
