"""Issue 15 point 2: ``recalibrate='training'|'all'`` (``--recalibrate``). By default only BNs that
normalise with batch statistics get new statistics; inference BNs keep theirs and the calibration
network normalises them with those (as the deployed model will). ``'all'`` re-estimates every BN
and says so. Real onnx models, real onnxruntime, real torch; numpy float64 references."""
from __future__ import annotations

import json
from pathlib import Path

import npref
import numpy as np
import onnx
import pytest
from bnfold.cli.main import main
from conftest import bn, bn_params, init, make_model, ort_run, rand, record, vi
from onnx import helper

from bnfold.api import fold
from bnfold.errors import BadInputError
from bnfold.records import Mode
from bnfold.report.summary import summary_text

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
UNFOLDABLE, UNFOLDABLE_DATA = SAMPLES / "unfoldable.onnx", SAMPLES / "unfoldable_calib.npz"
EPS = 1e-5
BATCH = 4


def _training_bn(name: str, x: str, y: str, p: dict[str, np.ndarray]) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    names = [f"{name}.{k}" for k in ("scale", "bias", "mean", "var")]
    node = helper.make_node("BatchNormalization", [x, *names], [y, f"{name}.rm", f"{name}.rv"], name=name, epsilon=EPS,
                            training_mode=1)
    return node, [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]


def _alg2(acts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2 (weighted form) in float64 from per-batch BN inputs."""
    s_m = s_m1 = 0
    s_mu = s_var = 0.0
    for a in acts:
        a = np.asarray(a, np.float64)
        m = a.shape[0] * int(np.prod(a.shape[2:]))
        s_m, s_m1 = s_m + m, s_m1 + m - 1
        s_mu = s_mu + m * a.mean(axis=(0, 2, 3))
        s_var = s_var + m * a.var(axis=(0, 2, 3))
    return s_mu / s_m, s_var / s_m1


def _batch_bn(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return npref.batchnorm(x, p["scale"], p["bias"], x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), EPS)


def _mixed_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """conv1 -> inference BN 'inf' -> relu -> conv2 -> training BN 'train'."""
    w1, w2 = rand(rng, 4, 3, 3, 3), rand(rng, 5, 4, 3, 3)
    p_inf, p_train = bn_params(rng, 4), bn_params(rng, 5)
    n_inf, i_inf = bn("inf", "z1", "b1", p_inf, eps=EPS)
    n_train, i_train = _training_bn("train", "z2", "y", p_train)
    model = make_model([helper.make_node("Conv", ["x", "w1"], ["z1"], name="conv1", pads=[1] * 4), n_inf,
                        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
                        helper.make_node("Conv", ["r1", "w2"], ["z2"], name="conv2", pads=[1] * 4), n_train],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w1", w1), init("w2", w2)] + i_inf + i_train)
    x = (rng.standard_normal((10, 3, 6, 5)) * 2.0 + 3.0).astype(np.float32)
    return model, {"w1": w1, "w2": w2, **{f"inf.{k}": v for k, v in p_inf.items()},
                   **{f"train.{k}": v for k, v in p_train.items()}}, x


def _split(p: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(name + ".")}


def test_default_keeps_inference_stats_and_calibrates_training_bns_through_them(rng: np.random.Generator) -> None:
    """The inference BN keeps its statistics; the training BN's statistics are Algorithm 2 over a
    network in which the inference BN normalises with its STORED statistics (the deployed model)."""
    model, p, x = _mixed_model(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH)
    assert res.report.recalibrate == "training"
    inf, train = record(res, "inf"), record(res, "train")
    assert inf.mode_before is Mode.INFERENCE and inf.stats is None and inf.drift is None
    assert train.mode_before is Mode.TRAINING and train.stats is not None
    p_inf, p_train = _split(p, "inf"), _split(p, "train")
    z2 = []
    for i in range(0, len(x), BATCH):
        z1 = npref.conv(x[i:i + BATCH], p["w1"], pads=[1] * 4)
        b1 = npref.batchnorm(z1, p_inf["scale"], p_inf["bias"], p_inf["mean"], p_inf["var"], EPS)  # stored stats
        z2.append(npref.conv(np.maximum(b1, 0), p["w2"], pads=[1] * 4))
    mean, var = _alg2(z2)
    # float32 activations through two convs (k=27 and 36 terms): ~1e-6 relative; 1e-5 leaves room
    np.testing.assert_allclose(train.stats.mean, mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
    np.testing.assert_allclose(train.stats.var, var, rtol=1e-5)
    assert res.report.verification is not None and res.report.verification.passed
    # the folded model computes the deployed function: stored stats for 'inf', Algorithm 2 for 'train'
    b1 = npref.batchnorm(npref.conv(x[:2], p["w1"], pads=[1] * 4), p_inf["scale"], p_inf["bias"], p_inf["mean"],
                         p_inf["var"], EPS)
    want = npref.batchnorm(npref.conv(np.maximum(b1, 0), p["w2"], pads=[1] * 4), p_train["scale"],
                           p_train["bias"], mean, var, EPS)
    # float32 model vs float64 reference, |y| ~ 3: 1e-4 is ~30 ulp
    np.testing.assert_allclose(ort_run(res.model, {"x": x[:2]})[0], want, rtol=1e-4, atol=1e-4)


def test_all_reestimates_every_bn_with_the_training_network(rng: np.random.Generator) -> None:
    """recalibrate='all': both BNs get Algorithm 2 statistics, the downstream one computed with the
    upstream BN normalising per batch (Algorithm 2's training network), and each carries its drift."""
    model, p, x = _mixed_model(rng)
    res = fold(model, data={"x": x}, batch_size=BATCH, recalibrate="all")
    assert res.report.recalibrate == "all"
    p_inf = _split(p, "inf")
    z1 = [npref.conv(x[i:i + BATCH], p["w1"], pads=[1] * 4) for i in range(0, len(x), BATCH)]
    z2 = [npref.conv(np.maximum(_batch_bn(z, p_inf), 0), p["w2"], pads=[1] * 4) for z in z1]
    for name, acts in (("inf", z1), ("train", z2)):
        mean, var = _alg2(acts)
        st = record(res, name).stats
        assert st is not None
        np.testing.assert_allclose(st.mean, mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
        np.testing.assert_allclose(st.var, var, rtol=1e-5)
    assert record(res, "inf").drift is not None and record(res, "inf").drift.mean_shift_sigma_max is not None
    # a training-mode BN has no stored statistics to drift from: figures None, with the reason
    d = record(res, "train").drift
    assert d is not None and d.mean_shift_sigma_max is None and "batch statistics" in d.note
    assert "all 2 BN re-estimated" in summary_text(res.report)


def test_unfoldable_sample_keeps_its_outputs_by_default_and_changes_them_with_all() -> None:
    """The issue's reproduction: before, --data silently recalibrated the inference BNs (outputs off
    by up to 4.98 of max |y| 5.19 on the sample's own data) and verification passed regardless."""
    x = dict(np.load(UNFOLDABLE_DATA))
    original = ort_run(str(UNFOLDABLE), x)[0]
    kept = fold(str(UNFOLDABLE), data=str(UNFOLDABLE_DATA))
    assert all(b.stats is None for b in kept.report.bns) and kept.ok
    # folding reorders float32 arithmetic only: ~1e-7 of |y| ~ 5 (measured 9.5e-7)
    np.testing.assert_allclose(ort_run(kept.model, x)[0], original, rtol=1e-5, atol=1e-5)
    assert "all 4 keep their stored statistics" in summary_text(kept.report)
    redone = fold(str(UNFOLDABLE), data=str(UNFOLDABLE_DATA), recalibrate="all")
    assert all(b.stats is not None for b in redone.report.bns) and redone.ok
    assert float(np.abs(ort_run(redone.model, x)[0] - original).max()) > 1.0


def test_decomposed_pattern_counts_as_batch_statistics() -> None:
    """resnet_trs (torch track_running_stats=False export): the 8 decomposed BNs are recalibrated by
    default, the one ordinary inference BN keeps its statistics."""
    res = fold(str(SAMPLES / "resnet_trs.onnx"), data=str(SAMPLES / "trs_calib.npz"), verify=False, dry_run=True)
    with_stats = {b.name for b in res.report.bns if b.stats is not None}
    decomposed = {b.name for b in res.report.bns if b.mode_before is Mode.DECOMPOSED}
    assert len(decomposed) == 8 and with_stats == decomposed


def test_bad_recalibrate_values_are_bad_input(rng: np.random.Generator) -> None:
    model, _, x = _mixed_model(rng)
    with pytest.raises(BadInputError, match="recalibrate='sometimes'"):
        fold(model, data={"x": x}, recalibrate="sometimes", dry_run=True)
    node, inits = bn("bn", "x", "y", bn_params(rng, 3))
    plain = make_model([node], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], inits)
    with pytest.raises(BadInputError, match="pass calibration data"):
        fold(plain, recalibrate="all", dry_run=True)


def test_cli_recalibrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, rep = tmp_path / "all.onnx", tmp_path / "all.json"
    assert main(["fold", str(UNFOLDABLE), "--data", str(UNFOLDABLE_DATA), "-o", str(out), "--recalibrate", "all",
                 "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "all 4 BN re-estimated (--recalibrate all" in text and "Drift of the stored statistics" in text
    doc = json.loads(rep.read_text())
    assert doc["recalibrate"] == "all" and all(b["drift"]["mean_shift_sigma_max"] > 0.1 for b in doc["bns"])
    assert main(["fold", str(UNFOLDABLE), "-o", str(tmp_path / "x.onnx"), "--recalibrate", "all"]) == 2
    assert "--recalibrate all needs --data" in capsys.readouterr().err
    assert main(["fold", str(UNFOLDABLE), "-o", str(tmp_path / "x.onnx"), "--recalibrate", "some"]) == 2
    assert not (tmp_path / "x.onnx").exists()
