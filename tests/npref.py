"""Float64 numpy reference implementations of the operators bnfold folds into.

Written from the ONNX operator definitions, independently of ``bnfold.formulas.arith``: clarity over
speed. Layouts and attribute conventions are ONNX's:

* ``conv``: x ``(N, C_in, *spatial)``, W ``(C_out, C_in/groups, *k)``; ``pads`` is
  ``[begin_0, ..., begin_{d-1}, end_0, ..., end_{d-1}]``.
* ``conv_transpose``: W ``(C_in, C_out/groups, *k)``; output size per axis is
  ``stride*(in-1) + output_padding + (k-1)*dilation + 1 - pad_begin - pad_end``.
* ``gemm``: ``alpha * op(A) @ op(B) + beta * C`` with unidirectional broadcasting of C.
* ``batchnorm``: inference mode, channel axis 1.
"""
from __future__ import annotations

import itertools

import numpy as np


def _tuple(v, d, default):
    return tuple([default] * d if v is None else v)


def conv(x, w, b=None, *, strides=None, pads=None, dilations=None, groups=1):
    """ONNX Conv in float64, by summing one kernel tap at a time."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    d = x.ndim - 2
    strides = _tuple(strides, d, 1)
    dilations = _tuple(dilations, d, 1)
    pads = _tuple(pads, 2 * d, 0)
    n, c_in = x.shape[:2]
    c_out, cin_g = w.shape[:2]
    kernel = w.shape[2:]
    assert c_in == cin_g * groups and c_out % groups == 0
    cout_g = c_out // groups

    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[d + i]) for i in range(d)])
    out_sizes = [
        (xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(d)
    ]
    assert all(o >= 1 for o in out_sizes), "empty output"

    xg = xp.reshape((n, groups, cin_g) + xp.shape[2:])
    wg = w.reshape((groups, cout_g, cin_g) + kernel)
    y = np.zeros((n, groups, cout_g) + tuple(out_sizes))
    for tap in itertools.product(*[range(k) for k in kernel]):
        window = (slice(None),) * 3 + tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (out_sizes[i] - 1) + 1, strides[i])
            for i in range(d)
        )
        xs = xg[window]  # (n, groups, cin_g, *out)
        wt = wg[(slice(None),) * 3 + tap]  # (groups, cout_g, cin_g)
        y += np.einsum("ngc...,goc->ngo...", xs, wt)
    y = y.reshape((n, c_out) + tuple(out_sizes))
    if b is not None:
        y += np.asarray(b, dtype=np.float64).reshape((1, c_out) + (1,) * d)
    return y


def conv_transpose(x, w, b=None, *, strides=None, pads=None, output_padding=None, dilations=None, groups=1):
    """ONNX ConvTranspose in float64, by scattering one kernel tap at a time."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    d = x.ndim - 2
    strides = _tuple(strides, d, 1)
    dilations = _tuple(dilations, d, 1)
    pads = _tuple(pads, 2 * d, 0)
    output_padding = _tuple(output_padding, d, 0)
    n, c_in = x.shape[:2]
    in_sizes = x.shape[2:]
    cin_w, cout_g = w.shape[:2]
    kernel = w.shape[2:]
    assert c_in == cin_w and c_in % groups == 0
    cin_g = c_in // groups
    c_out = cout_g * groups

    full = [strides[i] * (in_sizes[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 + output_padding[i] for i in range(d)]
    y = np.zeros((n, groups, cout_g) + tuple(full))
    xg = x.reshape((n, groups, cin_g) + in_sizes)
    wg = w.reshape((groups, cin_g, cout_g) + kernel)
    for tap in itertools.product(*[range(k) for k in kernel]):
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None),) * 3 + tap])
        target = (slice(None),) * 3 + tuple(
            slice(tap[i] * dilations[i], tap[i] * dilations[i] + strides[i] * (in_sizes[i] - 1) + 1, strides[i])
            for i in range(d)
        )
        y[target] += contrib
    crop = (slice(None),) * 3 + tuple(slice(pads[i], full[i] - pads[d + i]) for i in range(d))
    y = y[crop].reshape((n, c_out) + tuple(f - pads[i] - pads[d + i] for i, f in enumerate(full)))
    if b is not None:
        y = y + np.asarray(b, dtype=np.float64).reshape((1, c_out) + (1,) * d)
    return y


def gemm(a, b, c=None, *, alpha=1.0, beta=1.0, trans_a=False, trans_b=False):
    """ONNX Gemm in float64: ``alpha * op(A) @ op(B) + beta * C``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if trans_a:
        a = a.T
    if trans_b:
        b = b.T
    y = alpha * (a @ b)
    if c is not None:
        y = y + beta * np.broadcast_to(np.asarray(c, dtype=np.float64), y.shape)
    return y


def batchnorm(x, gamma, beta, mean, var, eps):
    """Inference BatchNormalization on channel axis 1, straight from the definition."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    shape = (1, c) + (1,) * (x.ndim - 2)

    def per_channel(v, default):
        v = np.full(c, default, dtype=np.float64) if v is None else np.asarray(v, dtype=np.float64)
        return v.reshape(shape)

    g, bt, mu, vr = per_channel(gamma, 1.0), per_channel(beta, 0.0), per_channel(mean, 0.0), per_channel(var, 1.0)
    return g * (x - mu) / np.sqrt(vr + eps) + bt
