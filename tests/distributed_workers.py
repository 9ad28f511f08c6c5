"""One rank of a distributed-calibration test, run as its own process (tests/test_distributed_*.py).

``python tests/distributed_workers.py ROUTE OUT_DIR BATCH_SIZE [OUTPUT]`` with the torchrun
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set by the test. ROUTE ``onnx``:
``bnfold.fold`` on sample_models/resnet_train.onnx and its data (every rank passes all of it, bnfold
takes batches j mod N); ``torch``: ``bnfold.torch.calibrate`` on a small CNN, each rank passing its
own part of the batches (DistributedSampler style). Each rank saves its statistics to
OUT_DIR/rank<R>.npz. $BAD_RANK: that rank's data holds a NaN; $DIE_RANK: that rank SIGKILLs itself
at its first batch. WORLD_SIZE=1 runs without a process group (distributed=False).
"""
from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "sample_models" / "resnet_train.onnx"
DATA = REPO / "sample_models" / "resnet_calib.npz"


def _progress(rank: int) -> Any:
    def progress(done: int, total: Any) -> None:
        if done == 1 and os.environ.get("DIE_RANK") == str(rank):
            os.kill(os.getpid(), signal.SIGKILL)
    return progress


def _torch_batches(batch_size: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 3, 8, 8, generator=g) * 2 + 0.5  # 37 samples: a short last batch
    return list(torch.split(x, batch_size))


def _torch_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)).train()


def main(route: str, out_dir: Path, batch_size: int, output: str | None) -> None:
    import torch.distributed as dist

    import bnfold
    import bnfold.torch

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("BNFOLD_DIST_TIMEOUT", "60"))))
    bad = os.environ.get("BAD_RANK") == str(rank)
    stats: dict[str, Any]
    if route == "onnx":
        arrays = {k: v.copy() for k, v in np.load(DATA).items()}
        if bad:
            arrays["images"][:] = np.nan
        result = bnfold.fold(str(MODEL), data=arrays, batch_size=batch_size, output=output, verify=output is not None,
                             dry_run=output is None, progress=_progress(rank), distributed=world > 1)
        stats = {b.name: b.stats for b in result.report.bns if b.stats is not None}
        calibration = result.report.extra["calibration"]
    else:
        parts = _torch_batches(batch_size)[rank::world]  # this rank's own part
        if bad:
            parts[0] = parts[0] * float("nan")
        _, stats = bnfold.torch.calibrate(_torch_model(), parts, progress=_progress(rank), distributed=world > 1)
        calibration = {"world_size": world, "batches": next(iter(stats.values())).batches}
    arrays_out = {f"{name}|{field}": np.asarray(getattr(st, field), dtype=np.float64)
                  for name, st in stats.items() for field in ("mean", "var_unbiased", "var_pooled")}
    arrays_out.update({f"{name}|counts": np.array([st.samples, st.batches]) for name, st in stats.items()})
    arrays_out["calibration|world_size"] = np.array([calibration["world_size"]])
    arrays_out["calibration|batches"] = np.array([calibration.get("batches", -1)])
    np.savez(out_dir / f"rank{rank}.npz", **arrays_out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    except Exception as exc:  # one line on stderr, as the CLI would print it
        print(f"worker error: {type(exc).__name__}: {exc}", file=sys.stderr)
        # a gloo group left to the interpreter's exit may abort the process ("terminate called without
        # an active exception", SIGABRT) once its peers are gone: end it here, as bnfold's CLI does
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(getattr(exc, "exit_code", 3))
