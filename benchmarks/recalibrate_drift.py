"""Issue 15 points 2 and 3, measured on the sample models (run from the repository root):

    python benchmarks/recalibrate_drift.py

1. ``bnfold fold sample_models/unfoldable.onnx --data sample_models/unfoldable_calib.npz``: how far
   the folded model's outputs are from the input model's on the calibration data, by default
   (``recalibrate='training'``) and with ``recalibrate='all'``.
2. The drift table of ``bnfold inspect --data`` for unfoldable.onnx and resnet_trs.onnx (whose
   decomposed BNs have no stored statistics), and of the frozen model written by
   ``--recalibrate all`` (its statistics are the data's: no drift).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bnfold
from bnfold.report.summary import drift_table

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _run(model: str | Path | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feeds)[0])


def main() -> int:
    model, data = SAMPLES / "unfoldable.onnx", SAMPLES / "unfoldable_calib.npz"
    feeds = dict(np.load(data))
    original = _run(model, feeds)
    print(f"unfoldable.onnx on its {len(next(iter(feeds.values())))} calibration samples: max |y| "
          f"{np.abs(original).max():.4g}")
    with tempfile.TemporaryDirectory() as tmp:
        frozen = Path(tmp) / "frozen.onnx"
        for recal in ("training", "all"):
            res = bnfold.fold(model, data=data, recalibrate=recal,
                              frozen_output=frozen if recal == "all" else None, output=Path(tmp) / f"{recal}.onnx")
            assert res.model is not None
            diff = np.abs(_run(res.model.SerializeToString(), feeds) - original).max()
            n = sum(b.stats is not None for b in res.report.bns)
            verdict = "PASSED" if res.ok else "FAILED"
            print(f"  recalibrate={recal:8s}: {n} of {len(res.report.bns)} BN re-estimated, max |folded - input| "
                  f"{diff:.3g}, verification {verdict}")
        print("\nbnfold inspect unfoldable.onnx --data unfoldable_calib.npz")
        print(drift_table(bnfold.inspect(model, data=data)))
        print("\nthe frozen model written by fold --recalibrate all, against the same data")
        print(drift_table(bnfold.inspect(frozen, data=data)))
    print("\nbnfold inspect resnet_trs.onnx --data trs_calib.npz --batch-size 8")
    print(drift_table(bnfold.inspect(SAMPLES / "resnet_trs.onnx", data=SAMPLES / "trs_calib.npz", batch_size=8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
