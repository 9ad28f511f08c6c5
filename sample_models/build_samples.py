#!/usr/bin/env python
"""Build bnfold's small sample models and their calibration data.

    python sample_models/build_samples.py [--out DIR] [--no-check]

Writes (default: next to this script):

  resnet_train.onnx + resnet_calib.npz   torch ResNet-style CNN exported in TRAINING mode
                                          (every BN: training_mode=1, three outputs)
  unfoldable.onnx   + unfoldable_calib.npz  onnx.helper model, inference-mode BNs, three of
                                          which cannot be folded (one reason each) + one that can
  resnet_trs.onnx   + trs_calib.npz      torch model with BatchNorm2d(track_running_stats=False)
                                          exported in eval mode (decomposed batch-statistics
                                          pattern), ConvTranspose2d(groups=2)->BN, Linear->BN1d
  manifest.json                          what was built, with which versions, BN counts, hashes

Everything is seeded (torch.manual_seed, numpy default_rng); running the script twice gives
byte-identical files with the same torch/onnx versions (the .npz files are written with a fixed
zip timestamp for that reason).  See README.md for what bnfold should do with each model.

Needs torch (CPU is enough), onnx and onnxruntime; torch is only needed here, not by bnfold.
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import io
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
OPSET = 17
CHECK_BATCH = 8
# torch's TorchScript exporter bakes the batch size into the Reshape constants of the
# decomposed BatchNorm(track_running_stats=False) pattern and refuses a dynamic batch axis
# ("batch_size and channel_size must be non-None"): resnet_trs.onnx has a fixed batch.
TRS_BATCH = 8


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def save_model(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez with a fixed zip timestamp, so that rebuilding gives identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def make_images(rng: np.random.Generator, n: int, channels: int, size: int) -> np.ndarray:
    """Image-like float32 data: spatially correlated (low-resolution noise upsampled), a
    per-sample brightness shift, and per-channel offsets/scales, so that the data is not
    zero-mean and per-batch and pooled statistics differ."""
    low_size = max(size // 4, 1)
    low = rng.standard_normal((n, channels, low_size, low_size)).astype(np.float32)
    x = np.repeat(np.repeat(low, size // low_size, axis=2), size // low_size, axis=3)
    x = x + 0.3 * rng.standard_normal((n, channels, size, size)).astype(np.float32)
    x = x + 0.5 * rng.standard_normal((n, 1, 1, 1)).astype(np.float32)
    offsets = np.linspace(-0.8, 1.2, channels, dtype=np.float32)  # not zero-mean
    scales = np.linspace(0.5, 2.0, channels, dtype=np.float32)
    x = x * scales[None, :, None, None] + offsets[None, :, None, None]
    return np.ascontiguousarray(x, dtype=np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _const_inputs(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer}


def bn_summary(model: onnx.ModelProto) -> dict:
    """Count BN nodes by mode and classify training-mode BNs whose mean/var inputs are
    computed in the graph (torch's track_running_stats=False pattern)."""
    g = model.graph
    inits = _const_inputs(g)
    producers = {o: n for n in g.node for o in n.output}
    out = collections.Counter()
    for n in g.node:
        if n.op_type != "BatchNormalization":
            continue
        mode = 0
        for a in n.attribute:
            if a.name == "training_mode":
                mode = a.i
        out[f"training_mode={mode}"] += 1
        stats = n.input[3:5]
        if all(s in inits for s in stats):
            out["stats=initializer"] += 1
        elif all(s in producers and producers[s].op_type == "ReduceMean" for s in stats):
            out["stats=ReduceMean(decomposed)"] += 1
        else:
            out["stats=other"] += 1
        if len([o for o in n.output if o]) == 3:
            out["outputs=3"] += 1
    out["bn_count"] = sum(1 for n in g.node if n.op_type == "BatchNormalization")
    return dict(sorted(out.items()))


def op_counts(model: onnx.ModelProto) -> dict:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def run_ort(path: Path, feed: dict, level: str = "disable") -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


# --------------------------------------------------------------------------------------------
# 1. resnet_train.onnx — torch ResNet-style CNN exported in training mode
# --------------------------------------------------------------------------------------------


def _torch_modules():
    import torch
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride, bn=nn.BatchNorm2d):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = bn(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = bn(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + idt)

    class SmallResNet(nn.Module):
        """stem conv-bn-relu; 3 stages x 2 basic blocks (first block of each stage: stride 2 and
        a 1x1 conv+BN downsample); global average pool; Linear -> BN1d -> ReLU -> Linear."""

        def __init__(self, widths=(16, 24, 32), num_classes=10, hidden=32):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU())
            blocks, cin = [], widths[0]
            for w in widths:
                blocks += [BasicBlock(cin, w, 2), BasicBlock(w, w, 1)]
                cin = w
            self.stages = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin, hidden), nn.BatchNorm1d(hidden),
                                      nn.ReLU(), nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.head(self.pool(self.stages(self.stem(x))))

    class TrsNet(nn.Module):
        """BatchNorm2d(track_running_stats=False) everywhere in the conv part (exported as the
        decomposed ReduceMean pattern even in eval mode), ConvTranspose2d(groups=2) -> BN,
        Linear -> BN1d(trs=False) and Linear -> BN1d(tracked, frozen statistics)."""

        def __init__(self, num_classes=10):
            super().__init__()

            def trs(c):
                return nn.BatchNorm2d(c, track_running_stats=False)

            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), trs(16), nn.ReLU())
            self.block1 = BasicBlock(16, 16, 1, bn=trs)
            self.block2 = BasicBlock(16, 32, 2, bn=trs)
            self.up = nn.ConvTranspose2d(32, 16, 2, stride=2, groups=2, bias=True)
            self.up_bn = trs(16)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(16, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(),
                nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                nn.Linear(32, num_classes))

        def forward(self, x):
            x = self.block2(self.block1(self.stem(x)))
            x = self.relu(self.up_bn(self.up(x)))
            return self.head(self.pool(x))

    return torch, nn, SmallResNet, TrsNet


def _randomize_bn(torch, nn, model, gen, skip=()):
    """Non-trivial affine parameters (a few negative gammas) and stored statistics with
    nonzero mean and var != 1, so that a wrong fold, or using stored stats where batch stats
    are meant, shows in the outputs."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or name in skip:
                continue
            c = m.num_features
            if m.affine:
                g = torch.rand(c, generator=gen) + 0.5
                sign = torch.where(torch.rand(c, generator=gen) < 0.15, -1.0, 1.0)
                m.weight.copy_(g * sign)
                m.bias.copy_(0.3 * torch.randn(c, generator=gen))
            if m.track_running_stats:
                m.running_mean.copy_(0.5 + 0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 2.5 * torch.rand(c, generator=gen))


def _export(torch, model, example, training, dynamic_batch) -> onnx.ModelProto:
    kwargs = dict(
        dynamo=False,
        do_constant_folding=False,
        opset_version=OPSET,
        input_names=["images"],
        output_names=["logits"],
        training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
    )
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"images": {0: "N"}, "logits": {0: "N"}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, **kwargs)
    return onnx.load_from_string(buf.getvalue())


def build_resnet_train(out: Path, check: bool) -> dict:
    torch, nn, SmallResNet, _ = _torch_modules()
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    calib = make_images(rng, 64, 3, 32)
    save_npz(out / "resnet_calib.npz", images=calib)

    model = SmallResNet()
    gen = torch.Generator().manual_seed(2)
    _randomize_bn(torch, nn, model, gen)
    model.train()
    # Exporting in TRAINING mode runs the model forward in train mode: the BN buffers are
    # updated once by the example input and the exported running stats include that update.
    # Keep the original module for the check below.
    reference = copy.deepcopy(model)
    example = torch.from_numpy(calib[:CHECK_BATCH].copy())
    onnx_model = _export(torch, copy.deepcopy(model), example, training=True, dynamic_batch=True)
    path = out / "resnet_train.onnx"
    save_model(onnx_model, path)

    info = {"expect": {
        "calibrate": "all 17 BNs (training_mode=1; stored running stats are NOT the population stats)",
        "fold": "all 17: 16 into their Conv (bias created), head.2 (BatchNorm1d) into Gemm head.1 (transB=1)",
        "remaining_bn": 0}}
    if check:
        with torch.no_grad():
            want = reference.train()(example).numpy()
        info["max_abs_diff_vs_torch_train"] = float(np.abs(run_ort(path, {"images": calib[:CHECK_BATCH]})[0] - want).max())
    return info


# --------------------------------------------------------------------------------------------
# 2. unfoldable.onnx — onnx.helper, inference-mode BNs that cannot be folded
# --------------------------------------------------------------------------------------------


def build_unfoldable(out: Path, check: bool) -> dict:
    rng = np.random.default_rng(10)
    inits: list[TensorProto] = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def conv_w(cout, cin, k):
        return (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)

    def bn(name, x, y, c, eps):
        scale = rng.uniform(0.5, 1.5, c) * np.where(rng.uniform(size=c) < 0.2, -1, 1)
        init(f"{name}.scale", scale)
        init(f"{name}.bias", 0.3 * rng.standard_normal(c))
        init(f"{name}.mean", 0.5 + 0.5 * rng.standard_normal(c))  # nonzero mean
        init(f"{name}.var", rng.uniform(0.4, 3.0, c))  # var != 1
        return helper.make_node(
            "BatchNormalization",
            [x, f"{name}.scale", f"{name}.bias", f"{name}.mean", f"{name}.var"],
            [y], name=name, epsilon=eps, momentum=0.9, training_mode=0)

    nodes = [
        # (a) BN directly on the graph input, consumed by a padded Conv: no producer to fold
        #     backward into, and folding forward through zero padding is wrong.
        bn("bn_a_graph_input", "x", "a_bn", 4, 1e-3),
        helper.make_node("Conv", ["a_bn", init("conv_a.weight", conv_w(8, 4, 3)),
                                  init("conv_a.bias", 0.1 * rng.standard_normal(8))],
                         ["conv_a"], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        # (b) conv_a's output feeds both a BN and a Relu branch that is added later:
        #     folding into conv_a would change the Relu branch (producer fan-out); the BN's
        #     only consumer is an Add, so there is no forward fold either.
        bn("bn_b_producer_fanout", "conv_a", "b_bn", 8, 1e-5),
        helper.make_node("Relu", ["conv_a"], ["b_relu"], name="relu_b"),
        helper.make_node("Add", ["b_bn", "b_relu"], ["b_add"], name="add_b"),
        # (c) BN after a Relu (not a linear producer) whose output feeds a padded Conv.
        helper.make_node("Relu", ["b_add"], ["c_relu"], name="relu_c"),
        bn("bn_c_after_relu", "c_relu", "c_bn", 8, 1e-5),
        helper.make_node("Conv", ["c_bn", init("conv_c.weight", conv_w(8, 8, 3))],
                         ["conv_c"], name="conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        # (d) ordinary Conv (no bias) -> BN: folds backward into conv_c.
        bn("bn_d_foldable", "conv_c", "d_bn", 8, 1e-5),
        helper.make_node("Relu", ["d_bn"], ["d_relu"], name="relu_d"),
        helper.make_node("GlobalAveragePool", ["d_relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", init("fc.weight", 0.3 * rng.standard_normal((5, 8))),
                                  init("fc.bias", 0.1 * rng.standard_normal(5))],
                         ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "unfoldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-sample-builder")
    path = out / "unfoldable.onnx"
    save_model(model, path)

    calib = make_images(np.random.default_rng(11), 16, 4, 16)
    save_npz(out / "unfoldable_calib.npz", x=calib)

    info = {"expect": {
        "calibrate": "not needed (inference-mode BNs with stored statistics)",
        "fold": {"bn_d_foldable": "into conv_c (which has no bias)"},
        "not_foldable": {
            "bn_a_graph_input": "no producer (graph input); consumer conv_a has pads=1",
            "bn_b_producer_fanout": "producer conv_a also feeds relu_b; consumer is Add",
            "bn_c_after_relu": "producer is Relu; consumer conv_c has pads=1"},
        "remaining_bn": 3}}
    if check:
        a = run_ort(path, {"x": calib[:CHECK_BATCH]}, "disable")[0]
        b = run_ort(path, {"x": calib[:CHECK_BATCH]}, "all")[0]
        info["max_abs_diff_ort_opt_vs_noopt"] = float(np.abs(a - b).max())
    return info


# --------------------------------------------------------------------------------------------
# 3. resnet_trs.onnx — track_running_stats=False (decomposed pattern), ConvT(groups=2), BN1d
# --------------------------------------------------------------------------------------------


def build_resnet_trs(out: Path, check: bool) -> dict:
    torch, nn, _, TrsNet = _torch_modules()
    torch.manual_seed(20)
    rng = np.random.default_rng(21)
    calib = make_images(rng, 64, 3, 16)
    save_npz(out / "trs_calib.npz", images=calib)

    model = TrsNet()
    gen = torch.Generator().manual_seed(22)
    # block1's two BNs keep their default affine parameters (ones / zeros): the eval-mode
    # exporter then de-duplicates equal initializers and feeds the second BN's scale and
    # bias through Identity nodes — a pattern bnfold has to see through.
    _randomize_bn(torch, nn, model, gen, skip=("block1.bn1", "block1.bn2"))
    model.eval()
    example = torch.from_numpy(calib[:TRS_BATCH].copy())
    onnx_model = _export(torch, model, example, training=False, dynamic_batch=False)
    path = out / "resnet_trs.onnx"
    save_model(onnx_model, path)

    info = {"fixed_batch": TRS_BATCH, "expect": {
        "calibrate": "8 decomposed BNs (training_mode=1, mean/var from ReduceMean subgraphs); "
                     "head.5 is inference-mode (stored stats)",
        "fold": "all 9 once the statistics subgraphs are gone: 6 into Conv, up_bn into "
                "ConvTranspose(group=2), head.2 into Gemm head.1, head.5 into Gemm head.4",
        "dead_after_calibration": "8 x (Constant, Reshape, Transpose, 3 ReduceMean, Sub, Mul) = 64 nodes",
        "identity_params": "block1.bn2.weight/bias are Identity outputs of block1.bn1.weight/bias "
                           "(one shared initializer per pair)",
        "remaining_bn": 0}}
    if check:
        with torch.no_grad():
            want = model(example).numpy()
        info["max_abs_diff_vs_torch_eval"] = float(np.abs(run_ort(path, {"images": calib[:TRS_BATCH]})[0] - want).max())
    return info


# --------------------------------------------------------------------------------------------


def describe(out: Path, model_file: str, data_file: str, check: bool) -> dict:
    """Manifest entry (no run-dependent numbers, so rebuilding gives an identical manifest);
    with check=True also load the model in onnxruntime and run it on one calibration batch."""
    path = out / model_file
    model = onnx.load(str(path))
    data = np.load(out / data_file)
    (inp,) = [i for i in model.graph.input if i.name not in _const_inputs(model.graph)]
    shape = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert list(data.keys()) == [inp.name], (data_file, list(data.keys()))
    x = data[inp.name]
    assert x.dtype == np.float32 and list(x.shape[1:]) == shape[1:], (x.dtype, x.shape, shape)
    bns = bn_summary(model)
    ops = op_counts(model)
    out_shapes = "-"
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert sess.get_providers() == ["CPUExecutionProvider"]
        outs = sess.run(None, {inp.name: x[:CHECK_BATCH]})
        assert all(np.isfinite(o).all() for o in outs), model_file
        out_shapes = [list(o.shape) for o in outs]
    print(f"{model_file}: {path.stat().st_size} B, {len(model.graph.node)} nodes, "
          f"input {inp.name}{shape}, data {data_file}{list(x.shape)}, ran batch {CHECK_BATCH} -> "
          f"{out_shapes}; BN {bns}; ops {ops}")
    return {
        "model": model_file,
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "data": data_file,
        "data_key": inp.name,
        "data_shape": list(x.shape),
        "data_bytes": (out / data_file).stat().st_size,
        "data_sha256": sha256(out / data_file),
        "input": {"name": inp.name, "shape": shape},
        "outputs": [o.name for o in model.graph.output],
        "ir_version": model.ir_version,
        "opset": [{"domain": o.domain, "version": o.version} for o in model.opset_import],
        "node_count": len(model.graph.node),
        "bn_count": bns["bn_count"],
        "bn": bns,
        "op_counts": ops,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime checks")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    check = not args.no_check

    import torch

    builds = [
        ("resnet_train.onnx", "resnet_calib.npz", build_resnet_train,
         "torch SmallResNet exported with TrainingMode.TRAINING; every BN training_mode=1 with 3 outputs"),
        ("unfoldable.onnx", "unfoldable_calib.npz", build_unfoldable,
         "onnx.helper; inference-mode BNs: 3 unfoldable (graph input+padded conv, producer fan-out, "
         "after Relu+padded conv) and 1 foldable Conv->BN"),
        ("resnet_trs.onnx", "trs_calib.npz", build_resnet_trs,
         "torch TrsNet exported in eval mode; BatchNorm(track_running_stats=False) as the decomposed "
         "ReduceMean pattern (fixed batch 8), ConvTranspose2d(groups=2)->BN, Linear->BN1d"),
    ]
    entries = []
    for model_file, data_file, fn, desc in builds:
        extra = fn(out, check)
        entry = {"description": desc}
        entry.update(describe(out, model_file, data_file, check))
        for k, v in extra.items():
            if k.startswith("max_abs_diff"):  # machine-dependent: printed, not in the manifest
                print(f"  {k}: {v:.3g}")
                assert v < 1e-3, (model_file, k, v)
            else:
                entry[k] = v
        entries.append(entry)

    import onnxruntime

    manifest = {
        "generator": "sample_models/build_samples.py",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "models": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(e["bytes"] + (out / e["data"]).stat().st_size for e in entries)
    print(f"total {total} B in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
