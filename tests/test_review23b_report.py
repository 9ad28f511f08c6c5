"""review23b: a fold of a model whose BNs all keep their stored statistics, with --no-verify, said
"the data served verification" in its statistics line (summary, Markdown, HTML) above
"Verification: not run"; the data then served only as the export's example inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.report as R  # noqa: E402
import bnfold.torch as bt  # noqa: E402


@pytest.mark.parametrize("verify", [True, False])
def test_all_inference_bn_statistics_line_names_what_the_data_did(tmp_path: Path, verify: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    res = bt.convert(net, tmp_path / "x.npy", tmp_path / "o.onnx", batch_size=8, device="cpu", verify=verify)
    (line,) = R.statistics_lines(res.report)
    assert line.startswith("Statistics: no BN normalises with batch statistics")
    assert ("served verification" in line) is verify
    assert line.endswith("the data served verification" if verify else "the data served as the export's example inputs")
    text = R.summary_text(res.report)
    assert ("Verification: not run" in text) is not verify
