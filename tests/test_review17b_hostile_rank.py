"""review17b: a fake rank on the rendezvous port that sends crafted bytes makes a real rank stop at
once with one line (exit 3), without allocating what it announces and without waiting for it."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from distributed_launch import run_ranks
from distributed_workers import DATA, MODEL

FAKE = '''
import os, sys, time
from datetime import timedelta
if os.environ["RANK"] == "0":
    os.execv(sys.argv[1], ["bnfold", "fold", sys.argv[2], "--data", sys.argv[3], "-o", sys.argv[4]])
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
mode = sys.argv[5]
sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
if mode in ("huge", "negative"):
    dist.all_gather(sizes, torch.tensor([2**40 if mode == "huge" else -5]))
else:
    p = {"list": b'{"l":[]}', "badcode": b'{"d":[["error","boom"],["exit_code","zz"]]}'}[mode]
    dist.all_gather(sizes, torch.tensor([len(p)]))
    n = max(int(s) for s in sizes)
    mine = torch.zeros(n, dtype=torch.uint8)
    mine[:len(p)] = torch.frombuffer(bytearray(p), dtype=torch.uint8)
    dist.all_gather([torch.zeros(n, dtype=torch.uint8) for _ in range(2)], mine)
time.sleep(20)  # the fake keeps its socket open: a real rank that waits for it waits 20 s
'''


@pytest.mark.slow(reason="two processes importing torch per case (~20 s)")
@pytest.mark.parametrize(("mode", "says"), [
    # before: "another rank stopped answering ... can't allocate memory: you tried to allocate 1099511627776 bytes"
    # (1 TiB failed at once; 8 GiB would have been allocated world_size + 1 times)
    ("huge", "rank 1 announced a message of 1099511627776 bytes (at most 1073741824 are accepted)"),
    # before: waited for the fake's bytes until its process ended (or the 300 s timeout)
    ("negative", "rank 1 announced a message of -5 bytes"),
    # before: 'internal error: ValueError: invalid literal for int()' (traceback with --debug)
    ("badcode", "rank 1 sent a message that is not bnfold's (bad error item)"),
    # before: an AttributeError hidden by "rank 0: rank 0 stopped answering before it finished" 20 s later
    ("list", "rank 1 sent a message that is not bnfold's (a list where a gather item belongs)"),
])
def test_a_fake_rank_sending_crafted_bytes_stops_a_real_rank_at_once(tmp_path: Path, mode: str, says: str) -> None:
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    out = tmp_path / "out" / "m.onnx"
    ended = run_ranks(2, [], command=[sys.executable, str(script), exe, str(MODEL), str(DATA), str(out), mode],
                      timeout=170)
    real = ended[0]
    assert real.returncode == 3, real.stderr[-1000:]
    assert real.stderr.count("\n") == 1 and real.stderr.startswith("bnfold: error: rank 0: "), real.stderr
    assert says in real.stderr, real.stderr
    assert real.seconds < ended[1].seconds - 5  # it did not wait for the fake's socket to close
    assert not out.parent.exists()
