"""bnfold.verification.metrics: every expected number is written by hand or with plain numpy here."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bnfold.errors import BadInputError
from bnfold.run_records import OutputMetrics
from bnfold.verification.metrics import ERROR_STATS, compute_metrics, compute_metrics_batched
from bnfold.verification.tolerances import check_tolerance_names, parse_tolerances
from bnfold.verification.tolerances import resolve_tolerances as tolerances_for

F32_TINY_SUB = np.float32(2.0**-149)  # smallest positive float32 subnormal
F16_TINY_SUB = np.float16(2.0**-24)  # smallest positive float16 subnormal


def cm(ref, cand, **kw):
    kw.setdefault("atol", 1e-4)
    kw.setdefault("rtol", 1e-4)
    return compute_metrics("out", np.asarray(ref), np.asarray(cand), **kw)


# ---- identical / one perturbed element ----------------------------------------------------------
def test_identical_arrays():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 4, 5)).astype(np.float32)
    m = cm(ref, ref.copy())
    assert m.passed
    assert m.dtype == "float32" and m.shape == (3, 4, 5) and m.elements == 60
    assert m.max_abs == 0.0 and m.p99_abs == 0.0 and m.mean_abs == 0.0 and m.median_abs == 0.0
    assert m.max_rel == 0.0
    assert m.mismatches == 0 and m.mismatch_pct == 0.0
    assert m.min_atol == 0.0 and m.min_rtol == 0.0
    assert m.cosine == 1.0
    assert m.snr_db == math.inf
    assert m.max_ulp == 0
    assert (m.nan_ref, m.nan_cand, m.inf_ref, m.inf_cand) == (0, 0, 0, 0)
    assert m.top1 is None and m.top5 is None
    d = m.to_dict()
    assert d["snr_db"] == "inf" and d["shape"] == [3, 4, 5] and d["worst_index"] == [0, 0, 0]
    json.dumps(d, allow_nan=False)  # JSON-safe
    assert set(d) == {f for f in OutputMetrics.__dataclass_fields__}


def test_one_perturbed_element():
    ref = (np.arange(24, dtype=np.float32) / 10).reshape(2, 3, 4)
    cand = ref.copy()
    cand[1, 2, 3] += np.float32(0.5)
    atol, rtol = 1e-4, 1e-4
    m = cm(ref, cand, atol=atol, rtol=rtol)
    r = float(ref[1, 2, 3])
    c = float(cand[1, 2, 3])
    d = abs(c - r)
    assert not m.passed
    assert m.worst_index == (1, 2, 3)
    assert m.worst_ref == r and m.worst_cand == c
    assert m.mismatches == 1
    assert m.mismatch_pct == pytest.approx(100 / 24)
    assert m.max_abs == d
    assert m.mean_abs == pytest.approx(d / 24)
    assert m.median_abs == 0.0
    assert m.min_atol == pytest.approx(d - rtol * r, rel=1e-12)  # the excess
    assert m.min_rtol == pytest.approx((d - atol) / r, rel=1e-12)
    assert m.max_rel == pytest.approx(d / r, rel=1e-12)
    assert m.max_ulp == int(abs(cand[1, 2, 3].view(np.int32) - ref[1, 2, 3].view(np.int32)))
    # SNR and cosine by their textbook formulas
    a, b = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    assert m.snr_db == pytest.approx(10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)), rel=1e-12)
    assert m.cosine == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-12)
    # with exactly min_atol it passes
    assert cm(ref, cand, atol=m.min_atol, rtol=rtol).passed
    assert not cm(ref, cand, atol=m.min_atol * (1 - 1e-6), rtol=rtol).passed


def test_relative_error_guard_near_zero():
    ref = np.array([0.0, 1e-8, 1.0], dtype=np.float32)
    cand = np.array([1e-6, 2e-8, 1.0], dtype=np.float32)
    d0 = float(cand[0])  # |1e-6 - 0| in float32 values
    d1 = float(cand[1]) - float(ref[1])
    # guard = max(atol, tiny(float32)) = 1e-4: both near-zero elements are divided by it
    m = cm(ref, cand, atol=1e-4, rtol=1e-4)
    assert m.max_rel == pytest.approx(max(d0, d1) / 1e-4, rel=1e-12)
    assert m.passed
    # atol=0: the guard is the smallest normal float32, 2**-126
    m0 = cm(ref, cand, atol=0.0, rtol=1e-4)
    assert m0.max_rel == pytest.approx(d0 / 2.0**-126, rel=1e-12)
    assert not m0.passed
    # float16: smallest normal is 2**-14 = 6.103515625e-05
    r16 = np.array([0.0, 1.0], dtype=np.float16)
    c16 = np.array([2.0**-20, 1.0], dtype=np.float16)
    assert cm(r16, c16, atol=0.0, rtol=0.0).max_rel == pytest.approx(2.0**-20 / 2.0**-14)


# ---- ULP ----------------------------------------------------------------------------------------
def test_ulp_across_zero_float32():
    assert cm(np.float32([0.0]), np.float32([-0.0])).max_ulp == 0
    assert cm(np.float32([F32_TINY_SUB]), np.float32([-F32_TINY_SUB])).max_ulp == 2
    one = np.float32(1.0)
    three_up = np.nextafter(np.nextafter(np.nextafter(one, np.float32(2)), np.float32(2)), np.float32(2))
    assert cm(np.float32([one]), np.float32([three_up])).max_ulp == 3
    # +0 vs -0 is also zero error
    m = cm(np.float32([0.0]), np.float32([-0.0]))
    assert m.passed and m.max_abs == 0.0


def test_ulp_float16():
    assert cm(np.float16([0.0]), np.float16([-0.0])).max_ulp == 0
    assert cm(np.float16([F16_TINY_SUB]), np.float16([-F16_TINY_SUB])).max_ulp == 2
    one = np.float16(1.0)
    assert cm(np.float16([one]), np.float16([np.nextafter(one, np.float16(2))])).max_ulp == 1
    # values given as float32 with dtype='float16' are measured on the float16 line
    assert cm(np.float32([1.0]), np.float32([1.0 + 2.0**-10]), dtype="float16").max_ulp == 1
    # largest finite and +inf are adjacent
    assert cm(np.float16([65504.0]), np.float16([np.inf]), atol=1, rtol=1).max_ulp == 1


def test_ulp_float64_beyond_int64():
    big = np.finfo(np.float64).max
    m = cm(np.array([big]), np.array([-big]), atol=0, rtol=0)
    assert m.max_ulp == 2 * 0x7FEFFFFFFFFFFFFF  # > 2**63: exact Python int
    assert m.max_abs == math.inf and m.p99_abs == math.inf  # the float64 difference overflows
    assert cm(np.array([5e-324]), np.array([-5e-324])).max_ulp == 2


def test_ulp_bfloat16_bit_patterns():
    bits = lambda *v: np.array(v, dtype=np.uint16)  # noqa: E731
    m = compute_metrics("o", bits(0x0000), bits(0x8000), dtype="bfloat16", atol=0, rtol=0)
    assert m.max_ulp == 0 and m.passed
    m = compute_metrics("o", bits(0x0001), bits(0x8001), dtype="bfloat16", atol=0, rtol=0)
    assert m.max_ulp == 2
    # 1.0 = 0x3F80; 0x3F82 = 1 + 2*2**-7
    m = compute_metrics("o", bits(0x3F80, 0x4000), bits(0x3F82, 0x4000), dtype="bfloat16",
                        atol=0, rtol=0)
    assert m.max_ulp == 2
    assert m.max_abs == 2 * 2.0**-7
    assert m.worst_ref == 1.0 and m.worst_cand == 1.0 + 2 * 2.0**-7
    assert m.worst_index == (0,)
    assert m.dtype == "bfloat16"
    # bfloat16 default tolerance accepts it
    assert compute_metrics("o", bits(0x3F80), bits(0x3F82), dtype="bfloat16",
                           atol=5e-2, rtol=5e-2).passed


def test_ulp_bfloat16_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = ml_dtypes.bfloat16
    ref = np.array([1.0, 0.0, 2.0], dtype=bf)
    cand = np.array([1.0 + 2 * 2.0**-7, -0.0, 2.0], dtype=bf)
    m = compute_metrics("o", ref, cand, atol=0, rtol=0)
    assert m.dtype == "bfloat16"
    assert m.max_ulp == 2
    assert m.max_abs == 2 * 2.0**-7
    # mixing ml_dtypes arrays and raw uint16 bits gives the same numbers
    m2 = compute_metrics("o", ref, cand.view(np.uint16), dtype="bfloat16", atol=0, rtol=0)
    assert (m2.max_ulp, m2.max_abs, m2.worst_index) == (m.max_ulp, m.max_abs, m.worst_index)


# ---- NaN / Inf ----------------------------------------------------------------------------------
def test_nan_inf_agree_passes():
    ref = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    m = cm(ref, ref.copy())
    assert m.passed
    assert (m.nan_ref, m.nan_cand, m.inf_ref, m.inf_cand) == (1, 1, 2, 2)
    assert m.max_abs == 0.0 and m.mismatches == 0 and m.max_ulp == 0
    for stat in ERROR_STATS:
        assert cm(ref, ref.copy(), error_stat=stat).passed


def test_nan_inf_disagree_fails():
    ref = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    cand = np.array([1.0, 2.0, np.inf, np.inf], dtype=np.float32)
    m = cm(ref, cand)
    assert not m.passed
    assert m.mismatches == 2
    assert m.max_abs == math.inf and m.max_rel == math.inf
    assert m.min_atol == math.inf and m.min_rtol == math.inf
    assert m.worst_index == (1,)
    assert (m.nan_ref, m.nan_cand, m.inf_ref, m.inf_cand) == (1, 0, 2, 2)
    for stat in ("mean", "median", "quantile"):
        assert not cm(ref, cand, error_stat=stat).passed
    # NaN in different positions
    m = cm(np.float32([np.nan, 1.0]), np.float32([1.0, np.nan]))
    assert not m.passed and m.mismatches == 2
    assert m.to_dict()["max_abs"] == "inf"
    assert m.to_dict()["worst_ref"] == "nan"


# ---- shapes / exact outputs ---------------------------------------------------------------------
def test_shape_mismatch():
    m = cm(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert not m.passed
    assert m.shape == (2, 3) and m.elements == 6
    assert m.max_abs == math.inf
    assert m.mismatches == 6 and m.mismatch_pct == 100.0
    assert m.worst_index is None and m.cosine is None and m.max_ulp is None
    json.dumps(m.to_dict(), allow_nan=False)


def test_int_outputs_exact():
    ref = np.array([[1, 2], [3, 4]], dtype=np.int64)
    m = compute_metrics("idx", ref, ref.copy(), atol=1.0, rtol=1.0)
    assert m.passed and m.atol == 0.0 and m.rtol == 0.0 and m.dtype == "int64"
    assert m.max_ulp is None and m.top1 is None
    cand = ref.copy()
    cand[1, 0] = 4  # off by one: fails although atol=1 was given
    m = compute_metrics("idx", ref, cand, atol=1.0, rtol=1.0)
    assert not m.passed and m.atol == 0.0 and m.rtol == 0.0
    assert m.mismatches == 1 and m.max_abs == 1.0 and m.worst_index == (1, 0)
    assert m.worst_ref == 3.0 and m.worst_cand == 4.0
    assert m.min_atol == math.inf
    # no float rounding and no overflow in the difference
    m = compute_metrics("i", np.array([2**53], np.int64), np.array([2**53 + 1], np.int64), atol=0, rtol=0)
    assert m.mismatches == 1 and m.max_abs == 1.0
    m = compute_metrics("i", np.array([2**62], np.int64), np.array([-(2**62)], np.int64), atol=0, rtol=0)
    assert m.max_abs == float(2**63)
    # bool, and a dtype change
    assert compute_metrics("b", np.array([True, False]), np.array([True, False]), atol=0, rtol=0).passed
    mb = compute_metrics("b", np.array([True, False]), np.array([True, True]), atol=0, rtol=0)
    assert not mb.passed and mb.mismatches == 1
    assert not compute_metrics("i", np.array([1, 2], np.int32), np.array([1, 2], np.int64),
                               atol=0, rtol=0).passed


# ---- top-1 / top-5 ------------------------------------------------------------------------------
def test_top1_top5_known_flips():
    rng = np.random.default_rng(1)
    n, k = 20, 10
    ref = np.stack([rng.permutation(k) for _ in range(n)]).astype(np.float32)  # distinct scores
    cand = ref.copy()

    def swap_rank(row, rank):  # exchange the top class's score with the score of the given rank
        order = np.argsort(-ref[row])
        top, other = order[0], order[rank - 1]
        cand[row, top], cand[row, other] = ref[row, other], ref[row, top]

    cand[0, np.argmax(ref[0])] = -1.0  # top class now last: flip, out of top-5
    swap_rank(1, 2)  # now 2nd: flip, in top-5
    swap_rank(2, 5)  # now 5th: flip, in top-5
    swap_rank(3, 6)  # now 6th: flip, out of top-5
    m = cm(ref, cand)
    assert m.top1 == pytest.approx(16 / 20)
    assert m.top5 == pytest.approx(18 / 20)
    # small perturbations that keep every argmax
    m = cm(ref, ref + np.float32(0.01))
    assert m.top1 == 1.0 and m.top5 == 1.0
    # K < 5: top-1 only; rank 1 or int: neither
    m = cm(ref[:, :4], cand[:, :4])
    assert m.top1 is not None and m.top5 is None
    assert cm(ref[0], cand[0]).top1 is None
    assert compute_metrics("i", ref.astype(np.int64), ref.astype(np.int64), atol=0, rtol=0).top1 is None


# ---- error statistics ---------------------------------------------------------------------------
def test_error_stat_max_fails_median_passes():
    ref = np.ones(100, dtype=np.float32)
    cand = ref.copy()
    cand[:10] += 1.0  # 10 % of elements off by 1, the rest exact
    kw = dict(atol=1e-3, rtol=0.0)
    assert not cm(ref, cand, **kw).passed  # max
    m = cm(ref, cand, error_stat="median", **kw)
    assert m.passed and m.error_stat == "median" and m.quantile is None
    assert m.mismatches == 10  # still reported
    assert not cm(ref, cand, error_stat="mean", **kw).passed  # mean excess 0.1
    assert cm(ref, cand, error_stat="mean", atol=0.1, rtol=0.0).passed
    # sorted excess: 90 zeros then 10 ones; linear quantile at position q*99
    m = cm(ref, cand, error_stat="quantile", quantile=0.89, **kw)
    assert m.passed and m.quantile == 0.89
    assert not cm(ref, cand, error_stat="quantile", quantile=0.95, **kw).passed
    # rtol enters the excess: |a-b| = 1 <= 0 + 1.0 * |ref|
    assert cm(ref, cand, error_stat="quantile", quantile=1.0, atol=0.0, rtol=1.0).passed
    assert cm(ref, cand, atol=0.0, rtol=1.0).passed


def test_bad_arguments():
    x = np.zeros(3, np.float32)
    with pytest.raises(BadInputError):
        cm(x, x, error_stat="p95")
    with pytest.raises(BadInputError):
        cm(x, x, error_stat="quantile", quantile=1.5)
    with pytest.raises(BadInputError):
        cm(x, x, atol=-1.0)
    with pytest.raises(BadInputError):
        cm(x, x, rtol=float("nan"))


# ---- batches ------------------------------------------------------------------------------------
def test_batched_concatenates_along_axis0():
    rng = np.random.default_rng(2)
    refs = [rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    cands = [r.copy() for r in refs]
    cands[1][1, 4] += np.float32(1.0)
    m = compute_metrics_batched("out", refs, cands, atol=1e-4, rtol=1e-4)
    whole = cm(np.concatenate(refs), np.concatenate(cands))
    assert m == whole
    assert m.worst_index == (3, 4) and m.shape == (5, 5) and m.mismatches == 1
    # a batch with a wrong shape fails over all elements, even if the totals line up
    bad = compute_metrics_batched("o", [np.zeros((2, 3)), np.zeros((3, 3))],
                                  [np.zeros((3, 3)), np.zeros((2, 3))], atol=1, rtol=1)
    assert not bad.passed and bad.elements == 15 and bad.mismatches == 15
    # dynamic trailing dims: flattened
    fl = compute_metrics_batched("o", [np.zeros((1, 2)), np.ones((1, 3))],
                                 [np.zeros((1, 2)), np.ones((1, 3))], atol=0, rtol=0)
    assert fl.passed and fl.shape == (5,)
    with pytest.raises(BadInputError):
        compute_metrics_batched("o", [np.zeros(2)], [], atol=0, rtol=0)
    # bfloat16 bit patterns
    b = compute_metrics_batched("o", [np.array([0x3F80], np.uint16)] * 2,
                                [np.array([0x3F80], np.uint16), np.array([0x3F81], np.uint16)],
                                dtype="bfloat16", atol=0, rtol=0)
    assert b.max_ulp == 1 and b.worst_index == (1,)


# ---- tolerance specs ----------------------------------------------------------------------------
def test_parse_tolerances_valid():
    assert parse_tolerances(None, 1e-4) == (1e-4, {})
    assert parse_tolerances(None, None) == (None, {})
    assert parse_tolerances("1e-3", 1e-4) == (1e-3, {})
    assert parse_tolerances("logits:1e-3,probs:1e-2", None) == (None, {"logits": 1e-3, "probs": 1e-2})
    assert parse_tolerances("1e-4,logits:1e-3", 5.0) == (1e-4, {"logits": 1e-3})
    assert parse_tolerances(" logits : 1e-3 , 2e-4 ", None) == (2e-4, {"logits": 1e-3})
    # names with ':' split on the last one
    assert parse_tolerances("ns:out:0:1e-3", None) == (None, {"ns:out:0": 1e-3})
    assert parse_tolerances("0", None) == (0.0, {})
    assert parse_tolerances("x:inf", None) == (None, {"x": math.inf})


@pytest.mark.parametrize(
    "spec, token",
    [
        ("abc", "abc"),
        ("-1e-4", "-1e-4"),
        ("logits:-1", "logits:-1"),
        ("nan", "nan"),
        ("a:1e-3,a:2e-3", "a:2e-3"),
        ("1e-4,2e-4", "2e-4"),
        ("logits:", "logits:"),
        (":1e-3", ":1e-3"),
        ("1e-4,", ""),
        ("", ""),
        ("a:b", "a:b"),
    ],
)
def test_parse_tolerances_invalid(spec, token):
    with pytest.raises(BadInputError) as err:
        parse_tolerances(spec, 1e-4)
    msg = str(err.value)
    assert "\n" not in msg
    assert repr(token) in msg
    assert "'NAME:X'" in msg and "'X'" in msg and "comma-separated" in msg


def test_tolerances_for_precedence():
    atol = parse_tolerances("1e-3,logits:1e-2", None)
    rtol = parse_tolerances(None, None)
    assert tolerances_for("logits", "float32", atol, rtol) == (1e-2, 1e-4)  # per-output, default
    assert tolerances_for("probs", "float32", atol, rtol) == (1e-3, 1e-4)  # global, default
    assert tolerances_for("probs", "float16", None, None) == (1e-2, 1e-2)
    assert tolerances_for("probs", "bfloat16", None, None) == (5e-2, 5e-2)
    assert tolerances_for("probs", "float64", None, None) == (1e-9, 1e-9)
    assert tolerances_for("probs", "float64", None, parse_tolerances("probs:0", None)) == (1e-9, 0.0)
    assert tolerances_for("idx", "int64", atol, atol) == (0.0, 0.0)  # exact
    check_tolerance_names(["logits"], atol, rtol)
    with pytest.raises(BadInputError):
        check_tolerance_names(["probs"], atol, rtol)


# ---- min_atol / min_rtol are the smallest passing tolerances ------------------------------------
_f32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)
_tol = st.one_of(st.just(0.0), st.floats(1e-8, 1e-1))


@st.composite
def _pairs(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6))
    ref = draw(hnp.arrays(np.float32, shape, elements=_f32))
    pert = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32)))
    scale = draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0]))
    cand = (ref + pert * np.float32(scale)).astype(np.float32)
    return ref, cand


def _resolvable(t: float, mag: float) -> bool:
    # float64 can tell t*(1-1e-6) from t only when 1e-6*t exceeds the rounding of the check
    # d <= atol + rtol*|ref| itself (a few ulps of its largest term)
    return t * 1e-6 > 8 * np.spacing(mag)


@settings(max_examples=150, deadline=None)
@given(_pairs(), _tol, _tol)
def test_min_atol_is_smallest_passing(pair, atol, rtol):
    ref, cand = pair
    m = compute_metrics("o", ref, cand, atol=atol, rtol=rtol)
    a, b = ref.astype(np.float64), cand.astype(np.float64)
    d = np.abs(a - b)
    assert m.min_atol >= 0.0
    assert m.min_atol == pytest.approx(max(0.0, float(np.max(d - rtol * np.abs(a)))), rel=1e-9, abs=1e-300)
    assert compute_metrics("o", ref, cand, atol=m.min_atol, rtol=rtol).passed
    mag = float(np.max(d + rtol * np.abs(a)))
    if m.min_atol > 0 and _resolvable(m.min_atol, mag):
        assert not compute_metrics("o", ref, cand, atol=m.min_atol * (1 - 1e-6), rtol=rtol).passed
    assert m.passed == (m.min_atol <= atol)


@settings(max_examples=150, deadline=None)
@given(_pairs(), _tol, _tol)
def test_min_rtol_is_smallest_passing(pair, atol, rtol):
    ref, cand = pair
    m = compute_metrics("o", ref, cand, atol=atol, rtol=rtol)
    a, b = ref.astype(np.float64), cand.astype(np.float64)
    d, mag_a = np.abs(a - b), np.abs(a)
    if np.any(d[mag_a == 0] > atol):
        assert m.min_rtol == math.inf
        assert not m.passed
        return
    pos = mag_a > 0
    expected = float(np.max(np.maximum(d[pos] - atol, 0.0) / mag_a[pos], initial=0.0))
    assert m.min_rtol == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert compute_metrics("o", ref, cand, atol=atol, rtol=m.min_rtol).passed
    if m.min_rtol > 0:
        k = np.argmax(np.where(pos, np.maximum(d - atol, 0.0) / np.where(pos, mag_a, 1.0), 0.0))
        if _resolvable(m.min_rtol * mag_a.ravel()[k], float(d.ravel()[k])):
            assert not compute_metrics("o", ref, cand, atol=atol, rtol=m.min_rtol * (1 - 1e-6)).passed
    assert m.passed == (m.min_rtol <= rtol)


def test_error_histogram_counts_per_decade():
    from bnfold.verification.metrics import HIST_ZERO

    ref = np.zeros(7, np.float64)
    # errors: two exact, one in [1e-7, 1e-6), two in [1e-3, 1e-2), one huge (clipped to 1e6), one NaN pair
    cand = np.array([0.0, 0.0, 5e-7, 2e-3, 9.9e-3, 3e9, np.nan])
    ref[6] = np.nan
    m = compute_metrics("y", ref, cand, atol=1e-4, rtol=0.0)
    assert dict(m.error_histogram) == {HIST_ZERO: 2, -7: 1, -3: 2, 6: 1}
    assert sum(c for _, c in m.error_histogram) == 6  # the agreeing NaN pair is not a finite pair
