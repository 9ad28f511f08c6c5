"""Calibration overhead over plain onnxruntime inference of the same batches (issue 2: <= 25 %).

Baseline: an onnxruntime CPU session of the model as given (default optimisations), run on every
batch. bnfold: ``calibrate`` (its own session over the training network with statistics outputs,
float64 accumulation). Both include building their session; the per-batch loop is reported too.

    python benchmarks/make_bench_models.py --out benchmarks/_work --data
    python benchmarks/bench_calibrate.py benchmarks/_work/resnet50_train.onnx benchmarks/_work/resnet50_calib.npz --batch-size 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import onnxruntime as ort

from bnfold.api import _load, _open_data
from bnfold.stages import calibrate as runner
from bnfold.stages.work import Work


def _plain(path: str, data) -> tuple[float, float]:
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    for batch in data:
        sess.run(None, batch)
    return time.perf_counter() - t0, time.perf_counter() - t1


def _bnfold(path: str, data) -> tuple[float, float]:
    work = Work(_load(path))
    marks: list[float] = []
    t0 = time.perf_counter()
    runner.calibrate(work, data,
                     progress=lambda done, total: marks.append(time.perf_counter()) if done == 0 else None)
    end = time.perf_counter()
    return end - t0, end - marks[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work = Work(_load(a.model))
    data = _open_data(a.data, work.model, a.batch_size)
    for _ in range(1):  # warm-up: page cache, thread pools
        _plain(a.model, data)
    plain = [_plain(a.model, data) for _ in range(a.repeats)]
    ours = [_bnfold(a.model, data) for _ in range(a.repeats)]
    p_tot, p_loop = statistics.median(x[0] for x in plain), statistics.median(x[1] for x in plain)
    o_tot, o_loop = statistics.median(x[0] for x in ours), statistics.median(x[1] for x in ours)
    print(f"{a.model}: {data.num_samples} samples, batch size {data.batch_size}, {data.num_batches} batches,"
          f" {len([s for s in work.sites if s.pos is not None])} BN")
    print(f"  plain onnxruntime  total {p_tot:.3f} s  batches {p_loop:.3f} s")
    print(f"  bnfold calibrate   total {o_tot:.3f} s  batches {o_loop:.3f} s")
    print(f"  overhead           total {o_tot / p_tot - 1:+.1%}  batches {o_loop / p_loop - 1:+.1%}")


if __name__ == "__main__":
    main()
