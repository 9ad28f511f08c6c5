"""Random fold graphs for tests/test_fuzz_fold_graphs.py: a hypothesis strategy of ``Case``s and
the ONNX model each one describes, with the decision bnfold should take for every BN.

A case is one producer (Conv 1D/2D/3D, ConvTranspose, Gemm, MatMul[+Add]) with a BN after it
(through a chain of nodes the planner looks through, or one it must stop at), before it (a
forward fold candidate), or both; optionally a second node sharing the weight but no BN; one
dtype for the whole graph; BNs in inference mode with random statistics or in training mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import DOUBLE, FLOAT, FLOAT16, init, make_model, vi
from hypothesis import strategies as st
from onnx import helper

ELEM = {"float32": FLOAT, "float16": FLOAT16, "float64": DOUBLE}
# chain links the planner looks through (bnfold/stages/plan.py LOOK_THROUGH) and two it must stop at
PASS_LINKS = ("identity", "add", "reshape", "unsqueeze", "unsqueeze_squeeze")
STOP_LINKS = ("relu", "transpose")


def report_line(request: pytest.FixtureRequest, line: str) -> None:
    """Write ``line`` to the terminal (case and exit counts of a fuzz module), past output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    if capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    else:
        reporter.write_line(line)


@dataclass(frozen=True)
class Case:
    op: str  # Conv | ConvTranspose | Gemm | MatMul
    dtype: str
    where: str  # after | before | both: where the BN sits relative to the producer
    chain: tuple[str, ...]  # links between the producer and the BN after it
    shared: bool  # a second producer reads the same weight (and bias), no BN after it
    training: bool
    bias: bool
    groups: int = 1
    cin_g: int = 1
    cout_g: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pad_mode: str = "explicit"  # explicit | SAME_UPPER | SAME_LOWER | VALID (Conv only)
    pads: tuple[int, ...] = ()
    out_pad: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()
    k: int = 1  # Gemm/MatMul: inner size
    m: int = 1  # Gemm/MatMul: output columns
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    c_shape: tuple[int, ...] | None = None  # Gemm C
    seed: int = 0

    @property
    def c_out(self) -> int:
        return self.groups * self.cout_g if self.op in ("Conv", "ConvTranspose") else self.m

    @property
    def c_in(self) -> int:
        return self.groups * self.cin_g if self.op in ("Conv", "ConvTranspose") else self.k

    def forward_foldable(self) -> bool:
        """A BN before the producer folds forward only into a Conv that pads nothing."""
        padded = self.pad_mode in ("SAME_UPPER", "SAME_LOWER") or (self.pad_mode == "explicit" and any(self.pads))
        return self.op == "Conv" and not padded

    def backward_foldable(self) -> bool:
        return not any(link in STOP_LINKS for link in self.chain)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    op = draw(st.sampled_from(["Conv", "Conv", "ConvTranspose", "Gemm", "MatMul"]))
    common = dict(op=op, dtype=draw(st.sampled_from(sorted(ELEM))),
                  where=draw(st.sampled_from(["after", "after", "before", "both"])),
                  chain=tuple(draw(st.lists(st.sampled_from(PASS_LINKS + STOP_LINKS), max_size=3))),
                  shared=draw(st.booleans()), training=draw(st.booleans()), bias=draw(st.booleans()),
                  seed=draw(st.integers(0, 2**31 - 1)))
    if op in ("Gemm", "MatMul"):
        extra: dict[str, object] = dict(k=draw(st.integers(1, 6)), m=draw(st.integers(1, 6)))
        if op == "Gemm":
            extra.update(trans_a=draw(st.booleans()), trans_b=draw(st.booleans()),
                         alpha=draw(st.sampled_from([1.0, 0.5, -1.5, 2.0])),
                         beta=draw(st.sampled_from([1.0, 0.25, -2.0])),
                         c_shape=draw(st.sampled_from([(), (1,), ("m",), (1, "m")])) if common["bias"] else None)
            if extra["c_shape"] is not None:
                extra["c_shape"] = tuple(extra["m"] if d == "m" else d for d in extra["c_shape"])  # type: ignore
        return Case(**common, **extra)  # type: ignore[arg-type]
    d = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(d))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(d))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pads = tuple(draw(st.integers(0, kernel[i % d] - 1)) for i in range(2 * d))  # pads below the kernel size
    if draw(st.booleans()):  # unpadded half the time: the Conv a BN before it can fold forward into
        pads = (0,) * (2 * d)
    extent = [dilations[i] * (kernel[i] - 1) + 1 for i in range(d)]
    top = 2 if d == 3 else 4
    spatial = tuple(draw(st.integers(extent[i], extent[i] + top)) for i in range(d))
    extra = dict(groups=draw(st.integers(1, 3)), cin_g=draw(st.integers(1, 2)), cout_g=draw(st.integers(1, 3)),
                 kernel=kernel, strides=strides, dilations=dilations, pads=pads, spatial=spatial)
    if op == "Conv":
        extra["pad_mode"] = draw(st.sampled_from(["explicit", "explicit", "SAME_UPPER", "SAME_LOWER", "VALID"]))
        if extra["pad_mode"] in ("SAME_UPPER", "SAME_LOWER"):  # onnxruntime: "Dilation not supported for SAME_*"
            extra["dilations"] = (1,) * d
    else:
        extra["out_pad"] = tuple(draw(st.integers(0, strides[i] - 1)) for i in range(d))
    return Case(**common, **extra)  # type: ignore[arg-type]


@dataclass
class Built:
    model: onnx.ModelProto
    expect: dict[str, str]  # BN name -> "folded" | "kept"
    weight: np.ndarray  # the (shared) weight as stored
    input_shape: tuple[int, ...]  # one sample's shape (no batch axis)


def _weights(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    # magnitudes in [0.1, 1]: no weight near float16's subnormal range, where a scaled copy would
    # underflow (DTYPE_OVERFLOW, a refusal this fuzz does not aim at)
    mag = rng.uniform(0.1, 1.0, shape)
    return (mag * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def _bn_node(name: str, x: str, y: str, c: int, rng: np.random.Generator, dtype: np.dtype,
             training: bool) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    values = [rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), rng.standard_normal(c),
              rng.standard_normal(c), rng.uniform(0.5, 2.0, c)]
    names = [f"{name}.{p}" for p in ("scale", "bias", "mean", "var")]
    attrs = {"training_mode": 1} if training else {}
    outs = [y, f"{name}.running_mean", f"{name}.running_var"] if training else [y]  # opset 15+: 3 in training
    node = helper.make_node("BatchNormalization", [x, *names], outs, name=name, epsilon=1e-3, **attrs)
    return node, [init(n, v.astype(dtype)) for n, v in zip(names, values)]


def _producer(case: Case, name: str, x: str, out: str) -> onnx.NodeProto:
    ins = [x, "w"] + (["b"] if case.bias and case.op in ("Conv", "ConvTranspose", "Gemm") else [])
    if case.op == "Gemm":
        return helper.make_node("Gemm", ins, [out], name=name, transA=int(case.trans_a), transB=int(case.trans_b),
                                alpha=case.alpha, beta=case.beta)
    if case.op == "MatMul":
        return helper.make_node("MatMul", [x, "w"], [out], name=name)
    attrs: dict[str, object] = dict(group=case.groups, strides=list(case.strides), dilations=list(case.dilations),
                                    kernel_shape=list(case.kernel))
    if case.pad_mode == "explicit":
        attrs["pads"] = list(case.pads)
    else:
        attrs["auto_pad"] = case.pad_mode
    if case.op == "ConvTranspose":
        attrs["output_padding"] = list(case.out_pad)
    return helper.make_node(case.op, ins, [out], name=name, **attrs)


def build(case: Case) -> Built:
    rng = np.random.default_rng(case.seed)
    dtype = np.dtype(case.dtype)
    elem = ELEM[case.dtype]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    expect: dict[str, str] = {}
    conv_like = case.op in ("Conv", "ConvTranspose")
    in_shape = (case.c_in, *case.spatial) if conv_like else (case.k,)
    if case.op == "Conv":
        w_shape = (case.c_out, case.cin_g, *case.kernel)
    elif case.op == "ConvTranspose":
        w_shape = (case.c_in, case.cout_g, *case.kernel)
    elif case.op == "Gemm":
        w_shape = (case.m, case.k) if case.trans_b else (case.k, case.m)
    else:
        w_shape = (case.k, case.m)
    weight = _weights(rng, w_shape, dtype)
    inits.append(init("w", weight))
    if case.bias:
        b_shape = case.c_shape if case.op == "Gemm" and case.c_shape is not None else (case.c_out,)
        inits.append(init("b", rng.standard_normal(b_shape).astype(dtype)))

    x = "x"
    if case.where in ("before", "both"):
        node, params = _bn_node("bn_before", "x", "x_bn", case.c_in, rng, dtype, case.training)
        nodes.append(node)
        inits += params
        x = "x_bn"
        expect["bn_before"] = "folded" if case.forward_foldable() else "kept"
    raw_x = "x"
    if case.op == "Gemm" and case.trans_a:  # A arrives transposed: (K, N)
        nodes.append(helper.make_node("Transpose", [x], ["xt"], name="to_a", perm=[1, 0]))
        x = "xt"
        if case.shared:
            nodes.append(helper.make_node("Transpose", ["x"], ["xt_raw"], name="to_a_raw", perm=[1, 0]))
            raw_x = "xt_raw"
    cur = "p"
    nodes.append(_producer(case, "op", x, "p"))
    if case.op == "MatMul" and case.bias:  # MatMul + Add: the Add is a look-through link
        nodes.append(helper.make_node("Add", ["p", "b"], ["p_b"], name="op_bias"))
        cur = "p_b"
    outputs = []
    rank = out_rank = 2 + len(case.spatial) if conv_like else 2
    if case.where in ("after", "both"):
        for i, link in enumerate(case.chain):
            cur, rank = _link(link, i, cur, rank, case.c_out, dtype, nodes, inits)
        node, params = _bn_node("bn_after", cur, "y", case.c_out, rng, dtype, case.training)
        nodes.append(node)
        inits += params
        expect["bn_after"] = "folded" if case.backward_foldable() else "kept"
        outputs.append(vi("y", rank, elem))
    else:
        outputs.append(vi(cur, rank, elem))
    if case.shared:  # the same weight read by a second node that has no BN
        nodes.append(_producer(case, "op_shared", raw_x, "y_shared"))
        outputs.append(vi("y_shared", out_rank, elem))
    model = make_model(nodes, [vi("x", ["N", *in_shape], elem)], outputs, inits)
    # intermediate shapes, as exporters write them (without, a MatMul after a BN is UNKNOWN_RANK)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return Built(model, expect, weight, in_shape)


def _link(link: str, i: int, cur: str, rank: int, c: int, dtype: np.dtype, nodes: list[onnx.NodeProto],
          inits: list[onnx.TensorProto]) -> tuple[str, int]:
    """Append one chain link after ``cur`` (rank ``rank``, ``c`` channels on axis 1)."""
    out = f"l{i}"
    if link == "identity":
        nodes.append(helper.make_node("Identity", [cur], [out], name=f"id{i}"))
    elif link == "add":  # a per-channel constant, broadcast over every axis but 1
        inits.append(init(f"add{i}.c", np.linspace(-1, 1, c).reshape((c,) + (1,) * (rank - 2)).astype(dtype)))
        nodes.append(helper.make_node("Add", [cur, f"add{i}.c"], [out], name=f"add{i}"))
    elif link == "reshape":  # (N, C, ...) -> (N, C, prod(...)), the batch axis copied with 0
        inits.append(init(f"shape{i}", np.array([0, c, -1], dtype=np.int64)))
        nodes.append(helper.make_node("Reshape", [cur, f"shape{i}"], [out], name=f"reshape{i}"))
        return out, 3
    elif link in ("unsqueeze", "unsqueeze_squeeze"):
        inits.append(init(f"axes{i}", np.array([rank], dtype=np.int64)))
        mid = out if link == "unsqueeze" else f"l{i}_u"
        nodes.append(helper.make_node("Unsqueeze", [cur, f"axes{i}"], [mid], name=f"unsqueeze{i}"))
        if link == "unsqueeze":
            return out, rank + 1
        nodes.append(helper.make_node("Squeeze", [mid, f"axes{i}"], [out], name=f"squeeze{i}"))
    elif link == "transpose" and rank >= 4:  # swaps the last two spatial axes: not a look-through node
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        nodes.append(helper.make_node("Transpose", [cur], [out], name=f"transpose{i}", perm=perm))
    else:  # relu, or a transpose with fewer than two spatial axes
        nodes.append(helper.make_node("Relu", [cur], [out], name=f"relu{i}"))
    return out, rank

