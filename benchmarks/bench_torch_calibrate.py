"""PyTorch calibration overhead over a plain ``torch.no_grad()`` forward (issue 4: <= 10 % on CPU).

A ResNet-50-shaped module (bottleneck stages [3, 4, 6, 3], widths 64..512, expansion 4, 53 BN;
written here because torchvision does not import on this machine), the same batches for both:

- plain: ``model.eval()`` under ``torch.no_grad()``, every batch (the model's BN statistics are
  first set from the same data, as a trained model's would fit its activations);
- bnfold: ``bnfold.torch.calibrate`` (the BN modules normalise with batch statistics; float64
  two-pass statistics accumulated on the device by forward pre-hooks), every batch.

    python benchmarks/bench_torch_calibrate.py --samples 32 --batch-size 8 --image-size 224
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from bnfold.torch import calibrate


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = resnet50().eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    data = [torch.randn(a.batch_size, 3, a.image_size, a.image_size) + 0.5
            for _ in range(a.samples // a.batch_size)]
    # a trained model's BN statistics fit its activations; a freshly initialised one's (0 and 1) do
    # not, and the plain forward's speed was seen to depend on that. Give the model fitting ones.
    calibrate(model, data, inplace=True)

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for x in data:
                model(x)
        return time.perf_counter() - t0

    def ours(inplace: bool) -> float:
        target = copy.deepcopy(model) if inplace else model
        t0 = time.perf_counter()
        calibrate(target, data, inplace=inplace)
        return time.perf_counter() - t0

    plain()  # warm-up: thread pools, allocator
    ours(False)
    # interleaved, so that a slow phase of a shared machine hits both sides alike
    p, o, oi = [], [], []
    for _ in range(a.repeats):
        p.append(plain())
        o.append(ours(False))
        oi.append(ours(True))
    pm, om, oim = statistics.median(p), statistics.median(o), statistics.median(oi)
    pair = statistics.median(x / y for x, y in zip(o, p)) - 1
    pair_i = statistics.median(x / y for x, y in zip(oi, p)) - 1
    print(f"ResNet-50-shaped module, {n_bn} BN, {len(data)} batches of {a.batch_size}x3x{a.image_size}x{a.image_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"  plain no_grad forward  {pm:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in p)})")
    print(f"  bnfold.torch.calibrate {om:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in o)})")
    print(f"  bnfold.torch.calibrate(inplace=True, no model copy) {oim:.3f} s  "
          f"(runs: {', '.join(f'{x:.3f}' for x in oi)})")
    print(f"  overhead (ratio of medians) {om / pm - 1:+.1%} with the copy of the caller's module, "
          f"{oim / pm - 1:+.1%} without")
    print(f"  overhead (median of run-by-run ratios) {pair:+.1%} with the copy, {pair_i:+.1%} without")


if __name__ == "__main__":
    main()
