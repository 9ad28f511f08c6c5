"""The float noise floor of the reference (issue 15 point 1): correct folds of ill-conditioned layers
pass, faults still fail.

Models are built with onnx.helper and run on onnxruntime. The ill-conditioned one is the issue's:
Conv2d(3, 4, 1) with bias 3000 then a BN (training mode for the fold, inference mode as the frozen
reference), inputs N(0, 1): the Conv output is ~3000 with a spread of ~1 per channel, so float32
rounds it to ~2.4e-4 and the BN's subtraction of the mean exposes that rounding. Faulty
candidates are folded by hand (numpy, float64, cast once to float32) with one mistake each.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import DOUBLE, bn, init, make_model, rand, vi
from onnx import helper

from bnfold.api import fold
from bnfold.run_records import VerifyResult
from bnfold.verification.config import VerifyConfig
from bnfold.verification.engine import verify
from bnfold.verification.metrics import compute_metrics
from bnfold.verification.noise_floor import MARGIN, channel_floor

C, EPS = 4, 1e-5


def _conv_bn(w: np.ndarray, b: np.ndarray, p: dict[str, np.ndarray], *, training: bool = False,
             elem: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv")]
    node, inits = bn("bn", "z", "y", p, eps=EPS, **({"training_mode": 1} if training else {}))
    if training:  # a training-mode BN has its running statistics as outputs too
        node.output.extend(["bn.running_mean", "bn.running_var"])
    return make_model(nodes + [node], [vi("x", ["N", 3, 8, 8], elem)], [vi("y", ["N", C, 8, 8], elem)],
                      [init("w", w), init("b", b), *inits])


def _offset(rng: np.random.Generator, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The issue's ill-conditioned layer: bias 3000, per-channel spread ~1, stored statistics exact."""
    w = (rng.standard_normal((C, 3, 1, 1)) * 0.6).astype(dtype)
    b = np.full(C, 3000.0, dtype)
    p = {"scale": rng.uniform(0.5, 2.0, C).astype(dtype), "bias": rng.standard_normal(C).astype(dtype),
         "mean": (b + rng.standard_normal(C) * 0.01).astype(dtype),  # E[Wx + b] = b for x ~ N(0, 1)
         "var": (np.sum(w.astype(np.float64) ** 2, axis=(1, 2, 3))).astype(dtype)}  # Var[Wx] = |w|^2
    return w, b, p


def _well(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    w = (rng.standard_normal((C, 3, 1, 1)) * 0.6).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    p = {"scale": rng.uniform(0.5, 2.0, C).astype(np.float32), "bias": rng.standard_normal(C).astype(np.float32),
         "mean": b.copy(), "var": np.sum(w.astype(np.float64) ** 2, axis=(1, 2, 3)).astype(np.float32)}
    return w, b, p


def _hand_fold(w: np.ndarray, b: np.ndarray, p: dict[str, np.ndarray], *, elem: int = onnx.TensorProto.FLOAT,
               scale_bias: bool = True, var: np.ndarray | None = None, perm: np.ndarray | None = None,
               bias_delta: np.ndarray | None = None) -> onnx.ModelProto:
    """Conv(W*s, beta + s*(b - mean)), with one optional mistake: the bias not scaled (a wrong
    fold), another variance (a wrong statistic), the scale permuted over channels (a wrong
    channel), or a delta added to the folded bias."""
    f = {k: v.astype(np.float64) for k, v in p.items()}
    s = f["scale"] / np.sqrt((f["var"] if var is None else var.astype(np.float64)) + EPS)
    if perm is not None:
        s = s[perm]
    wf = w.astype(np.float64) * s[:, None, None, None]
    bf = f["bias"] + (s if scale_bias else 1.0) * (b.astype(np.float64) - f["mean"])
    if bias_delta is not None:
        bf = bf + bias_delta
    node = helper.make_node("Conv", ["x", "wf", "bf"], ["y"], name="conv")
    return make_model([node], [vi("x", ["N", 3, 8, 8], elem)], [vi("y", ["N", C, 8, 8], elem)],
                      [init("wf", wf.astype(w.dtype)), init("bf", bf.astype(w.dtype))])


def _feeds(rng: np.random.Generator, n: int = 4, dtype: type = np.float32) -> list[dict[str, np.ndarray]]:
    return [{"x": rand(rng, 1, 3, 8, 8, dtype=dtype)} for _ in range(n)]


def _check(tmp_path: Path, ref: onnx.ModelProto, cand: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
           **config: object) -> VerifyResult:
    onnx.save(ref, tmp_path / "ref.onnx")
    onnx.save(cand, tmp_path / "cand.onnx")
    return verify(tmp_path / "ref.onnx", tmp_path / "cand.onnx", feeds, VerifyConfig(**config))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the model passes, and says why


def test_offset_model_folds_by_default_and_failed_before(tmp_path: Path, rng: np.random.Generator) -> None:
    """bnfold.fold with data on the training-mode offset model: the strict check (the old
    verdict) fails on rounding noise; the default verdict passes, and its record carries the floor,
    the margin and the rule."""
    w, b, p = _offset(rng)
    src = tmp_path / "offset.onnx"
    onnx.save(_conv_bn(w, b, p, training=True), src)
    data = {"x": rand(rng, 64, 3, 8, 8)}
    strict = fold(src, output=tmp_path / "strict.onnx", data=data, verify_config=VerifyConfig(noise_floor=False))
    assert not strict.ok and not (tmp_path / "strict.onnx").exists()
    assert strict.report.verification is not None
    assert strict.report.verification.max_abs > 1e-4  # the symptom: over the float32 atol
    assert strict.report.verification.settings["noise_floor"] == "off"
    res = fold(src, output=tmp_path / "folded.onnx", data=data)
    v = res.report.verification
    assert res.ok and v is not None and v.passed and (tmp_path / "folded.onnx").is_file()
    [out] = v.outputs
    assert out.floor_max is not None and out.max_abs > out.atol  # passed by the floor, not by atol
    assert out.max_abs <= MARGIN * out.floor_max
    assert v.settings["noise_floor"] == {"method": "perturbation", "margin": MARGIN, "draws": 2,
                                         "relative_step": "unit roundoff of the dtype (float32: 2**-24)"}
    assert f"{MARGIN:g} * floor" in v.rule
    [site] = v.sites
    assert site.passed and site.floor_max is not None and site.floor_max > 0


def test_floor_is_the_size_of_the_rounding(tmp_path: Path, rng: np.random.Generator) -> None:
    """The floor of the offset model is of the size float32 rounding of 3000 gives after the BN's
    scale (ulp(3000)/2 * s = 1.2e-4 * s), not orders of magnitude above it. A well-conditioned
    model passes the strict rule, so no floor is measured (it costs two runs of the reference):
    the record says why."""
    w, b, p = _offset(rng)
    res = _check(tmp_path, _conv_bn(w, b, p), _hand_fold(w, b, p), _feeds(rng))
    s = p["scale"] / np.sqrt(p["var"] + EPS)
    half_ulp = float(np.spacing(np.float32(3000.0))) / 2
    floor = res.outputs[0].floor_max
    assert floor is not None and 0.25 * half_ulp * s.max() <= floor <= 8 * half_ulp * s.max()
    w2, b2, p2 = _well(rng)
    res2 = _check(tmp_path, _conv_bn(w2, b2, p2), _hand_fold(w2, b2, p2), _feeds(rng))
    assert res2.passed and res2.outputs[0].floor_max is None
    assert res2.settings["noise_floor"]["note"].startswith("not needed: every output and fold site is within")


# ---------------------------------------------------------------- faults still fail


def _spread(w: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Per-channel standard deviation of the BN output for x ~ N(0, 1): |scale| (exact statistics)."""
    return np.abs(p["scale"].astype(np.float64)) * np.sqrt(p["var"] / (p["var"] + EPS))


@pytest.mark.parametrize("channel", [0, 3])
def test_well_conditioned_error_of_1e3_spread_on_one_channel_fails(tmp_path: Path, rng: np.random.Generator,
                                                                   channel: int) -> None:
    w, b, p = _well(rng)
    ref = _conv_bn(w, b, p)
    assert _check(tmp_path, ref, _hand_fold(w, b, p), _feeds(rng)).passed  # the hand fold is right
    delta = np.zeros(C)
    delta[channel] = 1e-3 * _spread(w, p)[channel]
    res = _check(tmp_path, ref, _hand_fold(w, b, p, bias_delta=delta), _feeds(rng))
    assert not res.passed
    [out] = res.outputs
    assert out.worst_index is not None and out.worst_index[1] == channel
    assert res.first_divergent_site == "bn"


def test_ill_conditioned_error_10x_floor_fails(tmp_path: Path, rng: np.random.Generator) -> None:
    """In the offset model, the correct fold passes by the floor; a delta of 10x the floor on one
    channel (on the channel with the largest floor: every channel's floor is at most that) fails."""
    w, b, p = _offset(rng)
    ref, feeds = _conv_bn(w, b, p), _feeds(rng)
    good = _check(tmp_path, ref, _hand_fold(w, b, p), feeds)
    assert good.passed
    floor = good.outputs[0].floor_max
    assert floor is not None and good.outputs[0].max_abs > good.outputs[0].atol  # needs the floor to pass
    for channel in range(C):
        delta = np.zeros(C)
        delta[channel] = 10 * floor
        bad = _check(tmp_path, ref, _hand_fold(w, b, p, bias_delta=delta), feeds)
        assert not bad.passed, channel
        assert bad.outputs[0].floor_max == floor  # the floor is the reference's: the fault does not move it
        assert bad.outputs[0].worst_index is not None and bad.outputs[0].worst_index[1] == channel


@pytest.mark.parametrize("model", ["well", "offset"])
@pytest.mark.parametrize("fault", ["statistic", "channel", "fold"])
def test_wrong_statistic_channel_or_fold_fails(tmp_path: Path, rng: np.random.Generator, model: str,
                                               fault: str) -> None:
    """A variance 2% off (the statistic), the scale of channel 0 given to channel 1 and back (the
    channel), the bias not scaled (the fold): each fails in both models, the floor notwithstanding."""
    w, b, p = (_well if model == "well" else _offset)(rng)
    kwargs: dict[str, object] = {
        "statistic": {"var": p["var"] * 0.98},
        "channel": {"perm": np.array([1, 0, 2, 3])},
        "fold": {"scale_bias": False},
    }[fault]
    if fault == "channel":  # make the two scales differ clearly
        p["scale"][:2] = np.array([0.6, 1.8], np.float32)
    if fault == "fold":  # b - mean of 0.5 (an input with a nonzero mean), so an unscaled bias is wrong
        p["mean"] = (b - np.float32(0.5)).astype(np.float32)
    res = _check(tmp_path, _conv_bn(w, b, p), _hand_fold(w, b, p, **kwargs), _feeds(rng))  # type: ignore[arg-type]
    assert not res.passed
    assert res.outputs[0].floor_max is not None


# ---------------------------------------------------------------- the rule, the switch, float64


def test_rule_elementwise_with_per_channel_floor() -> None:
    """An element passes within margin*floor of its own channel (axis 1), and only there."""
    ref = np.zeros((1, 2, 1, 2))
    floor = np.array([1e-3, 1e-6])
    ok = compute_metrics("y", ref, ref + np.array([3.9e-3, 0, 0, 0]).reshape(1, 2, 1, 2),
                         atol=0.0, rtol=0.0, floor=floor, margin=4.0)
    assert ok.passed and ok.floor_max == 1e-3 and ok.mismatches == 0
    bad = compute_metrics("y", ref, ref + np.array([0, 0, 4.1e-6, 0]).reshape(1, 2, 1, 2),
                          atol=0.0, rtol=0.0, floor=floor, margin=4.0)
    assert not bad.passed and bad.mismatches == 1
    # the statistics apply the same rule: the mean excess is <= atol within the floor, > atol beyond
    mean_ok = compute_metrics("y", ref, ref + 3e-3 * np.array([1, 1, 0, 0]).reshape(1, 2, 1, 2),
                              atol=0.0, rtol=0.0, floor=floor, margin=4.0, error_stat="mean")
    assert mean_ok.passed
    strict = compute_metrics("y", ref, ref + 3e-3 * np.array([1, 1, 0, 0]).reshape(1, 2, 1, 2),
                             atol=0.0, rtol=0.0, error_stat="mean")
    assert not strict.passed and strict.floor_max is None


def test_channel_floor_ignores_non_finite_and_reduces_per_channel() -> None:
    d = np.array([[[1.0, np.nan]], [[np.inf, 2.0]]]).reshape(1, 2, 2)
    assert list(channel_floor([d, d * 3])) == [3.0, 6.0]
    assert float(channel_floor([np.array([1.0, 5.0])])) == 5.0


def test_explicit_tolerances_keep_their_meaning_and_no_floor_is_strict(tmp_path: Path,
                                                                       rng: np.random.Generator) -> None:
    """--atol/--rtol still decide alone where they are wide enough; the floor only accepts more;
    noise_floor=False is the tolerance rule alone."""
    w, b, p = _offset(rng)
    ref, cand, feeds = _conv_bn(w, b, p), _hand_fold(w, b, p), _feeds(rng)
    assert not _check(tmp_path, ref, cand, feeds, noise_floor=False).passed
    assert _check(tmp_path, ref, cand, feeds, atol=(1.0, {}), noise_floor=False).passed
    res = _check(tmp_path, ref, cand, feeds, atol=(0.0, {}), rtol=(0.0, {}))
    assert res.passed and res.outputs[0].atol == 0.0  # zero tolerances: the floor alone accepts noise
    off = _check(tmp_path, ref, cand, feeds, noise_floor=False)
    assert off.settings["noise_floor"] == "off" and off.outputs[0].floor_max is None
    assert off.sites and off.sites[0].floor_max is None and "floor" not in off.rule


def test_float64_model_is_verified_on_the_reference_evaluator(tmp_path: Path, rng: np.random.Generator) -> None:
    """onnxruntime has no float64 Conv: a correct float64 fold passes (it was exit 3), a wrong
    one fails."""
    w, b, p = _offset(rng, np.float64)
    src = tmp_path / "m64.onnx"
    onnx.save(_conv_bn(w, b, p, elem=DOUBLE), src)
    res = fold(src, output=tmp_path / "f64.onnx")
    v = res.report.verification
    assert res.ok and v is not None and v.passed and v.outputs[0].dtype == "float64"
    assert v.runs[0].used == ("onnx.reference.ReferenceEvaluator",)
    assert v.max_abs < 1e-9
    delta = np.zeros(C)
    delta[2] = 1e-6  # far below float32's noise, far above float64's
    bad = _check(tmp_path, _conv_bn(w, b, p, elem=DOUBLE),
                 _hand_fold(w, b, p, elem=DOUBLE, bias_delta=delta), _feeds(rng, dtype=np.float64))
    assert not bad.passed and bad.outputs[0].worst_index is not None and bad.outputs[0].worst_index[1] == 2


def test_every_report_format_shows_rule_floor_and_margin(tmp_path: Path, rng: np.random.Generator) -> None:
    """`bnfold fold --data` on the offset model: exit 0, and the summary, JSON, JUnit, Markdown and
    HTML each carry the rule, the floor and the margin; --no-noise-floor is exit 1 and says 'off'."""
    w, b, p = _offset(rng)
    src, data = tmp_path / "offset.onnx", tmp_path / "calib.npy"
    onnx.save(_conv_bn(w, b, p, training=True), src)
    np.save(data, rand(rng, 64, 3, 8, 8))
    r = {k: tmp_path / f"r.{k}" for k in ("json", "xml", "md", "html")}
    proc = run_cli("fold", src, "--data", data, "-o", tmp_path / "f.onnx", "--report", r["json"],
                   "--junit-xml", r["xml"], "--summary-md", r["md"], "--html", r["html"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "noise floor: perturbation, margin 4 (2 draws)" in proc.stdout and "4 * floor" in proc.stdout
    assert ", noise floor " in proc.stdout  # the output's floor next to its tolerances
    v = json.loads(r["json"].read_text())["verification"]
    assert v["settings"]["noise_floor"]["margin"] == MARGIN and "4 * floor" in v["rule"]
    assert v["runs"][0]["outputs"][0]["floor_max"] > 0 and v["sites"][0]["floor_max"] > 0
    xml = r["xml"].read_text()
    assert 'name="noise_floor" value="noise floor: perturbation, margin 4' in xml and "4 * floor" in xml
    md = r["md"].read_text()
    assert "float floor" in md and "noise floor: perturbation, margin 4" in md and "4 \\* floor" in md
    html = r["html"].read_text()
    assert "noise floor: perturbation, margin 4" in html and "4 * floor" in html
    strict = run_cli("fold", src, "--data", data, "-o", tmp_path / "g.onnx", "--no-noise-floor", "--no-repro",
                     "--report", tmp_path / "s.json", cwd=tmp_path)
    assert strict.returncode == 1 and "noise floor: off" in strict.stdout
    assert json.loads((tmp_path / "s.json").read_text())["verification"]["settings"]["noise_floor"] == "off"
