"""review23: a settled heap (bnfold.torch.heap) keeps up to ~64 MiB of freed activations at the
top of glibc's main heap for the next batch; once a calibration is over, that memory is given back
(``release_heap``: ``malloc_trim(0)``), so a process that calibrates does not keep it for good.

Measured in a fresh interpreter: glibc's ``keepcost`` (the free top of the main heap, resident
until trimmed) after three calibrations of a small convnet on 8x3x128x128 batches. Up to c43aeeb
it was ~28 MiB (RSS +20 MB over the commit before); given back, 0-10 MiB (what the last steps free after it)."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import heap  # noqa: E402


def _glibc() -> bool:
    return heap._glibc() and hasattr(ctypes.CDLL(None), "mallinfo2")


PROBE = textwrap.dedent('''
    import ctypes, sys
    if len(sys.argv) > 1:
        sys.path.insert(0, sys.argv[1])  # another checkout's bnfold (to see a revision fail)
    import torch
    from torch import nn
    import bnfold.torch as bt

    class MallInfo(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo
    torch.manual_seed(0)

    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    net = nn.Sequential(*block(3, 32, 2), *block(32, 64, 1), *block(64, 64, 2), *block(64, 128, 1),
                        nn.AdaptiveAvgPool2d(1)).train()
    data = [torch.randn(8, 3, 128, 128) for _ in range(4)]
    for _ in range(3):
        bt.calibrate(net, data)
    print(mallinfo2().keepcost)
''')


@pytest.mark.slow
@pytest.mark.skipif(not _glibc(), reason="glibc's malloc (mallinfo2)")
def test_a_calibration_gives_its_settled_heap_back() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    keep = int(done.stdout.split()[-1])
    assert keep < 20 << 20, f"{keep / 2**20:.1f} MiB of freed heap kept after the calibrations"
