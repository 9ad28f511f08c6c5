#!/usr/bin/env python
"""Write bnfold's benchmark models (random weights, fixed seed) with onnx.helper + numpy.

    python benchmarks/make_bench_models.py --out DIR [--data] [--samples 16] [--image-size 224]
                                           [--only resnet50,chain2000] [--chain-blocks 2000]
                                           [--chain-channels 8] [--no-check]

  resnet50.onnx        ResNet-50 layer structure (torchvision v1.5: stride on the 3x3 conv):
                       stem 7x7/2 conv 64 + BN + ReLU + 3x3/2 maxpool; bottleneck stages [3,4,6,3],
                       widths 64/128/256/512, expansion 4, 1x1 conv+BN downsample on the first
                       block of each stage; global average pool; Flatten; Gemm 2048->1000.
                       25,557,032 parameters (as torchvision's; ~100 MB), 53 inference-mode BNs.
                       Input 'images' (N,3,S,S) with S = --image-size; output 'logits' (N,1000).
  chain2000.onnx       2000 x [Conv 3x3 C->C pads 1 (with bias) -> BN -> Relu], input 'x' (1,C,16,16),
                       output 'y'. C = --chain-channels (8: ~5 MB; 16: ~19 MB, the size of the
                       "20 MB chain" in docs/pitfalls timings).
  with --data:
  resnet50_train.onnx  the same ResNet-50 with every BN training_mode=1, momentum 0.9 and three
                       named outputs (Y, <bn>.running_mean_out, <bn>.running_var_out), for
                       calibration benchmarks.
  resnet50_calib.npz   --samples images (3,S,S) float32 under key 'images' (16 x 224: 9.6 MB).

All models: float32, opset 17, ir_version 10, inference-mode BNs with random but plausible
running statistics: they are the input statistics measured on random images (ResNet-50: with an
onnxruntime probe in training mode; chain: layer by layer in numpy), then perturbed (mean shifted
by ~0.2 std, variance scaled by 0.7..1.4). So activations stay O(1) through all 2000 blocks
and a fold error is not hidden by overflow or by everything collapsing to 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10


class GraphBuilder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.bns: list[tuple[str, int]] = []  # (BN prefix, channels)
        self.params = 0  # trainable parameters, torchvision's count (BN gamma/beta, no stats)

    def init(self, name: str, arr: np.ndarray, trainable: bool = True) -> str:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.inits.append(numpy_helper.from_array(arr, name))
        if trainable:
            self.params += arr.size
        return name

    def conv(self, name, x, cin, cout, k, stride=1, pad=0, bias=False, group=1):
        std = np.sqrt(2.0 / (cin // group * k * k))  # He init
        w = self.rng.standard_normal((cout, cin // group, k, k), dtype=np.float32) * np.float32(std)
        inputs = [x, self.init(f"{name}.weight", w)]
        if bias:
            inputs.append(self.init(f"{name}.bias", 0.1 * self.rng.standard_normal(cout, dtype=np.float32)))
        self.nodes.append(helper.make_node(
            "Conv", inputs, [f"{name}.out"], name=name, kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad] * 4, group=group, dilations=[1, 1]))
        return f"{name}.out"

    def bn(self, name, x, c, eps=1e-5, gamma=(0.5, 1.5), beta_over_gamma=None):
        g = self.rng.uniform(*gamma, c).astype(np.float32)
        self.init(f"{name}.weight", g)
        if beta_over_gamma is None:
            beta = 0.2 * self.rng.standard_normal(c, dtype=np.float32)
        else:
            beta = g * self.rng.uniform(*beta_over_gamma, c).astype(np.float32)
        self.init(f"{name}.bias", beta)
        # placeholders, replaced by set_bn_stats()
        self.init(f"{name}.running_mean", np.zeros(c, np.float32), trainable=False)
        self.init(f"{name}.running_var", np.ones(c, np.float32), trainable=False)
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [x, f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"],
            [f"{name}.out"], name=name, epsilon=eps, momentum=0.9, training_mode=0))
        self.bns.append((name, c))
        return f"{name}.out"

    def op(self, op_type, name, inputs, **attrs):
        self.nodes.append(helper.make_node(op_type, list(inputs), [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def model(self, graph_name, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-bench-builder")
        m.ir_version = IR_VERSION
        return m


def set_bn_stats(model: onnx.ModelProto, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    by_name = {t.name: t for t in model.graph.initializer}
    for bn, (mean, var) in stats.items():
        by_name[f"{bn}.running_mean"].CopyFrom(numpy_helper.from_array(mean.astype(np.float32), f"{bn}.running_mean"))
        by_name[f"{bn}.running_var"].CopyFrom(numpy_helper.from_array(var.astype(np.float32), f"{bn}.running_var"))


def perturb(rng, mean, var):
    """Random running statistics near the measured ones."""
    std = np.sqrt(var)
    mean = mean + 0.2 * std * rng.standard_normal(mean.shape)
    var = var * rng.uniform(0.7, 1.4, var.shape)
    return mean.astype(np.float32), np.maximum(var, 1e-4).astype(np.float32)


def to_training(model: onnx.ModelProto, momentum: float = 0.9, expose_stats: bool = False) -> onnx.ModelProto:
    """Copy with every BN in training mode, three named outputs; with expose_stats the running
    outputs become graph outputs (used with momentum 0 to read each BN's batch statistics)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        keep = [a for a in n.attribute if a.name not in ("momentum", "training_mode")]
        del n.attribute[:]
        n.attribute.extend(keep + [helper.make_attribute("momentum", momentum),
                                   helper.make_attribute("training_mode", 1)])
        outs = [f"{n.name}.running_mean_out", f"{n.name}.running_var_out"]
        n.output.extend(outs)
        if expose_stats:
            m.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs)
    return m


def make_images(rng, n, size):
    low = size // 8
    x = rng.standard_normal((n, 3, low, low), dtype=np.float32)
    x = np.repeat(np.repeat(x, size // low, axis=2), size // low, axis=3)
    x = x + 0.3 * rng.standard_normal((n, 3, size, size), dtype=np.float32)
    mean = np.array([0.4, -0.2, 0.1], np.float32)[None, :, None, None]
    scale = np.array([1.0, 0.8, 1.3], np.float32)[None, :, None, None]
    return np.ascontiguousarray(x * scale + mean, dtype=np.float32)


def ort_session(model_or_path, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model_or_path if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, so, providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    return sess


# --------------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------------


def resnet50_graph(seed: int, image_size: int) -> tuple[onnx.ModelProto, GraphBuilder]:
    b = GraphBuilder(np.random.default_rng(seed))
    x = b.conv("conv1", "images", 3, 64, 7, stride=2, pad=3)
    x = b.bn("bn1", x, 64)
    x = b.op("Relu", "relu", [x])
    x = b.op("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for li, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), start=1):
        for bi in range(blocks):
            p = f"layer{li}.{bi}"
            stride = 2 if (bi == 0 and li > 1) else 1
            cout = width * 4
            idt = x
            if bi == 0:
                idt = b.conv(f"{p}.downsample.0", x, cin, cout, 1, stride=stride)
                idt = b.bn(f"{p}.downsample.1", idt, cout)
            y = b.op("Relu", f"{p}.relu1", [b.bn(f"{p}.bn1", b.conv(f"{p}.conv1", x, cin, width, 1), width)])
            y = b.op("Relu", f"{p}.relu2",
                     [b.bn(f"{p}.bn2", b.conv(f"{p}.conv2", y, width, width, 3, stride=stride, pad=1), width)])
            y = b.bn(f"{p}.bn3", b.conv(f"{p}.conv3", y, width, cout, 1), cout)
            x = b.op("Relu", f"{p}.relu3", [b.op("Add", f"{p}.add", [y, idt])])
            cin = cout
    x = b.op("GlobalAveragePool", "avgpool", [x])
    x = b.op("Flatten", "flatten", [x], axis=1)
    fc_w = b.init("fc.weight", b.rng.standard_normal((1000, 2048), dtype=np.float32) * np.float32(1 / np.sqrt(2048)))
    fc_b = b.init("fc.bias", 0.01 * b.rng.standard_normal(1000, dtype=np.float32))
    b.nodes.append(helper.make_node("Gemm", [x, fc_w, fc_b], ["logits"], name="fc", transB=1))
    model = b.model(
        "resnet50",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])])
    return model, b


def build_resnet50(out: Path, seed: int, image_size: int, with_train: bool, check: bool) -> list[dict]:
    t0 = time.perf_counter()
    model, b = resnet50_graph(seed, image_size)
    # Measure each BN's input statistics with a training-mode probe (momentum 0: the running
    # outputs are the batch mean / variance), then store perturbed versions of them.
    probe = to_training(model, momentum=0.0, expose_stats=True)
    images = make_images(np.random.default_rng(seed + 1), 4, image_size)
    sess = ort_session(probe)
    names = [o.name for o in sess.get_outputs()]
    res = dict(zip(names, sess.run(None, {"images": images})))
    del sess, probe
    rng = np.random.default_rng(seed + 2)
    stats = {bn: perturb(rng, res[f"{bn}.running_mean_out"], res[f"{bn}.running_var_out"]) for bn, _ in b.bns}
    set_bn_stats(model, stats)
    built = [(out / "resnet50.onnx", model, time.perf_counter() - t0)]
    if with_train:
        t1 = time.perf_counter()
        built.append((out / "resnet50_train.onnx", to_training(model, momentum=0.9), time.perf_counter() - t1))
    reports = []
    for path, m, t_build in built:
        t1 = time.perf_counter()
        onnx.checker.check_model(m)
        path.write_bytes(m.SerializeToString())
        reports.append(report(path, m, t_build + time.perf_counter() - t1, b.params,
                              {"images": images[:2]} if check else None))
    return reports


# --------------------------------------------------------------------------------------------
# chain of Conv -> BN -> Relu
# --------------------------------------------------------------------------------------------


def _conv3x3_np(x, w, bias):
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * 9)
    y = cols @ w.reshape(w.shape[0], -1).T + bias
    return y.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)


# BN output = gamma * z + beta with beta = gamma * U(1.5, 3): ReLU rarely clips. With beta
# around 0 the fixed-statistics chain is chaotic (as random BN+ReLU nets are): float32 rounding
# grows ~1.2x per block and onnxruntime's output is inf/NaN after 2000 blocks even though the
# numpy float64 reference is O(1). With this offset it is weakly contracting: onnxruntime vs
# float64 differ by ~1e-5, but a parameter error more than a few hundred blocks before the
# output fades below that (see README / report).
CHAIN_GAMMA = (0.5, 1.5)
CHAIN_BETA = (1.5, 3.0)


def build_chain(out: Path, seed: int, blocks: int, channels: int, check: bool) -> list[dict]:
    t0 = time.perf_counter()
    b = GraphBuilder(np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    xin = rng.standard_normal((1, channels, 16, 16)).astype(np.float32)
    x_np = xin.astype(np.float64)
    name = "x"
    stats = {}
    for i in range(blocks):
        p = f"block{i}"
        name = b.conv(f"{p}.conv", name, channels, channels, 3, pad=1, bias=True)
        w = numpy_helper.to_array(b.inits[-2]).astype(np.float64)
        bias = numpy_helper.to_array(b.inits[-1]).astype(np.float64)
        name = b.bn(f"{p}.bn", name, channels, gamma=CHAIN_GAMMA, beta_over_gamma=CHAIN_BETA)
        x_np = _conv3x3_np(x_np, w, bias)
        mean, var = perturb(rng, x_np.mean(axis=(0, 2, 3)), x_np.var(axis=(0, 2, 3)))
        stats[f"{p}.bn"] = (mean, var)
        gamma = numpy_helper.to_array(b.inits[-4]).astype(np.float64)
        beta = numpy_helper.to_array(b.inits[-3]).astype(np.float64)
        sh = (1, channels, 1, 1)
        x_np = (x_np - mean.reshape(sh)) / np.sqrt(var.reshape(sh).astype(np.float64) + 1e-5) * gamma.reshape(sh) + beta.reshape(sh)
        name = b.op("Relu", f"{p}.relu", [name])
        x_np = np.maximum(x_np, 0)
    b.nodes[-1].output[0] = "y"
    model = b.model(
        f"chain{blocks}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 16, 16])])
    set_bn_stats(model, stats)
    onnx.checker.check_model(model)
    path = out / f"chain{blocks}.onnx"
    path.write_bytes(model.SerializeToString())
    r = report(path, model, time.perf_counter() - t0, b.params, {"x": xin} if check else None)
    if check:
        y = ort_session(path).run(None, {"x": xin})[0]
        r["max_abs_diff_vs_numpy"] = float(np.abs(y - x_np).max())
        r["output_abs_mean"] = float(np.abs(x_np).mean())
    return [r]


# --------------------------------------------------------------------------------------------


def report(path: Path, model: onnx.ModelProto, t_build: float, params: int, feed) -> dict:
    g = model.graph
    bn_modes = sorted({next((a.i for a in n.attribute if a.name == "training_mode"), 0)
                       for n in g.node if n.op_type == "BatchNormalization"})
    r = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "nodes": len(g.node),
        "bn": sum(n.op_type == "BatchNormalization" for n in g.node),
        "bn_training_mode": bn_modes,
        "params": params,
        "initializer_elements": sum(int(np.prod(t.dims)) for t in g.initializer),
        "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input},
        "build_s": round(t_build, 2),
    }
    if feed is not None:
        t = time.perf_counter()
        sess = ort_session(path)
        r["ort_load_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        outs = sess.run(None, feed)
        r["ort_run_s"] = round(time.perf_counter() - t, 3)
        r["finite"] = bool(all(np.isfinite(o).all() for o in outs))
        r["out_shape"] = list(outs[0].shape)
        r["out_std"] = float(outs[0].std())
        if r["bn_training_mode"] == [0]:
            # onnxruntime's own Conv+BN fusion is a correct fold: how far it moves the output
            # is the noise floor a verification of these models has to allow.
            ref = ort_session(path, optimize=False).run(None, feed)[0]
            r["max_abs_diff_ort_fused_vs_unfused"] = float(np.abs(outs[0] - ref).max())
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="resnet50,chain2000",
                    help="comma list of resnet50, chain2000 (default both)")
    ap.add_argument("--data", action="store_true",
                    help="also write resnet50_calib.npz and resnet50_train.onnx (training-mode BNs)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    ap.add_argument("--image-size", type=int, default=224, help="ResNet-50 input size (default 224)")
    ap.add_argument("--chain-blocks", type=int, default=2000)
    ap.add_argument("--chain-channels", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime load/run check")
    args = ap.parse_args(argv)
    if args.image_size % 32 or args.image_size < 32:
        ap.error("--image-size must be a positive multiple of 32")
    args.out.mkdir(parents=True, exist_ok=True)
    which = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = which - {"resnet50", "chain2000"}
    if unknown:
        ap.error(f"unknown model(s) in --only: {sorted(unknown)}")
    check = not args.no_check

    reports = []
    if "resnet50" in which:
        reports += build_resnet50(args.out, args.seed, args.image_size, args.data, check)
        if args.data:
            t = time.perf_counter()
            data = make_images(np.random.default_rng(args.seed + 100), args.samples, args.image_size)
            p = args.out / "resnet50_calib.npz"
            np.savez(p, images=data)
            print(f"resnet50_calib.npz: {p.stat().st_size} B, images {list(data.shape)} float32, "
                  f"{time.perf_counter() - t:.2f} s")
    if "chain2000" in which:
        reports += build_chain(args.out, args.seed + 10, args.chain_blocks, args.chain_channels, check)
    for r in reports:
        print(f"{r['file']}: {r['bytes'] / 1e6:.1f} MB, {r['nodes']} nodes, {r['bn']} BN "
              f"(training_mode {r['bn_training_mode']}), {r['params']:,} params, inputs {r['inputs']}, "
              f"built in {r['build_s']} s"
              + (f"; ort load {r['ort_load_s']} s, run {r['ort_run_s']} s, out {r['out_shape']} std {r['out_std']:.3g}"
                 if "ort_load_s" in r else "")
              + (f"; max |ort fused - unfused| {r['max_abs_diff_ort_fused_vs_unfused']:.3g}"
                 if "max_abs_diff_ort_fused_vs_unfused" in r else "")
              + (f"; max |ort - numpy| {r['max_abs_diff_vs_numpy']:.3g} (|y| mean {r['output_abs_mean']:.3g})"
                 if "max_abs_diff_vs_numpy" in r else ""))
        if "finite" in r and not r["finite"]:
            print(f"ERROR: {r['file']} produced non-finite outputs", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
