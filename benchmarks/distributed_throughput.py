"""Calibration throughput with 1, 2 and 3 processes (torch.distributed, gloo on loopback), and how far
their statistics are from one process's (issue 17 point 1).

Model: the ResNet-50-shaped networks of the other benchmarks: ONNX route, ``make_bench_models.py``'s
ResNet-50 graph with every BN in training mode (``bnfold.fold(..., dry_run=True)``; every rank
reads and runs only its batches j mod N, with onnxruntime on torch's thread count); PyTorch route, ``torch_one_shot.py``'s ResNet-50
module in train mode (``bnfold.torch.calibrate``; each rank passes its own part, batches j mod N).
Each rank is its own process, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT); its
time runs from a barrier after imports and model loading to the end of the call (calibration and the
all-gather; the ONNX route also builds its calibration session and plans the fold). images/s = all
images / the slowest rank's time. "max rel diff" = max over BNs and channels of |mean_N - mean_1| / sigma_1
and |var_N - var_1| / var_1 (both variances), against the one-process run. ``--threads`` sets the
threads per process (torch and onnxruntime alike); the default, cores // processes, is the fair
throughput split, but float32 convolutions then round differently with the thread count, so the
statistics differ by float32 round-off; with ``--threads 1`` they differ by float64 round-off only.

    python benchmarks/distributed_throughput.py [--images 32] [--size 96] [--batch-size 4] [--routes onnx,torch]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stats_arrays(stats: dict[str, Any]) -> dict[str, np.ndarray]:
    return {f"{n}|{f}": np.asarray(getattr(st, f), dtype=np.float64) for n, st in stats.items()
            for f in ("mean", "var_unbiased", "var_pooled")}


def worker(route: str, work: Path, batch_size: int, size: int, images: int, threads: int) -> None:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    import bnfold
    import bnfold.torch

    if route == "torch":
        from torch_one_shot import _resnet50

        torch.manual_seed(0)
        model = _resnet50("own").train()
        g = torch.Generator().manual_seed(1)
        batches = list(torch.split(torch.randn(images, 3, size, size, generator=g), batch_size))[rank::world]
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    if route == "onnx":
        result = bnfold.fold(str(work / "resnet50_train.onnx"), data=str(work / "calib.npz"), batch_size=batch_size,
                             dry_run=True, distributed=world > 1)
        stats = {b.name: b.stats for b in result.report.bns if b.stats is not None}
    else:
        _, stats = bnfold.torch.calibrate(model, batches, distributed=world > 1)
    seconds = time.perf_counter() - t0
    np.savez(work / f"{route}_{world}_{rank}.npz", **_stats_arrays(stats))
    (work / f"{route}_{world}_{rank}.json").write_text(json.dumps({"seconds": seconds}))
    if world > 1:
        dist.destroy_process_group()


def _launch(route: str, world: int, work: Path, args: argparse.Namespace) -> float:
    port = _free_port()
    procs = []
    for rank in range(world):
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", route, "--work", str(work),
                                       "--batch-size", str(args.batch_size), "--size", str(args.size),
                                       "--images", str(args.images), "--threads", str(args.threads)], env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"{route} with {world} processes failed (exit {p.returncode})")
    return max(json.loads((work / f"{route}_{world}_{r}.json").read_text())["seconds"] for r in range(world))


def _max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Max over BNs and channels of |mean_N - mean_1| / sigma_1 and |var_N - var_1| / var_1 (a mean is
    compared in units of its channel's sigma: a mean near 0 has no useful relative error)."""
    out = 0.0
    for k in a:
        name, field = k.split("|")
        scale = np.sqrt(a[f"{name}|var_unbiased"]) if field == "mean" else np.abs(a[k])
        out = max(out, float(np.max(np.abs(b[k] - a[k]) / np.maximum(scale, 1e-300))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=96, help="image side (default 96)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--routes", default="onnx,torch")
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--threads", type=int, default=0, help="threads per process (default: cores // processes)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.batch_size, args.size, args.images, args.threads)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bnfold-dist-bench-") as tmp:
        work = Path(tmp)
        routes = args.routes.split(",")
        if "onnx" in routes:
            import onnx
            from make_bench_models import make_images, resnet50_graph, to_training

            model, _ = resnet50_graph(0, args.size)
            onnx.save(to_training(model, momentum=0.9), str(work / "resnet50_train.onnx"))
            np.savez(work / "calib.npz", images=make_images(np.random.default_rng(1), args.images, args.size))
        print(f"{args.images} images {args.size}x{args.size}, batch size {args.batch_size}, "
              f"{os.cpu_count()} CPU cores; threads per process: {args.threads or 'cores // processes'}")
        print(f"{'route':6} {'procs':>5} {'seconds':>8} {'images/s':>9} {'speed-up':>8} {'max rel diff vs 1':>18}")
        for route in routes:
            base_t = base = None
            for world in worlds:
                seconds = _launch(route, world, work, args)
                stats = [dict(np.load(work / f"{route}_{world}_{r}.npz")) for r in range(world)]
                same = all(all(np.array_equal(stats[0][k], s[k]) for k in stats[0]) for s in stats[1:])
                if base is None:
                    base, base_t = stats[0], seconds
                diff = _max_rel(base, stats[0])
                print(f"{route:6} {world:5d} {seconds:8.2f} {args.images / seconds:9.1f} {base_t / seconds:8.2f} "
                      f"{diff:18.2e}{'' if same else '  (ranks differ!)'}")


if __name__ == "__main__":
    main()
