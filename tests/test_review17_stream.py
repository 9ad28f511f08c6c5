"""Review of issue 17 (streaming sources): a source that calls sys.exit mid-stream, and tensors on the
'meta' device, are one-line bad input (exit 3), as a data factory that exits or yields a str is."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_workers import DATA, MODEL

import bnfold
from bnfold.errors import BadInputError

FACTORY = '''
import sys
import numpy as np

D = np.load(%r)["images"]


def exits():
    yield {"images": D[:16]}
    sys.exit(7)
'''


def test_a_data_factory_generator_that_calls_sys_exit_is_exit_3_with_one_line(tmp_path: Path) -> None:
    # before the fix bnfold ended with the generator's own code (7), printing nothing
    (tmp_path / "review17_exits.py").write_text(FACTORY % str(DATA))
    out = tmp_path / "out" / "folded.onnx"
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None
    done = subprocess.run([exe, "fold", str(MODEL), "--data-factory", "review17_exits:exits", "--batch-size", "16",
                           "-o", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stderr == ("bnfold: error: calibration data source called sys.exit(7) on batch 2; a data source "
                           "must yield batches and end by returning, not exit\n")
    assert not out.parent.exists()


def test_a_meta_tensor_batch_is_bad_input_naming_the_batch() -> None:
    # before the fix: NotImplementedError "Cannot copy out of meta tensor" reported as an internal error
    def batches() -> Iterator[dict[str, torch.Tensor]]:
        yield {"images": torch.from_numpy(np.load(DATA)["images"][:16])}
        yield {"images": torch.empty(16, 3, 32, 32, device="meta")}

    with pytest.raises(BadInputError, match=r"batch 2 input 'images' is a tensor on the 'meta' device"):
        bnfold.fold(str(MODEL), data=batches(), batch_size=16, dry_run=True, distributed=False)


def test_a_meta_tensor_stream_on_the_torch_route_is_bad_input() -> None:
    # torch route: the input dtypes were read by copying each first batch to numpy (a meta tensor:
    # NotImplementedError, an internal error; a GPU batch: a needless device-to-host copy)
    import bnfold.torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    with pytest.raises(BadInputError, match=r"batch 1 input 'input' is a tensor on the 'meta' device"):
        bnfold.torch.convert(model, [torch.empty(8, 3, 8, 8, device="meta")], output="folded.pt2", dry_run=True)
