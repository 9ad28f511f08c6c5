"""Start N ranks of tests/distributed_workers.py (or any command) as processes on loopback, the way
torchrun sets their environment, on a free port (bound to port 0 first)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "distributed_workers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ended:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_ranks(world: int, args: Sequence[str], *, extra_env: Mapping[str, str] | None = None,
              timeout: float = 180, command: Sequence[str] | None = None) -> list[Ended]:
    """Run ``command`` (default: the worker with ``args``) as ``world`` ranks; wait for all."""
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY",)}
        env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE":
                    str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
        env.update(extra_env or {})
        cmd = list(command) if command is not None else [sys.executable, str(WORKER), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended = []
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        ended.append(Ended(rank, p.returncode, out, err, time.monotonic() - start))
    return ended
