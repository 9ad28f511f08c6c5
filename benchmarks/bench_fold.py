"""Fold without calibration vs a bare onnx.load + onnx.save of the same file.

Each measurement runs in a fresh subprocess, so peak RSS (ru_maxrss) belongs to that job alone.
Reported per model: in-process seconds (after imports) and peak RSS, for the baseline and for
``bnfold.fold(..., verify=False)``, the ratio of the medians, the median of the ratios of
interleaved baseline/fold pairs and the ratio of the minimums (a shared machine's speed swings by
half between runs; noise only adds time), and the wall time of the whole CLI command.
Goal (issue 2): ratio <= 1.5 for time and memory.

    python benchmarks/make_bench_models.py --out benchmarks/_work
    python benchmarks/bench_fold.py benchmarks/_work/resnet50.onnx benchmarks/_work/chain2000.onnx
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

_CHILD = r"""
import json, resource, sys, time
mode, src, dst = sys.argv[1:4]
import onnx
if mode == "fold":
    from bnfold.api import fold
    import bnfold.stages.calibrate, bnfold.verification.compare  # noqa: F401  (imports outside the timing)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "baseline":
    onnx.save(onnx.load(src), dst)
    n_bn = folded = None
else:
    r = fold(src, output=dst, verify=False)
    n_bn, folded = len(r.report.bns), r.report.folded
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mb": rss / 1024, "rss_after_imports_mb": rss0 / 1024,
                  "bn": n_bn, "folded": folded}))
"""


def _child(mode: str, src: str, dst: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, src, dst], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli_wall(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def bench(path: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "out.onnx")
        # interleaved, so that a slow spell of a shared machine hits both alike
        base, fold = [], []
        for _ in range(repeats):
            base.append(_child("baseline", path, dst))
            fold.append(_child("fold", path, dst))
        cli_base = [_cli_wall([sys.executable, "-c", "import onnx,sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])",
                               path, dst]) for _ in range(repeats)]
        cli_fold = [_cli_wall([sys.executable, "-m", "bnfold.cli.main", "fold", path, "-o", dst, "--no-verify"])
                    for _ in range(repeats)]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    res = {
        "model": os.path.basename(path),
        "size_mb": os.path.getsize(path) / 2**20,
        "bn": fold[0]["bn"],
        "folded": fold[0]["folded"],
        "baseline_s": med(base, "seconds"),
        "fold_s": med(fold, "seconds"),
        "baseline_peak_mb": med(base, "peak_rss_mb"),
        "fold_peak_mb": med(fold, "peak_rss_mb"),
        "baseline_peak_over_imports_mb": med(base, "peak_rss_mb") - med(base, "rss_after_imports_mb"),
        "fold_peak_over_imports_mb": med(fold, "peak_rss_mb") - med(fold, "rss_after_imports_mb"),
        "cli_baseline_wall_s": statistics.median(cli_base),
        "cli_fold_wall_s": statistics.median(cli_fold),
    }
    res["time_ratio"] = res["fold_s"] / res["baseline_s"]
    # the ratio within each interleaved pair, then the median: robust to the machine's drift
    # the best of each (timeit's rule: noise only ever adds time)
    res["min_time_ratio"] = min(f["seconds"] for f in fold) / min(b["seconds"] for b in base)
    res["paired_time_ratio"] = statistics.median(f["seconds"] / b["seconds"] for b, f in zip(base, fold))
    res["peak_ratio"] = res["fold_peak_mb"] / res["baseline_peak_mb"]
    res["peak_over_imports_ratio"] = res["fold_peak_over_imports_mb"] / max(res["baseline_peak_over_imports_mb"], 1e-9)
    res["cli_wall_ratio"] = res["cli_fold_wall_s"] / res["cli_baseline_wall_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    rows = [bench(m, a.repeats) for m in a.models]
    for r in rows:
        print(f"{r['model']}: {r['size_mb']:.1f} MB, {r['bn']} BN, {r['folded']} folded")
        print(f"  in-process  load+save {r['baseline_s']:.3f} s   fold {r['fold_s']:.3f} s   ratio {r['time_ratio']:.2f}"
              f"  (median of paired ratios {r['paired_time_ratio']:.2f}, ratio of minimums {r['min_time_ratio']:.2f})")
        print(f"  peak RSS    load+save {r['baseline_peak_mb']:.0f} MB  fold {r['fold_peak_mb']:.0f} MB  ratio {r['peak_ratio']:.2f}"
              f"  (above imports: {r['baseline_peak_over_imports_mb']:.0f} vs {r['fold_peak_over_imports_mb']:.0f} MB,"
              f" ratio {r['peak_over_imports_ratio']:.2f})")
        print(f"  CLI wall    python -c load+save {r['cli_baseline_wall_s']:.2f} s   bnfold fold --no-verify "
              f"{r['cli_fold_wall_s']:.2f} s   ratio {r['cli_wall_ratio']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
