"""Folds of models with dynamic input dims, without --data: verified? at which shapes, found how?

    python benchmarks/input_shapes.py [--tree DIR] [--out DIR]

Builds eight models with ``[N, 3, ?, ?]``-style inputs (PyTorch modules exported with
``torch.onnx.export(dynamo=False, dynamic_axes=...)``, BNs in eval mode with non-trivial running
statistics; one hand-made ONNX graph), runs ``bnfold fold MODEL -o OUT --report R`` on each with the
CLI of ``--tree`` (default: this checkout; give another worktree to measure it) and prints one row per
model: exit code, verdict, the shapes used and their source, the wall time, and the time of the same
fold with the shape given (``--input-shape``), whose difference is what finding the shape cost.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class ResNetish(nn.Module):  # stride-32 classifier with global pooling: runs at any size >= 32
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 32, 2), _cbr(32, 32, 2), _cbr(32, 64, 2), _cbr(64, 64, 2))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class VggFixed(nn.Module):  # Flatten + Linear(32*9*9): only 72x72 inputs run (no probe size)
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16), nn.MaxPool2d(2), _cbr(16, 32), nn.MaxPool2d(2), _cbr(32, 32),
                                  nn.MaxPool2d(2))
        self.fc = nn.Linear(32 * 9 * 9, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))


class Crnn(nn.Module):  # OCR: [N, 3, 32, W], height pooled to 1, a column per time step
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16), nn.MaxPool2d(2), _cbr(16, 32), nn.MaxPool2d(2), _cbr(32, 64),
                                  nn.MaxPool2d((8, 1)))
        self.fc = nn.Linear(64, 37)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x).squeeze(2).permute(0, 2, 1)  # [N, W/4, 64]
        return self.fc(f)


class Detector(nn.Module):  # FPN-like: upsampled deep features concatenated with shallow ones
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 32, 2), _cbr(32, 32, 2))
        self.c4 = nn.Sequential(_cbr(32, 64, 2), _cbr(64, 64, 2))
        self.head = nn.Conv2d(96, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c3(x)
        b = nn.functional.interpolate(self.c4(a), scale_factor=4.0, mode="nearest")
        return self.head(torch.cat([a, b], 1))


class UNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = _cbr(3, 16), _cbr(16, 32, 2)
        self.up = nn.ConvTranspose2d(32, 16, 2, 2)
        self.d1 = _cbr(32, 16)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        return self.out(self.d1(torch.cat([a, self.up(self.e2(a))], 1)))


class Siamese(nn.Module):  # two image inputs through one trunk
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_cbr(3, 16, 2), _cbr(16, 32, 2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.trunk(x) - self.trunk(y)).abs().mean(dim=(2, 3))


class TextEncoder(nn.Module):  # int64 token ids [N, L]
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm1d(32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.emb(ids).permute(0, 2, 1))).relu()


def _randomize_bns(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], axes: dict[str, dict[int, str]],
            path: Path, metadata: dict[str, str] | None = None) -> tuple[Path, str]:
    _randomize_bns(module, 0)
    module.eval()
    torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["out"],
                      dynamic_axes={**axes, "out": {0: "N"}}, do_constant_folding=False, opset_version=17)
    model = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    given = " ".join(f"{n}:{'x'.join(str(d) for d in a.shape)}" for n, a in zip(names, args))
    return path, given


def _never(path: Path) -> tuple[Path, str]:
    """Conv(3->4) -> BN -> Reshape to [1, 7]: no input size has 7 elements after 4 channels."""
    rng = np.random.default_rng(0)
    t = lambda name, a: numpy_helper.from_array(np.asarray(a), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Reshape", ["n", "shape"], ["out"])]
    inits = [t("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), t("s", np.ones(4, np.float32)),
             t("b", np.zeros(4, np.float32)), t("m", np.zeros(4, np.float32)), t("v", np.ones(4, np.float32)),
             t("shape", np.array([1, 7], np.int64))]
    graph = helper.make_graph(nodes, "never", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path, "x:1x3x8x8"


def build(folder: Path) -> dict[str, tuple[Path, str]]:
    torch.manual_seed(0)
    img = {"x": {0: "N", 2: "H", 3: "W"}}
    return {
        "resnetish [N,3,H,W]": _export(ResNetish(), (torch.randn(1, 3, 224, 224),), ["x"], img,
                                       folder / "resnetish.onnx"),
        "vgg_fixed72 [N,3,H,W]": _export(VggFixed(), (torch.randn(1, 3, 72, 72),), ["x"], img, folder / "vgg.onnx"),
        "crnn_ocr [N,3,32,W]": _export(Crnn(), (torch.randn(1, 3, 32, 100),), ["x"], {"x": {0: "N", 3: "W"}},
                                       folder / "crnn.onnx"),
        "detector imgsz=320 [N,3,H,W]": _export(Detector(), (torch.randn(1, 3, 320, 320),), ["x"], img,
                                                folder / "det.onnx", {"imgsz": "[320, 320]", "stride": "32"}),
        "unetish [N,3,H,W]": _export(UNetish(), (torch.randn(1, 3, 64, 64),), ["x"], img, folder / "unet.onnx"),
        "siamese x,y [N,3,H,W]": _export(Siamese(), (torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)),
                                         ["x", "y"], {"x": img["x"], "y": img["x"]}, folder / "siamese.onnx"),
        "text ids int64 [N,L]": _export(TextEncoder(), (torch.randint(0, 1000, (1, 50)),), ["ids"],
                                        {"ids": {0: "N", 1: "L"}}, folder / "text.onnx"),
        "never (Reshape [1,7])": _never(folder / "never.onnx"),
    }


def _fold(tree: Path, model: Path, out: Path, report: Path, extra: list[str]) -> tuple[int, float, str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cli.main import main; "
            "sys.exit(main(sys.argv[2:]))")
    args = [sys.executable, "-c", code, str(tree), "fold", str(model), "-o", str(out), "--report", str(report), *extra]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tree)
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the bnfold checkout whose CLI runs")
    parser.add_argument("--out", type=Path, default=None, help="keep models and reports here")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = opts.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        for label, (model, given) in build(folder).items():
            report = folder / f"{model.stem}.json"
            report.unlink(missing_ok=True)
            rc, seconds, text = _fold(opts.tree, model, folder / f"{model.stem}_folded.onnx", report, [])
            data = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
            v = data.get("verification") or {}
            shapes = (v.get("inputs") or {}).get("shapes") or {}
            used = ", ".join(f"{n}: {'x'.join(map(str, s['shape']))} ({s['source']})" for n, s in shapes.items())
            warnings = data.get("warnings") or []
            given_args = [a for g in given.split() for a in ("--input-shape", g)]
            rc2, seconds2, _ = _fold(opts.tree, model, folder / f"{model.stem}_given.onnx",
                                     folder / f"{model.stem}_given.json", given_args)
            last = [line for line in text.strip().splitlines() if line.startswith("bnfold: error")]
            rows.append({"model": label, "exit": rc, "verdict": v.get("verdict", "not run"), "shapes": used,
                         "seconds": round(seconds, 2), "given_seconds": round(seconds2, 2) if rc2 == 0 else None,
                         "note": (last[0][:110] if last else "; ".join(warnings))[:110]})
        width = max(len(r["model"]) for r in rows)
        print(f"{'model':{width}}  exit  verdict   time(s)  given(s)  shapes used / note")
        for r in rows:
            given_s = f"{r['given_seconds']:.2f}" if r["given_seconds"] is not None else "-"
            print(f"{r['model']:{width}}  {r['exit']:4}  {r['verdict']:8}  {r['seconds']:7.2f}  {given_s:>8}  "
                  f"{r['shapes'] or r['note']}")
            if r["shapes"] and r["note"]:
                print(f"{'':{width}}  {'':4}  {'':8}  {'':7}  {'':>8}  {r['note']}")
        verified = sum(1 for r in rows if r["verdict"] == "pass")
        print(f"\nverified by default: {verified} of {len(rows)} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
