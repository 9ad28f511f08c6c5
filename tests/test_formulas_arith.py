"""Tests of bnfold.formulas.arith: each fold is checked against BN(producer(x)) computed in float64
with the independent numpy reference ``npref`` (itself checked against torch and onnxruntime)."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from bnfold.formulas import arith
from bnfold.formulas.arith import (
    FoldValueError,
    bn_scale_shift,
    cast_back,
    fold_conv,
    fold_conv_cast,
    fold_conv_transpose,
    fold_forward_conv,
    fold_gemm,
    fold_matmul,
)

try:
    import npref
except ImportError:  # tests/ is a package
    from tests import npref

RTOL = 1e-10


# ----------------------------------------------------------------------------- helpers


def assert_close(got, ref, rtol=RTOL):
    """|got - ref| <= rtol * max|ref|, elementwise (tolerance relative to the output's scale)."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = float(np.abs(ref).max())
    assert scale > 0
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"


def assert_not_close(got, ref, rtol=1e-3):
    err = float(np.abs(np.asarray(got, dtype=np.float64) - ref).max())
    assert err > rtol * float(np.abs(ref).max()), "expected a clearly wrong result"


def random_bn(rng, c, affine=True):
    """BN parameters with distinct per-channel scales, negative gammas included."""
    gamma = rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c) if affine else None
    beta = rng.normal(0.0, 1.0, c) if affine else None
    mean = rng.normal(0.0, 1.0, c)
    var = rng.uniform(0.05, 3.0, c)
    eps = 1e-5
    return gamma, beta, mean, var, eps


def rand(rng, *shape):
    return rng.standard_normal(shape)


@pytest.fixture
def rng(request):
    # a stable seed per test id, so failures reproduce
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _nd(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------- npref itself


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize(
    "d,groups,cin_g,cout_g,k,stride,pad,dil",
    [
        (1, 2, 2, 3, 3, 2, 1, 2),
        (2, 3, 1, 2, (2, 3), (1, 2), (1, 0), (2, 1)),
        (3, 2, 2, 1, 2, 2, 1, 1),
        (2, 1, 3, 4, 3, 1, 0, 1),
    ],
)
def test_npref_matches_torch(d, groups, cin_g, cout_g, k, stride, pad, dil):
    """The reference conv/conv-transpose/batchnorm agree with torch (symmetric pads)."""
    t = _torch()
    F = t.nn.functional
    rng = np.random.default_rng(d * 100 + groups)
    k, stride, pad, dil = (_nd(v, d) for v in (k, stride, pad, dil))
    x = rand(rng, 2, groups * cin_g, *(7,) * d)
    w = rand(rng, groups * cout_g, cin_g, *k)
    b = rand(rng, groups * cout_g)
    conv_t = [F.conv1d, F.conv2d, F.conv3d][d - 1]
    ref = conv_t(t.tensor(x), t.tensor(w), t.tensor(b), stride=stride, padding=pad, dilation=dil, groups=groups)
    got = npref.conv(x, w, b, strides=stride, pads=pad + pad, dilations=dil, groups=groups)
    assert_close(got, ref.numpy(), 1e-12)

    wt = rand(rng, groups * cin_g, cout_g, *k)
    op = tuple(max(0, s - 1) for s in stride)
    convt_t = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][d - 1]
    ref = convt_t(t.tensor(x), t.tensor(wt), t.tensor(b), stride=stride, padding=pad, output_padding=op, dilation=dil, groups=groups)
    got = npref.conv_transpose(x, wt, b, strides=stride, pads=pad + pad, output_padding=op, dilations=dil, groups=groups)
    assert_close(got, ref.numpy(), 1e-12)

    c = groups * cout_g
    gamma, beta, mean, var, eps = random_bn(rng, c)
    y = rand(rng, 3, c, *(4,) * d)
    ref = F.batch_norm(t.tensor(y), t.tensor(mean), t.tensor(var), t.tensor(gamma), t.tensor(beta), False, 0.0, eps)
    assert_close(npref.batchnorm(y, gamma, beta, mean, var, eps), ref.numpy(), 1e-12)


def test_npref_asymmetric_pads_match_explicit_padding():
    """Asymmetric ONNX pads equal zero-padding the input first (conv) / cropping (transpose)."""
    rng = np.random.default_rng(7)
    x = rand(rng, 1, 4, 6, 5)
    w = rand(rng, 4, 2, 3, 2)
    pads = (1, 0, 2, 3)  # begin_h, begin_w, end_h, end_w
    xp = np.pad(x, [(0, 0), (0, 0), (1, 2), (0, 3)])
    assert_close(npref.conv(x, w, pads=pads, groups=2), npref.conv(xp, w, groups=2), 1e-14)
    wt = rand(rng, 4, 3, 3, 2)
    full = npref.conv_transpose(x, wt, strides=(2, 1), groups=2)
    cropped = npref.conv_transpose(x, wt, strides=(2, 1), pads=pads, groups=2)
    assert_close(cropped, full[:, :, 1 : full.shape[2] - 2, 0 : full.shape[3] - 3], 1e-14)


# ----------------------------------------------------------------------------- bn_scale_shift


def test_bn_scale_shift_matches_batchnorm(rng):
    gamma, beta, mean, var, eps = random_bn(rng, 5)
    s, t = bn_scale_shift(gamma, beta, mean, var, eps)
    assert s.dtype == np.float64 and t.dtype == np.float64 and s.shape == t.shape == (5,)
    np.testing.assert_allclose(s, gamma / np.sqrt(var + eps), rtol=1e-15)
    np.testing.assert_allclose(t, beta - gamma * mean / np.sqrt(var + eps), rtol=1e-13, atol=1e-15)
    x = rand(rng, 3, 5, 4)
    assert_close(s[None, :, None] * x + t[None, :, None], npref.batchnorm(x, gamma, beta, mean, var, eps))


def test_bn_scale_shift_without_affine(rng):
    _, _, mean, var, eps = random_bn(rng, 4)
    s, t = bn_scale_shift(None, None, mean, var, eps)
    np.testing.assert_allclose(s, 1.0 / np.sqrt(var + eps), rtol=1e-15)
    np.testing.assert_allclose(t, -mean / np.sqrt(var + eps), rtol=1e-15)
    x = rand(rng, 2, 4)
    assert_close(s * x + t, npref.batchnorm(x, None, None, mean, var, eps))
    # gamma only / beta only
    s2, t2 = bn_scale_shift(np.full(4, 2.0), None, mean, var, eps)
    np.testing.assert_allclose(s2, 2 * s, rtol=1e-15)
    np.testing.assert_allclose(t2, 2 * t, rtol=1e-15)
    s3, t3 = bn_scale_shift(None, np.full(4, 0.5), mean, var, eps)
    np.testing.assert_allclose(s3, s, rtol=1e-15)
    np.testing.assert_allclose(t3, t + 0.5, rtol=1e-13)


def test_bn_scale_shift_float32_inputs_computed_in_float64():
    mean = np.array([1000.0, -3.0], np.float32)
    var = np.array([1e-7, 4.0], np.float32)
    gamma = np.array([1.5, 0.25], np.float32)
    beta = np.array([0.1, 0.2], np.float32)
    s, t = bn_scale_shift(gamma, beta, mean, var, 1e-5)
    assert s.dtype == np.float64
    m64, v64, g64, b64 = (a.astype(np.float64) for a in (mean, var, gamma, beta))
    np.testing.assert_allclose(s, g64 / np.sqrt(v64 + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(t, b64 - s * m64, rtol=1e-15)


def test_bn_scale_shift_zero_and_denormal_variance():
    s, t = bn_scale_shift(None, None, [0.0, 1.0], [0.0, 5.6e-45], 1e-3)
    np.testing.assert_allclose(s, [1 / np.sqrt(1e-3)] * 2, rtol=1e-12)
    with pytest.raises(ValueError, match="var \\+ eps"):
        bn_scale_shift(None, None, [0.0], [0.0], 0.0)
    with pytest.raises(ValueError, match="var \\+ eps"):
        bn_scale_shift(None, None, [0.0], [-1.0], 1e-5)
    with pytest.raises(ValueError, match="var \\+ eps"):
        bn_scale_shift(None, None, [0.0], [np.nan], 1e-5)


def test_bn_scale_shift_shape_errors():
    with pytest.raises(ValueError, match="var"):
        bn_scale_shift(None, None, np.zeros(3), np.ones(4), 1e-5)
    with pytest.raises(ValueError, match="gamma"):
        bn_scale_shift(np.ones(2), None, np.zeros(3), np.ones(3), 1e-5)
    with pytest.raises(ValueError, match="beta"):
        bn_scale_shift(None, np.ones((3, 1)), np.zeros(3), np.ones(3), 1e-5)


# ----------------------------------------------------------------------------- Conv -> BN

CONV_CASES = [
    # d, groups, cin_g, cout_g, kernel, strides, pads, dilations
    pytest.param(1, 1, 3, 4, 3, 1, (0, 0), 1, id="1d"),
    pytest.param(1, 2, 2, 3, 3, 2, (1, 2), 2, id="1d-g2-stride-pad-dil"),
    pytest.param(1, 5, 1, 1, 3, 1, (1, 1), 1, id="1d-depthwise"),
    pytest.param(2, 1, 3, 4, 3, 1, (1, 1, 1, 1), 1, id="2d"),
    pytest.param(2, 2, 2, 3, (3, 2), (2, 1), (1, 0, 0, 1), (1, 2), id="2d-g2-asym"),
    pytest.param(2, 4, 1, 1, 3, 2, (1, 1, 1, 1), 1, id="2d-depthwise"),
    pytest.param(2, 3, 1, 2, 3, 1, (2, 2, 2, 2), 2, id="2d-depthwise-multiplier-dil"),
    pytest.param(3, 1, 2, 3, 2, 1, (0,) * 6, 1, id="3d"),
    pytest.param(3, 2, 2, 2, (2, 3, 1), (1, 2, 1), (1, 0, 1, 0, 1, 1), (2, 1, 1), id="3d-g2"),
    pytest.param(3, 3, 1, 1, 2, 1, (1,) * 6, 1, id="3d-depthwise"),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d,groups,cin_g,cout_g,k,strides,pads,dil", CONV_CASES)
def test_fold_conv(rng, d, groups, cin_g, cout_g, k, strides, pads, dil, with_bias):
    c_in, c_out = groups * cin_g, groups * cout_g
    k, strides, dil = _nd(k, d), _nd(strides, d), _nd(dil, d)
    x = rand(rng, 2, c_in, *(6,) * d)
    w = rand(rng, c_out, cin_g, *k)
    b = rand(rng, c_out) if with_bias else None
    bn = random_bn(rng, c_out)
    attrs = dict(strides=strides, pads=pads, dilations=dil, groups=groups)
    ref = npref.batchnorm(npref.conv(x, w, b, **attrs), *bn)

    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_conv(w, b, s, t)
    assert w2.shape == w.shape and b2.shape == (c_out,)
    assert w2.dtype == b2.dtype == np.float64
    assert_close(npref.conv(x, w2, b2, **attrs), ref)


def test_fold_conv_bias_formula(rng):
    """b' = s*b + t = s*(b - mu) + beta (math.md section 3)."""
    gamma, beta, mean, var, eps = random_bn(rng, 3)
    s, t = bn_scale_shift(gamma, beta, mean, var, eps)
    b = rand(rng, 3)
    _, b2 = fold_conv(rand(rng, 3, 2, 1), b, s, t)
    np.testing.assert_allclose(b2, s * (b - mean) + beta, rtol=1e-12)
    _, b0 = fold_conv(rand(rng, 3, 2, 1), None, s, t)
    np.testing.assert_allclose(b0, t, rtol=0)


# ----------------------------------------------------------------------------- ConvTranspose -> BN

CONVT_CASES = [
    # d, groups, cin_g, cout_g, kernel, strides, pads, output_padding, dilations
    pytest.param(1, 1, 3, 4, 3, 1, (0, 0), 0, 1, id="1d"),
    pytest.param(1, 2, 2, 3, 3, 2, (1, 0), 1, 1, id="1d-g2-stride-outpad"),
    pytest.param(1, 4, 1, 1, 2, 2, (0, 0), 0, 1, id="1d-depthwise"),
    pytest.param(2, 1, 2, 3, 3, 2, (1, 1, 1, 1), 1, 1, id="2d-stride-outpad"),
    pytest.param(2, 2, 2, 3, (3, 2), (2, 3), (1, 0, 0, 1), (1, 2), (1, 1), id="2d-g2-asym"),
    pytest.param(2, 2, 3, 1, 3, 1, (0, 0, 0, 0), 0, 2, id="2d-g2-cout_g1-dil"),
    pytest.param(2, 3, 1, 1, 3, 2, (1, 1, 1, 1), 1, 1, id="2d-depthwise"),
    pytest.param(2, 3, 1, 2, 2, 2, (0, 0, 0, 0), 0, 1, id="2d-depthwise-multiplier"),
    pytest.param(3, 1, 2, 2, 2, 2, (0,) * 6, 1, 1, id="3d-stride-outpad"),
    pytest.param(3, 2, 1, 2, (2, 1, 2), (1, 2, 2), (1, 0, 0, 0, 0, 1), (0, 1, 1), 1, id="3d-g2"),
    pytest.param(3, 2, 1, 1, 2, 1, (0,) * 6, 0, 1, id="3d-depthwise"),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d,groups,cin_g,cout_g,k,strides,pads,opad,dil", CONVT_CASES)
def test_fold_conv_transpose(rng, d, groups, cin_g, cout_g, k, strides, pads, opad, dil, with_bias):
    c_in, c_out = groups * cin_g, groups * cout_g
    k, strides, opad, dil = _nd(k, d), _nd(strides, d), _nd(opad, d), _nd(dil, d)
    x = rand(rng, 2, c_in, *(4,) * d)
    w = rand(rng, c_in, cout_g, *k)
    b = rand(rng, c_out) if with_bias else None
    bn = random_bn(rng, c_out)
    attrs = dict(strides=strides, pads=pads, output_padding=opad, dilations=dil, groups=groups)
    ref = npref.batchnorm(npref.conv_transpose(x, w, b, **attrs), *bn)

    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_conv_transpose(w, b, s, t, groups)
    assert w2.shape == w.shape and b2.shape == (c_out,)
    assert_close(npref.conv_transpose(x, w2, b2, **attrs), ref)


def test_conv_transpose_naive_axis1_scaling_is_wrong_for_groups(rng):
    """Scaling ConvTranspose weight axis 1 (length C_out/groups) as if it held the output channels,
    as torch's fuse_conv_bn_weights(transpose=True) does, is wrong for groups=2; ours is right."""
    groups, cin_g, cout_g = 2, 2, 3
    c_in, c_out = groups * cin_g, groups * cout_g
    x = rand(rng, 2, c_in, 5, 5)
    w = rand(rng, c_in, cout_g, 3, 3)
    b = rand(rng, c_out)
    bn = random_bn(rng, c_out)
    s, t = bn_scale_shift(*bn)
    attrs = dict(strides=(2, 2), output_padding=(1, 1), groups=groups)
    ref = npref.batchnorm(npref.conv_transpose(x, w, b, **attrs), *bn)

    w_ours, b_ours = fold_conv_transpose(w, b, s, t, groups)
    assert_close(npref.conv_transpose(x, w_ours, b_ours, **attrs), ref)

    # naive: axis-1 index j is taken for output channel j, so every group gets group 0's scales
    w_naive = w * s[:cout_g].reshape(1, cout_g, 1, 1)
    assert_not_close(npref.conv_transpose(x, w_naive, s * b + t, **attrs), ref)
    # the only scaling of axis 1 that broadcasts with (C_out,) scales fails outright for groups > 1
    with pytest.raises(ValueError):
        w * s.reshape(1, -1, 1, 1)
    # for groups=1 the naive rule coincides with ours
    w1 = rand(rng, c_in, c_out, 3, 3)
    np.testing.assert_allclose(fold_conv_transpose(w1, b, s, t, 1)[0], w1 * s.reshape(1, -1, 1, 1), rtol=0)


def test_torch_fuse_conv_bn_weights_transpose_groups_is_wrong(rng):
    """Documents the torch behaviour this module avoids (math.md section 3, pitfalls)."""
    t_ = _torch()
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def as_torch(bn):
        gamma, beta, mean, var, eps = bn
        return dict(bn_rm=t_.tensor(mean), bn_rv=t_.tensor(var), bn_eps=eps, bn_w=t_.tensor(gamma), bn_b=t_.tensor(beta))

    w = t_.tensor(rand(rng, 4, 3, 3, 3))  # C_in=4, groups=2, C_out=6
    with pytest.raises(RuntimeError):
        fuse_conv_bn_weights(w, None, transpose=True, **as_torch(random_bn(rng, 6)))
    # C_out/groups == 1: torch broadcasts to a wrong-shaped weight instead
    g2 = random_bn(rng, 2)
    w1 = t_.tensor(rand(rng, 4, 1, 3, 3))  # C_in=4, groups=2, C_out=2
    fw, _ = fuse_conv_bn_weights(w1, None, transpose=True, **as_torch(g2))
    assert tuple(fw.shape) == (4, 2, 3, 3) != tuple(w1.shape)
    ours, _ = fold_conv_transpose(w1.numpy(), None, *bn_scale_shift(*g2), groups=2)
    assert ours.shape == (4, 1, 3, 3)


# ----------------------------------------------------------------------------- Gemm -> BN

M, K, N = 5, 4, 3


def _gemm_c(kind, rng):
    return {
        "none": None,
        "scalar": np.float64(rng.normal()),
        "vec": rand(rng, N),
        "row": rand(rng, 1, N),
        "one": rand(rng, 1),
    }[kind]


@pytest.mark.parametrize("c_kind", ["none", "scalar", "vec", "row", "one"])
@pytest.mark.parametrize("beta", [1.0, 0.25])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("trans_a", [False, True])
def test_fold_gemm(rng, trans_a, trans_b, alpha, beta, c_kind):
    a = rand(rng, K, M) if trans_a else rand(rng, M, K)
    bmat = rand(rng, N, K) if trans_b else rand(rng, K, N)
    c = _gemm_c(c_kind, rng)
    bn = random_bn(rng, N)
    ref = npref.batchnorm(npref.gemm(a, bmat, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b), *bn)

    s, t = bn_scale_shift(*bn)
    b2, c2 = fold_gemm(bmat, c, s, t, trans_b=trans_b, alpha=alpha, beta=beta, n=N)
    assert b2.shape == bmat.shape and c2.shape == (N,)
    # the folded node keeps alpha, transA, transB and has beta = 1
    got = npref.gemm(a, b2, c2, alpha=alpha, beta=1.0, trans_a=trans_a, trans_b=trans_b)
    assert_close(got, ref)


@pytest.mark.parametrize("shape", [(M, N), (M, 1), (2, 1, N)])
def test_fold_gemm_per_row_c_raises(rng, shape):
    s, t = bn_scale_shift(*random_bn(rng, N))
    with pytest.raises(ValueError, match="per-row"):
        fold_gemm(rand(rng, K, N), rand(rng, *shape), s, t, trans_b=False, alpha=1.0, beta=1.0, n=N)


def test_fold_gemm_shape_errors(rng):
    s, t = bn_scale_shift(*random_bn(rng, N))
    with pytest.raises(ValueError, match="N=3"):
        fold_gemm(rand(rng, K, N), None, s, t, trans_b=True, alpha=1.0, beta=1.0, n=N)  # (K, N) read as (N, K)
    with pytest.raises(ValueError, match="broadcast"):
        fold_gemm(rand(rng, K, N), rand(rng, N + 1), s, t, trans_b=False, alpha=1.0, beta=1.0, n=N)
    with pytest.raises(ValueError, match="channels"):
        fold_gemm(rand(rng, K, N + 1), None, s, t, trans_b=False, alpha=1.0, beta=1.0, n=N + 1)
    with pytest.raises(ValueError, match="2-D"):
        fold_gemm(rand(rng, K), None, s, t, trans_b=False, alpha=1.0, beta=1.0, n=N)


# ----------------------------------------------------------------------------- MatMul (+Add) -> BN


@pytest.mark.parametrize("bias_kind", ["none", "vec", "row", "scalar", "one"])
def test_fold_matmul(rng, bias_kind):
    x = rand(rng, 6, K)
    w = rand(rng, K, N)
    bias = {"none": None, "vec": rand(rng, N), "row": rand(rng, 1, N), "scalar": np.float64(0.7), "one": rand(rng, 1)}[bias_kind]
    bn = random_bn(rng, N)
    y = x @ w + (0.0 if bias is None else bias)
    ref = npref.batchnorm(y, *bn)
    w2, b2 = fold_matmul(w, bias, *bn_scale_shift(*bn))
    assert w2.shape == (K, N) and b2.shape == (N,)
    assert_close(x @ w2 + b2, ref)


def test_fold_matmul_errors(rng):
    s, t = bn_scale_shift(*random_bn(rng, N))
    with pytest.raises(ValueError, match="channels"):
        fold_matmul(rand(rng, N, K), None, s, t)
    with pytest.raises(ValueError, match="2-D"):
        fold_matmul(rand(rng, 2, K, N), None, s, t)
    with pytest.raises(ValueError, match="per-row"):
        fold_matmul(rand(rng, K, N), rand(rng, 6, N), s, t)


# ----------------------------------------------------------------------------- BN -> Conv (forward)

FWD_CASES = [
    # d, groups, cin_g, cout_g, kernel, strides, dilations
    pytest.param(1, 1, 3, 4, 3, 1, 1, id="1d"),
    pytest.param(1, 2, 2, 3, 2, 2, 2, id="1d-g2-stride-dil"),
    pytest.param(2, 1, 3, 2, 3, 1, 1, id="2d"),
    pytest.param(2, 2, 2, 3, (3, 2), (2, 1), (1, 2), id="2d-g2"),
    pytest.param(2, 4, 1, 1, 3, 2, 1, id="2d-depthwise"),
    pytest.param(2, 3, 1, 2, 3, 1, 2, id="2d-depthwise-multiplier-dil"),
    pytest.param(2, 2, 3, 1, 1, 1, 1, id="2d-g2-pointwise"),
    pytest.param(3, 1, 2, 2, 2, 1, 1, id="3d"),
    pytest.param(3, 2, 2, 1, (2, 1, 2), (1, 2, 1), (2, 1, 1), id="3d-g2"),
]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("d,groups,cin_g,cout_g,k,strides,dil", FWD_CASES)
def test_fold_forward_conv(rng, d, groups, cin_g, cout_g, k, strides, dil, with_bias):
    c_in, c_out = groups * cin_g, groups * cout_g
    k, strides, dil = _nd(k, d), _nd(strides, d), _nd(dil, d)
    x = rand(rng, 2, c_in, *(6,) * d)
    w = rand(rng, c_out, cin_g, *k)
    b = rand(rng, c_out) if with_bias else None
    bn = random_bn(rng, c_in)
    attrs = dict(strides=strides, dilations=dil, groups=groups)
    ref = npref.conv(npref.batchnorm(x, *bn), w, b, **attrs)

    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_forward_conv(w, b, s, t, groups)
    assert w2.shape == w.shape and b2.shape == (c_out,)
    assert_close(npref.conv(x, w2, b2, **attrs), ref)


def test_forward_fold_is_not_exact_with_padding(rng):
    """Why the caller refuses padded convs (math.md section 4): the border differs."""
    x = rand(rng, 1, 2, 5, 5)
    w = rand(rng, 3, 2, 3, 3)
    bn = random_bn(rng, 2)
    s, t = bn_scale_shift(*bn)
    w2, b2 = fold_forward_conv(w, None, s, t, 1)
    pads = (1, 1, 1, 1)
    ref = npref.conv(npref.batchnorm(x, *bn), w, pads=pads)
    got = npref.conv(x, w2, b2, pads=pads)
    assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1])  # interior exact
    assert_not_close(got, ref)


def test_forward_conv_groups_use_their_own_input_channels(rng):
    """A per-group-agnostic rule (scaling axis 1 by s[:C_in/groups]) is wrong; ours is not."""
    groups, cin_g, cout_g = 2, 2, 2
    x = rand(rng, 1, groups * cin_g, 4, 4)
    w = rand(rng, groups * cout_g, cin_g, 2, 2)
    bn = random_bn(rng, groups * cin_g)
    s, t = bn_scale_shift(*bn)
    ref = npref.conv(npref.batchnorm(x, *bn), w, groups=groups)
    w2, b2 = fold_forward_conv(w, None, s, t, groups)
    assert_close(npref.conv(x, w2, b2, groups=groups), ref)
    w_naive = w * s[:cin_g].reshape(1, cin_g, 1, 1)
    b_naive = (w * t[:cin_g].reshape(1, cin_g, 1, 1)).sum(axis=(1, 2, 3))
    assert_not_close(npref.conv(x, w_naive, b_naive, groups=groups), ref)


def test_forward_conv_errors(rng):
    s, t = bn_scale_shift(*random_bn(rng, 4))
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        fold_forward_conv(rand(rng, 4, 2, 3), None, s, t, 3)
    with pytest.raises(ValueError, match="channels"):
        fold_forward_conv(rand(rng, 4, 2, 3), None, s, t, 1)  # C_in = 2 != 4


# ----------------------------------------------------------------------------- validation


def test_shape_validation_messages(rng):
    s, t = bn_scale_shift(*random_bn(rng, 4))
    with pytest.raises(ValueError, match="BN has 4 channels but the Conv \\(C_out\\) has 5"):
        fold_conv(rand(rng, 5, 2, 3), None, s, t)
    with pytest.raises(ValueError, match="bias has 3 channels, expected 4"):
        fold_conv(rand(rng, 4, 2, 3), rand(rng, 3), s, t)
    with pytest.raises(ValueError, match="rank >= 3"):
        fold_conv(rand(rng, 4, 2), None, s, t)
    with pytest.raises(ValueError, match="equal length"):
        fold_conv(rand(rng, 4, 2, 3), None, s, t[:3])
    with pytest.raises(ValueError, match="groups=3 does not divide C_in=4"):
        fold_conv_transpose(rand(rng, 4, 2, 3), None, s, t, 3)
    with pytest.raises(ValueError, match="ConvTranspose"):
        fold_conv_transpose(rand(rng, 4, 2, 3), None, s, t, 1)  # C_out = 2 != 4
    with pytest.raises(ValueError, match="positive integer"):
        fold_conv_transpose(rand(rng, 4, 2, 3), None, s, t, 0)
    with pytest.raises(ValueError, match="positive integer"):
        fold_forward_conv(rand(rng, 4, 2, 3), None, s, t, 1.5)


# ----------------------------------------------------------------------------- purity


def _calls(rng):
    bn4 = random_bn(rng, 4)
    s4, t4 = bn_scale_shift(*bn4)
    s6, t6 = bn_scale_shift(*random_bn(rng, 6))
    yield bn_scale_shift, (*bn4,), {}
    yield fold_conv, (rand(rng, 4, 2, 3, 3), rand(rng, 4), s4, t4), {}
    yield fold_conv_transpose, (rand(rng, 4, 3, 2), rand(rng, 6), s6, t6, 2), {}
    yield fold_gemm, (rand(rng, 6, 5), rand(rng, 1, 6), s6, t6), dict(trans_b=True, alpha=0.5, beta=0.25, n=6)
    yield fold_gemm, (rand(rng, 5, 6), rand(rng, 6), s6, t6), dict(trans_b=False, alpha=1.0, beta=1.0, n=6)
    yield fold_matmul, (rand(rng, 5, 4), rand(rng, 4), s4, t4), {}
    yield fold_forward_conv, (rand(rng, 6, 2, 3), rand(rng, 6), s4, t4, 2), {}
    yield cast_back, (rand(rng, 3, 4), np.float32, rand(rng, 3, 4)), {}


def test_inputs_are_never_modified_nor_aliased(rng):
    for fn, args, kwargs in _calls(rng):
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        before = [a.copy() for a in arrays]
        out = fn(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        for a, b in zip(arrays, before):
            np.testing.assert_array_equal(a, b, err_msg=fn.__name__)
        for o in outs:
            assert o.flags.c_contiguous, fn.__name__
            assert not any(np.shares_memory(o, a) for a in arrays), fn.__name__
            if fn is not cast_back:
                assert o.dtype == np.float64


def test_low_precision_inputs_are_computed_in_float64(rng):
    w16 = rand(rng, 3, 2, 2).astype(np.float16)
    s = np.array([1 / 3, 3.0, 1e-3])
    t = np.array([0.1, 0.2, 0.3])
    w2, b2 = fold_conv(w16, None, s, t)
    assert w2.dtype == np.float64
    np.testing.assert_array_equal(w2, w16.astype(np.float64) * s[:, None, None])
    np.testing.assert_array_equal(b2, t)


def test_public_names():
    assert set(arith.__all__) == {
        "FoldValueError", "bn_scale_shift", "cast_back", "fold_conv", "fold_conv_cast", "fold_conv_transpose",
        "fold_forward_conv", "fold_gemm", "fold_matmul", "groups_divide",
    }


# ----------------------------------------------------------------------------- cast_back


def test_cast_back_float32_round_trip():
    v32 = np.array([[1.5, -2.25e-30], [3.4e38, 7.0]], dtype=np.float32)
    v64 = v32.astype(np.float64)
    out = cast_back(v64, np.float32, original=v32)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, v32)
    # rounding to nearest, not truncation
    np.testing.assert_array_equal(cast_back(np.array([1 / 3]), "float32"), np.float32(1 / 3))


def test_cast_back_returns_c_contiguous_copy():
    v = np.arange(12, dtype=np.float64).reshape(3, 4).T  # Fortran-ordered view
    before = v.copy()
    out = cast_back(v, np.float64)
    assert out.flags.c_contiguous and out.dtype == np.float64
    np.testing.assert_array_equal(out, before)
    np.testing.assert_array_equal(v, before)
    assert not np.shares_memory(out, v)


def test_cast_back_float16_overflow():
    v = np.array([1.0, 65504.0, -2.0])
    np.testing.assert_array_equal(cast_back(v, np.float16), v.astype(np.float16))  # max is fine
    for bad in (70000.0, -1e6, 65520.0):  # 65520 rounds to inf in float16
        with pytest.raises(FoldValueError) as ei:
            cast_back(np.array([1.0, bad]), np.float16)
        assert ei.value.kind == "overflow"
        assert isinstance(ei.value, ValueError)
    assert cast_back(np.array([65519.0]), np.float16)[0] == 65504.0  # rounds down, representable


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cast_back_non_finite_is_overflow(bad, dtype):
    with pytest.raises(FoldValueError) as ei:
        cast_back(np.array([0.5, bad]), dtype)
    assert ei.value.kind == "overflow"


def test_cast_back_float16_underflow():
    tiny16 = float(np.finfo(np.float16).tiny)  # 6.1e-05, smallest normal
    value = np.array([0.5, 1e-6, 1e-9])  # 1e-6 -> subnormal, 1e-9 -> zero in float16
    # originals all normal: the subnormal and the zero both count
    with pytest.raises(FoldValueError) as ei:
        cast_back(value, np.float16, original=np.array([0.3, 0.01, 0.2], np.float16))
    assert ei.value.kind == "underflow"
    assert "2 folded value(s)" in str(ei.value)
    # only the to-zero one with a normal original
    with pytest.raises(FoldValueError, match="1 folded value"):
        cast_back(value, np.float16, original=np.array([0.3, 0.0, 0.2], np.float16))
    # originals zero or subnormal: nothing counts
    orig = np.array([0.3, 0.0, 3e-6], np.float16)
    assert 0 < abs(float(orig[2])) < tiny16
    out = cast_back(value, np.float16, original=orig)
    assert out.dtype == np.float16 and out[2] == 0 and 0 < out[1] < tiny16
    # no original: every nonzero value that becomes zero or subnormal counts
    with pytest.raises(FoldValueError) as ei:
        cast_back(np.array([1e-6]), np.float16)
    assert ei.value.kind == "underflow"
    # a value that is exactly zero never counts
    np.testing.assert_array_equal(cast_back(np.array([0.0, tiny16]), np.float16, np.array([1.0, 1.0])), [0.0, tiny16])


def test_cast_back_float32_underflow():
    with pytest.raises(FoldValueError) as ei:
        cast_back(np.array([1e-40]), np.float32, original=np.array([1.0], np.float32))
    assert ei.value.kind == "underflow"
    cast_back(np.array([1e-40]), np.float32, original=np.array([1e-41], np.float32))  # subnormal original


def test_cast_back_inputs_unchanged():
    v = np.array([1.0, 1e-6, 2.0])
    o = np.array([1.0, 1e-6, 2.0], np.float16)
    v0, o0 = v.copy(), o.copy()
    cast_back(v, np.float16, original=o)
    with pytest.raises(FoldValueError):
        cast_back(v * 1e5, np.float16, original=o)
    np.testing.assert_array_equal(v, v0)
    np.testing.assert_array_equal(o, o0)


def test_cast_back_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    out = cast_back(np.array([1.0, 3.0e38]), "bfloat16")
    assert out.dtype == np.dtype(bf16)
    np.testing.assert_allclose(out.astype(np.float64), [1.0, 3.0e38], rtol=1e-2)
    assert cast_back(np.array([0.5]), bf16).dtype == np.dtype(bf16)
    with pytest.raises(FoldValueError) as ei:
        cast_back(np.array([1e39]), bf16)
    assert ei.value.kind == "overflow"
    with pytest.raises(FoldValueError) as ei:
        cast_back(np.array([1e-40]), bf16, original=np.array([1.0]))
    assert ei.value.kind == "underflow"


def test_cast_back_rejects_other_dtypes_and_shapes():
    with pytest.raises(ValueError, match="supports"):
        cast_back(np.array([1.0]), np.int8)
    with pytest.raises(ValueError, match="shape"):
        cast_back(np.array([1.0, 2.0]), np.float32, original=np.array([1.0]))


def test_fold_value_error_kind():
    e = FoldValueError("underflow", "why")
    assert e.kind == "underflow" and str(e) == "why" and isinstance(e, ValueError)
    assert FoldValueError("overflow").kind == "overflow"
    with pytest.raises(ValueError):
        FoldValueError("other")


# ----------------------------------------------------------------------------- onnxruntime


def _run_ort(model, feeds):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model.ir_version = 10
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _model(nodes, inits, x_shape, y_shape):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(y_shape))],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), name=k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bn_node(inp):
    from onnx import helper

    return helper.make_node("BatchNormalization", [inp, "gamma", "beta", "mean", "var"], ["Y"], epsilon=1e-5)


def _bn_inits(bn):
    gamma, beta, mean, var, _ = bn
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": var}


def _check_ort(unfolded, folded, x, expect):
    """Run the unfolded and the folded graph (each ``(nodes, initializers)``) on ``x`` in
    onnxruntime; both must agree with each other and with the float64 npref result ``expect``."""
    ref = _run_ort(_model(*unfolded, x.shape, expect.shape), {"X": x})
    got = _run_ort(_model(*folded, x.shape, expect.shape), {"X": x})
    assert_close(got, ref, 1e-5)
    assert_close(ref, expect, 1e-5)
    assert_close(got, expect, 1e-5)


def test_ort_conv2d_grouped(rng):
    from onnx import helper

    groups, c_in, c_out = 2, 4, 6
    x = rand(rng, 2, c_in, 7, 6).astype(np.float32)
    w = rand(rng, c_out, c_in // groups, 3, 3).astype(np.float32)
    b = rand(rng, c_out).astype(np.float32)
    bn = random_bn(rng, c_out)
    expect = npref.batchnorm(npref.conv(x, w, b, strides=(2, 1), pads=(1, 0, 0, 1), dilations=(1, 2), groups=groups), *bn)
    attrs = dict(group=groups, strides=[2, 1], pads=[1, 0, 0, 1], dilations=[1, 2])
    w2, b2 = fold_conv(w, b, *bn_scale_shift(*bn))
    _check_ort(
        ([helper.make_node("Conv", ["X", "W", "B"], ["Z"], **attrs), _bn_node("Z")], {"W": w, "B": b, **_bn_inits(bn)}),
        ([helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)], {"W": cast_back(w2, np.float32, w), "B": cast_back(b2, np.float32)}),
        x,
        expect,
    )


@pytest.mark.parametrize("groups,cin_g,cout_g", [(2, 2, 3), (3, 1, 1), (2, 3, 1)], ids=["g2", "depthwise", "g2-cout_g1"])
def test_ort_conv_transpose_grouped(rng, groups, cin_g, cout_g):
    from onnx import helper

    c_in, c_out = groups * cin_g, groups * cout_g
    x = rand(rng, 2, c_in, 4, 5).astype(np.float32)
    w = rand(rng, c_in, cout_g, 3, 2).astype(np.float32)
    b = rand(rng, c_out).astype(np.float32)
    bn = random_bn(rng, c_out)
    expect = npref.batchnorm(
        npref.conv_transpose(x, w, b, strides=(2, 3), pads=(1, 0, 0, 1), output_padding=(1, 2), groups=groups), *bn
    )
    attrs = dict(group=groups, strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2])
    w2, b2 = fold_conv_transpose(w, b, *bn_scale_shift(*bn), groups=groups)
    _check_ort(
        ([helper.make_node("ConvTranspose", ["X", "W", "B"], ["Z"], **attrs), _bn_node("Z")], {"W": w, "B": b, **_bn_inits(bn)}),
        ([helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"], **attrs)], {"W": cast_back(w2, np.float32, w), "B": cast_back(b2, np.float32)}),
        x,
        expect,
    )


@pytest.mark.parametrize("trans_a,trans_b,c_shape", [(0, 1, (N,)), (1, 0, (1, N)), (0, 0, ()), (1, 1, None)])
def test_ort_gemm(rng, trans_a, trans_b, c_shape):
    from onnx import helper

    alpha, beta = 0.5, 0.25
    x = (rand(rng, K, M) if trans_a else rand(rng, M, K)).astype(np.float32)
    bmat = (rand(rng, N, K) if trans_b else rand(rng, K, N)).astype(np.float32)
    c = None if c_shape is None else np.asarray(rng.standard_normal(c_shape), np.float32)
    bn = random_bn(rng, N)
    expect = npref.batchnorm(npref.gemm(x, bmat, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b), *bn)
    inputs, inits = (["X", "Bm"], {"Bm": bmat}) if c is None else (["X", "Bm", "C"], {"Bm": bmat, "C": c})
    b2, c2 = fold_gemm(bmat, c, *bn_scale_shift(*bn), trans_b=bool(trans_b), alpha=alpha, beta=beta, n=N)
    _check_ort(
        (
            [helper.make_node("Gemm", inputs, ["Z"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b), _bn_node("Z")],
            {**inits, **_bn_inits(bn)},
        ),
        (
            [helper.make_node("Gemm", ["X", "Bm", "C"], ["Y"], alpha=alpha, beta=1.0, transA=trans_a, transB=trans_b)],
            {"Bm": cast_back(b2, np.float32, bmat), "C": cast_back(c2, np.float32)},
        ),
        x,
        expect,
    )


def test_ort_forward_conv_grouped(rng):
    from onnx import helper

    groups, c_in, c_out = 2, 4, 6
    x = rand(rng, 1, c_in, 6, 6).astype(np.float32)
    w = rand(rng, c_out, c_in // groups, 3, 2).astype(np.float32)
    bn = random_bn(rng, c_in)
    expect = npref.conv(npref.batchnorm(x, *bn), w, strides=(1, 2), dilations=(2, 1), groups=groups)
    attrs = dict(group=groups, strides=[1, 2], dilations=[2, 1])
    bn_node = helper.make_node("BatchNormalization", ["X", "gamma", "beta", "mean", "var"], ["Z"], epsilon=1e-5)
    w2, b2 = fold_forward_conv(w, None, *bn_scale_shift(*bn), groups=groups)
    _check_ort(
        ([bn_node, helper.make_node("Conv", ["Z", "W"], ["Y"], **attrs)], {"W": w, **_bn_inits(bn)}),
        ([helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)], {"W": cast_back(w2, np.float32, w), "B": cast_back(b2, np.float32)}),
        x,
        expect,
    )


def test_cast_back_finds_non_finite_values_past_the_first_chunk():
    # the fast path scans in chunks; a NaN or an overflow far into a large array must still be seen
    from bnfold.formulas.arith import _CHUNK

    for bad in (np.nan, 1e39):
        v = np.ones(3 * _CHUNK + 7)
        v[2 * _CHUNK + 3] = bad
        with pytest.raises(FoldValueError) as info:
            cast_back(v, np.dtype(np.float32))
        assert info.value.kind == "overflow"


# ----------------------------------------------------------------------------- fold_conv_cast


def _cast_reference(w, b, s, t):
    w2, b2 = fold_conv(w, b, s, t)
    b_orig = b.astype(np.float64) if b is not None else np.zeros_like(b2)
    return cast_back(w2, w.dtype, original=w), cast_back(b2, (b if b is not None else w).dtype, original=b_orig)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (96, 64, 3, 3), (700, 1, 3, 3, 3), (3, 40000, 3)])
def test_fold_conv_cast_equals_fold_then_cast(rng, dtype, with_bias, shape):
    # bit for bit: the blocked path (weights above one chunk) multiplies and rounds each element
    # exactly as fold_conv + cast_back do; rows wider than a chunk go one row per block
    # magnitudes far from float16's limits, so that every case folds
    w = (rng.uniform(0.05, 1, shape) * rng.choice([-1, 1], shape)).astype(dtype)
    w.reshape(-1)[:: 17] = 0  # zeros defeat cast_back's fast range check, in many blocks
    b = rng.standard_normal(shape[0]).astype(dtype) if with_bias else None
    s, t = rng.uniform(0.2, 3, shape[0]), rng.standard_normal(shape[0])
    got_w, got_b = fold_conv_cast(w, b, s, t)
    ref_w, ref_b = _cast_reference(w, b, s, t)
    assert got_w.dtype == ref_w.dtype and got_b.dtype == ref_b.dtype
    np.testing.assert_array_equal(got_w, ref_w)
    np.testing.assert_array_equal(got_b, ref_b)
    assert got_w.flags.c_contiguous and not np.shares_memory(got_w, w)


@pytest.mark.parametrize("kind, scale", [("overflow", 1e6), ("underflow", 1e-9)])
def test_fold_conv_cast_errors_name_every_value(rng, kind, scale):
    # a value that does not fit, far into a large weight: the same error, with the count over the
    # whole weight, as the unblocked computation
    w = rng.uniform(0.5, 1, (512, 32, 3, 3)).astype(np.float16)
    s = np.ones(512)
    s[[300, 301, 505]] = scale
    with pytest.raises(FoldValueError) as ref:
        _cast_reference(w, None, s, np.zeros(512))
    with pytest.raises(FoldValueError) as got:
        fold_conv_cast(w, None, s, np.zeros(512))
    assert got.value.kind == ref.value.kind == kind
    assert str(got.value) == str(ref.value) and str(3 * 32 * 9) in str(got.value)


def test_fold_conv_cast_shape_errors_as_fold_conv(rng):
    w = rng.standard_normal((600, 600, 1, 1)).astype(np.float32)
    for s in (np.ones(599), np.ones((600, 1))):
        with pytest.raises(ValueError) as ref:
            fold_conv(w, None, s, np.zeros(600))
        with pytest.raises(ValueError) as got:
            fold_conv_cast(w, None, s, np.zeros(600))
        assert str(got.value) == str(ref.value)
