"""Measure the HTML report of a real verification in headless Chromium at 1400 x 900 (issue 15 point 5).

Folds sample_models/resnet_train.onnx, verifies the folded model (passes) and a copy with one output
channel of its 6th Conv scaled by 1.01 (fails) against the frozen model, writes both HTML reports,
and prints per page: document scrollWidth (> 1400 means a horizontal scrollbar), the widest
element's right edge, number cells that wrap, the tallest table row, and where the verdict and the
first divergent site end (px from the top; the first screen is ~813 px high in a 900 px window).
Screenshots of the first screen and of the whole page go to OUT (default /tmp/bnfold-html-layout).

    python benchmarks/html_report_layout.py [OUT]

Needs chromium on PATH. Measured on this checkout's renderer (before the redesign the failing page
measured scrollWidth 2244, six number cells on two lines, fold-site rows 128 px tall).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser_layout import CHROMIUM, HEIGHT, WIDTH, measure, screenshot  # noqa: E402
from test_report_html_layout import _perturbed  # noqa: E402

import bnfold  # noqa: E402
from bnfold.report.html import write_html  # noqa: E402


def main(out: Path) -> int:
    if CHROMIUM is None:
        print("chromium is not installed: nothing measured")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    samples = ROOT / "sample_models"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folded, frozen, bad = work / "folded.onnx", work / "frozen.onnx", work / "bad.onnx"
        assert bnfold.fold(samples / "resnet_train.onnx", output=folded, frozen_output=frozen,
                           data=samples / "resnet_calib.npz").ok
        _perturbed(folded, bad)
        for name, candidate in (("pass", folded), ("fail", bad)):
            result = bnfold.verify(frozen, candidate, data=samples / "resnet_calib.npz", iterations=4)
            page = out / f"{name}.html"
            write_html(result, page)
            m = measure(page, work)
            screenshot(page, out / f"{name}_first_screen.png", WIDTH, HEIGHT)
            screenshot(page, out / f"{name}_full.png", WIDTH, 2600)
            print(json.dumps({
                "page": name, "passed": result.passed, "scroll_width": m["scroll_width"],
                "widest_right_edge": round(m["right"]), "wrapped_number_cells": m["wrapped"],
                "tallest_row_px": round(m["max_row"], 1), "line_px": m["line"],
                "verdict_bottom_px": round(m["verdict"]["bottom"]), "first_site_bottom_px":
                    None if m["first_site_bottom"] is None else round(m["first_site_bottom"]),
                "first_screen_px": m["inner_height"]}))
    print(f"screenshots and pages in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bnfold-html-layout")))
