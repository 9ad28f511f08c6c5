"""review24e: an output name holding control characters (ONNX names are free text: NUL, ESC, DEL,
C1 such as U+0085) reached the Markdown report, the ``$GITHUB_STEP_SUMMARY`` text and the HTML page
raw (the terminal summary escaped them already): HTML forbids them, a NUL turns into U+FFFD, ESC
reaches a terminal that prints the file. They are written as their escapes (``\\x1b``) now."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from onnx import TensorProto, helper, numpy_helper

NAMES = ["y\x1b[2J\u2028q", "y\x00z", "y\x7f\x85z"]


def _model(path: Path, k: float, name: str) -> Path:
    kk = numpy_helper.from_array(np.array(k, np.float32), "k")
    g = helper.make_graph([helper.make_node("Mul", ["x", "k"], [name])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])], [kk])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


def _controls(text: str) -> list[str]:
    return sorted({hex(ord(c)) for c in text if (ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F})


@pytest.mark.parametrize("name", NAMES)
def test_control_characters_of_an_output_name_are_escaped_in_markdown_and_html(tmp_path: Path, name: str) -> None:
    a, b = _model(tmp_path / "a.onnx", 1.0, name), _model(tmp_path / "b.onnx", 2.0, name)
    step = tmp_path / "step.md"
    res = run_cli("verify", a, b, "--summary-md", tmp_path / "s.md", "--html", tmp_path / "h.html", "--no-repro",
                  env={"GITHUB_STEP_SUMMARY": str(step)})
    assert res.returncode == 1, res.stderr
    md = (tmp_path / "s.md").read_text(encoding="utf-8")
    page = (tmp_path / "h.html").read_text(encoding="utf-8")
    assert _controls(md) == [] and _controls(step.read_text(encoding="utf-8")) == []
    assert "\u2028" not in md
    assert _controls(page) == []
    tail = name[1:]
    escaped = "".join(repr(c)[1:-1] if not c.isprintable() else c for c in tail)
    code = escaped.split("\\")[1][:3]  # x1b, x00, x7f: the name is still there, escaped
    assert code in md and code in page
