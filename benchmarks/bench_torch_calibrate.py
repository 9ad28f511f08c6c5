"""PyTorch calibration overhead over a plain ``torch.no_grad()`` forward (issue 4: <= 10 % on CPU).

A ResNet-50-shaped module (bottleneck stages [3, 4, 6, 3], widths 64..512, expansion 4, 53 BN;
written here because torchvision does not import on this machine), the same batches for each:

- plain: ``model.eval()`` under ``torch.no_grad()``, every batch (the model's BN statistics are
  first set from the same data, as a trained model's would fit its activations);
- bnfold: ``bnfold.torch.calibrate(model, data)`` (copies the module, every BN normalises with
  its batch statistics, float64 statistics accumulated on the device), every batch;
- bnfold in place: the same with ``inplace=True`` (no copy of the caller's module);
- the same with ``BNFOLD_NUMBA=0``: torch's two float32 reductions per BN input instead of the
  numba kernels' one float64 pass (what a user without numba gets).

The numba kernels are compiled (or loaded from numba's cache) in the warm-up run; that one-off
cost is not in the figures.

Each measurement runs in a fresh process (model and batches loaded from files written once), after
one untimed warm-up run of the same job: in one long-lived process the page faults of glibc's
allocator depend on what ran before (a plain forward was seen to take 2.3 s or 2.9 s depending
on the job before it), which swamps a 10 % effect. Jobs are interleaved (plain, bnfold, bnfold in
place, without numba, plain, ...) so that a slow phase of a shared machine hits all alike; reported are the
ratio of medians, the median of the per-round ratios and the ratio of minimums.

``--malloc-tuned`` runs the workers with glibc's mmap and trim thresholds raised, which removes
most of the page-fault cost of large activations from both sides (a deployment would do the
same, or use jemalloc/tcmalloc).

    python benchmarks/bench_torch_calibrate.py --samples 32 --batch-size 8 --image-size 224 --repeats 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


MODES = ("plain", "bnfold", "bnfold_inplace", "bnfold_inplace_torch")


def _worker(mode: str, work: str, channels_last: bool) -> None:
    """One measurement: load the model and batches, run ``mode`` once untimed, then once timed."""
    if mode == "bnfold_inplace_torch":
        os.environ["BNFOLD_NUMBA"] = "0"
    from bnfold.torch import calibrate, kernels

    model = resnet50()
    model.load_state_dict(torch.load(os.path.join(work, "model.pt"), weights_only=True))
    model.eval()
    data = torch.load(os.path.join(work, "data.pt"), weights_only=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        data = [x.contiguous(memory_format=torch.channels_last) for x in data]

    def run() -> float:
        t0 = time.perf_counter()
        if mode == "plain":
            with torch.no_grad():
                for x in data:
                    model(x)
        else:
            calibrate(model, data, inplace=mode == "bnfold_inplace")
        return time.perf_counter() - t0

    run()
    print(json.dumps({"mode": mode, "seconds": run(), "threads": torch.get_num_threads(),
                      "numba": kernels.reason_disabled() or "used"}))


def _measure(mode: str, work: str, env: dict[str, str], channels_last: bool) -> float:
    cmd = [sys.executable, __file__, "--worker", mode, "--work", work] + (["--channels-last"] if channels_last else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if mode != "plain" and (got["numba"] == "used") != (mode != "bnfold_inplace_torch"):
        raise SystemExit(f"{mode}: numba kernels {got['numba']}")  # the mode measured what it says
    return got["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=8, help="rounds of (plain, bnfold, bnfold in place, the same without numba)")
    ap.add_argument("--malloc-tuned", action="store_true",
                    help="raise glibc's mmap/trim thresholds in the workers (fewer page faults on both sides)")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and batches in channels-last memory format (the moments' column path)")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.worker, a.work, a.channels_last)
        return

    from bnfold.torch import calibrate

    torch.manual_seed(0)
    model = resnet50().eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    data = [torch.randn(a.batch_size, 3, a.image_size, a.image_size) + 0.5
            for _ in range(a.samples // a.batch_size)]
    # a trained model's BN statistics fit its activations; a freshly initialised one's (0 and 1) do
    # not, and the plain forward's speed was seen to depend on that. Give the model fitting ones.
    calibrate(model, data, inplace=True)
    env = dict(os.environ)
    if a.malloc_tuned:
        env.update(MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="17179869184")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as work:
        torch.save(model.state_dict(), os.path.join(work, "model.pt"))
        torch.save(data, os.path.join(work, "data.pt"))
        for r in range(a.repeats):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]  # rotate, so that no job always follows the same one
            for mode in order:
                times[mode].append(_measure(mode, work, env, a.channels_last))

    p = times["plain"]
    print(f"ResNet-50-shaped module, {n_bn} BN, {len(data)} batches of {a.batch_size}x3x{a.image_size}x{a.image_size}, "
          f"{torch.get_num_threads()} threads, {a.repeats} rounds, fresh process per run"
          + (", malloc thresholds raised" if a.malloc_tuned else ", default malloc")
          + (", channels-last" if a.channels_last else ""))
    print(f"  plain no_grad forward       median {statistics.median(p):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in p)})")
    for mode, label in (("bnfold", "calibrate (copy)"), ("bnfold_inplace", "calibrate(inplace=True)"),
                        ("bnfold_inplace_torch", "the same, BNFOLD_NUMBA=0")):
        o = times[mode]
        med = statistics.median(o) / statistics.median(p) - 1
        pair = statistics.median(x / y for x, y in zip(o, p)) - 1
        mins = min(o) / min(p) - 1
        print(f"  {label:<27} median {statistics.median(o):.3f} s  (runs: {', '.join(f'{x:.3f}' for x in o)})")
        print(f"    overhead: ratio of medians {med:+.1%}, median of paired ratios {pair:+.1%}, "
              f"ratio of minimums {mins:+.1%}")


if __name__ == "__main__":
    main()
