"""review24b: a BN whose name holds a line break (a PyTorch submodule set with ``setattr(m,
"bn\\nx", ...)``; ONNX node and tensor names are free text too) broke the summary's one-line
entries: ``largest estimator gap ... at /bn`` and ``x/BatchNormalization`` on two lines, the same
in the ``Sufficiency:`` line and the warning list. Each summary line writes a line break inside a
name as its escape (``\\n``) now."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_cli  # noqa: E402
from torch import nn  # noqa: E402


@pytest.mark.slow
def test_line_break_in_bn_name_stays_on_its_summary_line(tmp_path: Path) -> None:
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(3, 4, 3))
    setattr(m, "bn\nx", nn.BatchNorm2d(4))  # noqa: B010
    torch.save(m.train(), tmp_path / "m.pt")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    res = run_cli("fold", tmp_path / "m.pt", "--unsafe-pickle", "--data", tmp_path / "d.npz", "--batch-size", "4",
                  "-o", tmp_path / "out.onnx")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    gap = [ln for ln in lines if "largest estimator gap" in ln]
    assert gap and gap[0].endswith("bn\\nx/BatchNormalization"), lines
    suff = [ln for ln in lines if ln.startswith("Sufficiency:")]
    assert suff and "bn\\nx" in suff[0], lines
    assert not any(ln.startswith("x") for ln in lines), lines  # no line begins with the name's tail


def test_control_characters_of_a_name_are_escaped_in_every_summary_line() -> None:
    """A name is free text from the model: ESC would reach the terminal raw (``\\x1b[2J`` clears
    it), a line break or U+2028 would split an entry. The text summary writes each unprintable
    character as its escape (the plan and drift tables too); letters of any script stay."""
    from report_builders import make_report

    from bnfold.report.summary import shown, summary_text

    report = make_report()
    report.bns[1].name = "bn\x1b[2J\u2028конв"  # the largest gap: named in the Statistics line
    report.warnings = ["BN 'bn\r\x00' kept"]
    text = summary_text(report)
    assert "\x1b" not in text and "\u2028" not in text and "\r" not in text and "\x00" not in text
    assert "bn\\x1b[2J\\u2028конв" in text and "BN 'bn\\r\\x00' kept" in text
    assert shown("layer1.0.bn1 σ ≥ 2") == "layer1.0.bn1 σ ≥ 2"
