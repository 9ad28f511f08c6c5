"""What the reference's noise floor costs (issue 15 point 1): verification with and without it.

For each sample model (and its calibration data) the model is folded once (frozen reference and
folded candidate written to a temporary folder); then ``engine.verify`` compares them on the
first K batches (batch size 1 as ``fold`` uses, or the model's fixed batch size) with ``VerifyConfig(noise_floor=True)`` and
``False``, interleaved, REPEATS times each. Printed per model: median seconds of both, their ratio,
the floor and the largest error of each output, and the verdict of both. The machine is shared,
so the medians of interleaved runs are what to compare.

    python benchmarks/noise_floor_cost.py [--samples 4 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bnfold.api import fold
from bnfold.onnx.runtime import input_specs
from bnfold.verification.config import VerifyConfig
from bnfold.verification.engine import verify

ROOT = Path(__file__).resolve().parent.parent / "sample_models"
MODELS = [("resnet_train.onnx", "resnet_calib.npz"), ("resnet_trs.onnx", "trs_calib.npz"),
          ("unfoldable.onnx", "unfoldable_calib.npz")]


def _feeds(model: Path, data: Path, k: int) -> list[dict[str, np.ndarray]]:
    """K batches of the model's fixed batch size (1 where the batch is dynamic), cycling the data."""
    batch = next((s.shape[0] for s in input_specs(onnx.load(model)) if s.shape and s.shape[0]), None) or 1
    with np.load(data) as z:
        arrays = {name: z[name] for name in z.files}
    n = min(len(a) for a in arrays.values())
    return [{name: a[np.arange(i * batch, (i + 1) * batch) % n] for name, a in arrays.items()} for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'model':<20} {'K':>4} {'strict s':>9} {'floor s':>9} {'ratio':>6}  verdicts (strict/floor)  "
          "output: max abs / floor max")
    with tempfile.TemporaryDirectory() as tmp:
        for model, data in MODELS:
            frozen, folded = Path(tmp) / f"frozen_{model}", Path(tmp) / f"folded_{model}"
            fold(ROOT / model, output=folded, data=ROOT / data, frozen_output=frozen, verify=False)
            for k in args.samples:
                feeds = _feeds(ROOT / model, ROOT / data, k)
                times: dict[bool, list[float]] = {True: [], False: []}
                results = {}
                for _ in range(args.repeats):
                    for on in (False, True):
                        t0 = time.perf_counter()
                        results[on] = verify(frozen, folded, feeds, VerifyConfig(noise_floor=on))
                        times[on].append(time.perf_counter() - t0)
                strict, floor = statistics.median(times[False]), statistics.median(times[True])
                outs = ", ".join(f"{o.name}: {o.max_abs:.3g} / {o.floor_max:.3g}" if o.floor_max is not None
                                 else f"{o.name}: {o.max_abs:.3g} / -" for o in results[True].outputs)
                verdicts = f"{results[False].passed}/{results[True].passed}"
                print(f"{model:<20} {k:>4} {strict:>9.3f} {floor:>9.3f} {floor / strict:>6.2f}  {verdicts:<24} {outs}")


if __name__ == "__main__":
    main()
