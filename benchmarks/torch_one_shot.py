"""One-shot cost of calibrating a PyTorch module, each job in a FRESH process (issue 16 point 4).

The commonest use of ``bnfold.torch.calibrate`` is once per process (a script, the CLI), so what
counts is the whole process: interpreter start, imports (torch, bnfold, numba and its cached
kernels where used), building the model and the batches, and the work. Jobs, each run as a new
``python`` process and timed from outside (wall clock, start to exit):

- ``eval``: ``model.eval()`` and a plain forward of every batch under ``torch.no_grad()``;
- ``update_bn``: ``torch.optim.swa_utils.update_bn(batches, model)``;
- ``calibrate``: ``bnfold.torch.calibrate(model, batches)`` with ``BNFOLD_NUMBA`` unset (the default);
- ``calibrate_inplace``: ``bnfold.torch.calibrate(model, batches, inplace=True)``, the contract
  ``update_bn`` has (the module itself is changed); the default returns a calibrated copy and
  leaves the module as it was, which costs a copy of the weights (~50 ms for ResNet-50's 100 MB);
- ``calibrate_numba0`` / ``calibrate_numba1``: the same with ``BNFOLD_NUMBA=0`` / ``=1`` (before
  issue 16 the numba kernels were the default and ``0`` turned them off; since, ``1`` turns them on).

Model: ResNet-50 (torchvision's where ``import torchvision`` works, else the same architecture
written below: bottleneck stages [3, 4, 6, 3], 53 BatchNorm2d), or with ``--model timm:NAME`` one of
timm's (mobilenetv3_small_100, efficientnet_b0, rexnet_100, resnet18: many small activations, and
timm's ``BatchNormAct2d``; timm's import is then part of every job alike), random weights from a fixed seed;
data: 4 batches of 8x3x128x128 ``randn``. Jobs are interleaved round by round (eval, update_bn,
calibrate, calibrate_nonumba, eval, ...) so that a busy phase of a shared machine hits all alike;
reported are each job's median wall time and CPU time (user + system of the child) and their
ratios to ``eval``'s, and, paired by round, the median of its wall time minus ``update_bn``'s and
the number of rounds in which it took at most ``update_bn``'s time. Each job also reports its own split of the wall time (imports, build, work)
measured inside the process, and the same paired figures for its *own* part: the wall time from
after the imports all jobs share (torch; timm with ``--model timm:``) to the process's end, that is
the job's own import (``bnfold.torch``, ``swa_utils``), the build, the work and the exit. timm's
import alone takes 3.3-3.6 s and moves the whole-process figures by +-100 ms from one process to the
next; the own part does not carry that noise. On a shared machine the CPU time with ``--threads 1`` is the stable
figure (wall times of multi-threaded jobs swing with the other load).

Bytecode: a ``pip install`` compiles every package's ``.pyc`` at install time, torch's and
bnfold's alike, so by default (``--bytecode cached``) the children read compiled bytecode for
both: they get a private ``PYTHONPYCACHEPREFIX`` (a temporary folder; nothing is written into
the checkout), ``PYTHONDONTWRITEBYTECODE`` is dropped from their environment, and one untimed
warm-up round fills it. Where the environment sets ``PYTHONDONTWRITEBYTECODE`` (this project's
CI machines do) and bnfold is an editable install, ``--bytecode none`` shows the other case:
every fresh process then compiles bnfold's sources (~40 ms) while torch's come compiled.

To time another checkout of bnfold, put it first on the children's path:
``PYTHONPATH=/path/to/checkout python benchmarks/torch_one_shot.py``, or ``--compare CHECKOUT``
to add its calibrate jobs (``calibrate@before`` ...) to the same interleaved rounds.

    python benchmarks/torch_one_shot.py --repeats 8 [--threads 1] [--model timm:efficientnet_b0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

JOBS = ("eval", "update_bn", "calibrate", "calibrate_inplace", "calibrate_numba0", "calibrate_numba1")


def _torchvision_imports() -> bool:
    """Whether ``import torchvision`` works here (checked once, in a process of its own, so that a
    failing import costs no job anything)."""
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def _resnet50(arch: str) -> Any:
    """torchvision's ResNet-50 (``arch`` "torchvision"), or the same architecture written here."""
    if arch == "torchvision":
        from torchvision.models import resnet50  # its import time is then part of every job alike
        return resnet50()
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def _timm(name: str) -> Any:
    """timm's ``name`` with random weights. timm imports torchvision, whose registry wheel here links
    CUDA libraries the CPU torch lacks (``import torchvision`` dies registering ``torchvision::nms``);
    where a plain import fails, the two op schemas its Python code registers fake kernels for are
    declared first (the same workaround as the tests' timm fixture; never in the package)."""
    import torch
    if not _torchvision_imports():
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
    import timm
    return lambda: timm.create_model(name)


_KEEP: list[Any] = []


def run_job(job: str, arch: str, batches: int, batch_size: int, size: int) -> dict[str, float]:
    """One job in this (fresh) process; returns its own split in seconds. ``arch``: "torchvision"
    or "local" (ResNet-50), or "timm:NAME"."""
    t0 = time.perf_counter()
    import torch
    build = _timm(arch[5:]) if arch.startswith("timm:") else lambda: _resnet50(arch)
    t_own = time.perf_counter()
    if job.startswith("calibrate"):
        import bnfold.torch
    elif job == "update_bn":
        from torch.optim.swa_utils import update_bn
    t1 = time.perf_counter()
    torch.manual_seed(0)
    model = build()
    data = [torch.randn(batch_size, 3, size, size) for _ in range(batches)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t2 = time.perf_counter()
    if job == "eval":
        model.eval()
        with torch.no_grad():
            for x in data:
                model(x)
    elif job == "update_bn":
        update_bn(data, model)
    elif job == "calibrate_inplace":
        bnfold.torch.calibrate(model, data, inplace=True)
    else:
        bnfold.torch.calibrate(model, data)
    t3 = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    # "own": what differs between the jobs (the job's own import, build, work), without the
    # imports of torch (and timm) they share; the parent adds the process's exit
    return {"imports": t1 - t0, "build": t2 - t1, "work": t3 - t2, "faults": faults, "own": t3 - t_own, "job_import": t1 - t_own,
            "end": time.time()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="OMP/MKL/NUMBA threads of the jobs (0: their default)")
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ", ".join(JOBS))
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    ap.add_argument("--arch", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet50",
                    help="resnet50 (torchvision's, else written here), or timm:NAME (e.g. timm:mobilenetv3_small_100)")
    ap.add_argument("--compare", help="another bnfold checkout whose calibrate jobs run in the same rounds")
    ap.add_argument("--bytecode", choices=("cached", "none"), default="cached",
                    help="cached: children read compiled .pyc, as after a pip install (default); none: as the "
                         "environment has it")
    args = ap.parse_args()
    shape = (args.batches, args.batch_size, args.size)
    if args.job:
        print(json.dumps(run_job(args.job, args.arch, *shape)))
        return
    arch = args.model if args.model.startswith("timm:") else "torchvision" if _torchvision_imports() else "local"
    jobs = args.jobs.split(",")
    if args.compare:
        jobs += [f"{j}@before" for j in jobs if j.startswith("calibrate")]
    wall: dict[str, list[float]] = {j: [] for j in jobs}
    cpu: dict[str, list[float]] = {j: [] for j in jobs}
    split: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
    pycache = tempfile.TemporaryDirectory(prefix="bnfold-bench-pyc-") if args.bytecode == "cached" else None
    for r in range(-1 if pycache else 0, args.repeats):  # round -1: untimed warm-up that compiles
        for job in jobs:
            env = {k: v for k, v in os.environ.items() if k != "BNFOLD_NUMBA"}
            if pycache:
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env["PYTHONPYCACHEPREFIX"] = pycache.name
            name, _, other = job.partition("@")
            if other:
                env["PYTHONPATH"] = args.compare
            if name.startswith("calibrate_numba"):
                env["BNFOLD_NUMBA"] = name[-1]
            if args.threads:
                for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
                    env[var] = str(args.threads)
            cmd = [sys.executable, __file__, "--job", name.split("_numba")[0], "--arch", arch,
                   "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--size", str(args.size)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{job} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            if r < 0:
                continue
            out = done.stdout
            ended = time.time()
            wall[job].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[job].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            got = json.loads(out.strip().splitlines()[-1])
            got["own"] += ended - got.pop("end")  # and the exit (interpreter shutdown, freeing the model)
            split[job].append(got)
        if r < 0:
            continue
        print(f"round {r + 1}: " + "  ".join(f"{j} {wall[j][-1]:.3f}/{cpu[j][-1]:.3f}" for j in jobs), file=sys.stderr)
    base_wall = statistics.median(wall["eval"]) if "eval" in wall else None
    base_cpu = statistics.median(cpu["eval"]) if "eval" in cpu else None
    where = {"torchvision": "ResNet-50 (torchvision)", "local": "ResNet-50 (written in this script)"}.get(arch, arch)
    print(f"{where}, {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}, fresh process "
          f"per job, threads {args.threads or 'default'}, bytecode {args.bytecode}, median of {args.repeats}")
    print(f"{'job':<24} {'wall s':>7} {'x eval':>7} {'cpu s':>7} {'x eval':>7} {'imports':>8} {'build':>7} {'work':>7}"
          f" {'faults':>7}  {'- update_bn (ms, median of rounds)':>34} {'rounds <= update_bn':>20}"
          f" {'own - update_bn':>16} {'rounds <=':>10}")
    for job in jobs:
        w, c = statistics.median(wall[job]), statistics.median(cpu[job])
        parts = {k: statistics.median(s[k] for s in split[job]) for k in ("imports", "build", "work", "faults")}
        rw = f"{w / base_wall:.2f}x" if base_wall else "-"
        rc = f"{c / base_cpu:.2f}x" if base_cpu else "-"
        vs = wins = own = own_wins = "-"
        if "update_bn" in wall and job != "update_bn":  # paired by round: a busy phase hits both alike
            diffs = [a - b for a, b in zip(wall[job], wall["update_bn"])]
            vs = f"{statistics.median(diffs) * 1e3:+.0f}"
            wins = f"{sum(d <= 0 for d in diffs)} of {len(diffs)}"
            owns = [a["own"] - b["own"] for a, b in zip(split[job], split["update_bn"])]
            own = f"{statistics.median(owns) * 1e3:+.0f}"
            own_wins = f"{sum(d <= 0 for d in owns)} of {len(owns)}"
        print(f"{job:<24} {w:7.3f} {rw:>7} {c:7.3f} {rc:>7} {parts['imports']:8.3f} {parts['build']:7.3f} "
              f"{parts['work']:7.3f} {parts['faults']:7.0f}  {vs:>34} {wins:>20} {own:>16} {own_wins:>10}")


if __name__ == "__main__":
    main()
