"""Review 21, distributed: calibrate's deferred copy on a rank that has no batches of its own. The
copy's parameters get their own storage during the first forward; a rank that runs none returned
a "copy" whose every parameter still shared the input's storage (editing the copy changed the
module passed in). Real gloo ranks on loopback (tests/distributed_launch.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from distributed_launch import run_ranks

_WORKER = '''
import os, threading
from datetime import timedelta
import torch, torch.distributed as dist
from torch import nn
import bnfold.torch

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
before = {k: v.clone() for k, v in m.state_dict().items()}
g = torch.Generator().manual_seed(1)
batches = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]
out, stats = bnfold.torch.calibrate(m, batches if rank == 0 else [], distributed=True)
shared = [n for (n, a), b in zip(out.named_parameters(), m.parameters()) if a.data_ptr() == b.data_ptr()]
with torch.no_grad():
    for p in out.parameters():
        p.add_(1.0)
changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
thread = any(t.name == "bnfold-copy" for t in threading.enumerate())
print(f"shared={shared} changed={changed} thread={thread} stats={sorted(stats)}")
dist.destroy_process_group()
'''


@pytest.mark.slow(reason="two processes importing torch (~6 s)")
def test_a_rank_without_batches_returns_a_copy_of_its_own(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    ended = run_ranks(2, [], command=[sys.executable, str(worker)])
    for e in ended:
        assert e.returncode == 0, e.stderr[-2000:]
        assert e.stdout.strip() == "shared=[] changed=[] thread=False stats=['1', '4']", (e.rank, e.stdout)
