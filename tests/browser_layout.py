"""Measure an HTML report's layout in headless Chromium (the ``chromium`` command line, no new
dependency): shared by tests/test_report_html_layout.py and benchmarks/html_report_layout.py.

The page itself forbids scripts (its Content-Security-Policy), so :func:`measure` renders a COPY
with that one meta tag taken out and a small script added that writes its measurements into the
DOM; ``--dump-dom`` then hands them back. What it measures, in a window ``width`` x ``height``:

- ``scroll_width``: ``document.documentElement.scrollWidth`` (> width means a horizontal scrollbar);
- ``wide``: elements whose right edge lies beyond the window (tag, class, right edge), and
  ``right``: the right edge of the widest element of the page's body;
- ``wrapped``: the texts of number cells (``td.num``) that take more than one line;
- ``max_row``: the tallest table row (px) and ``line``: the height of one line of table text;
- ``verdict``: the verdict line's box (top, bottom) and text, and ``first_site_bottom``: the bottom of
  the first-divergent-site line (None without one), to check both are on the first screen.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1400, 900

_SCRIPT = """<script>
window.addEventListener('load', () => {
  const d = document.documentElement, W = window.innerWidth;
  const wrapped = [];
  for (const c of document.querySelectorAll('td.num')) {
    const r = document.createRange(); r.selectNodeContents(c);
    const tops = new Set([...r.getClientRects()].map(x => Math.round(x.top)));
    if (tops.size > 1) wrapped.push(c.textContent);
  }
  const wide = []; let right = 0;
  for (const e of document.body.querySelectorAll('main *')) {
    const b = e.getBoundingClientRect();
    if (b.width > 0) right = Math.max(right, b.right);
    if (b.width > 0 && b.right > W + 0.5) wide.push([e.tagName, e.className.baseVal ?? e.className, b.right]);
  }
  const rows = [...document.querySelectorAll('table.sites tr, table.outputs tr')];
  const probe = document.querySelector('table.outputs td, table.sites td');
  const v = document.getElementById('verdict').getBoundingClientRect();
  const first = document.getElementById('first-site');
  const out = document.createElement('pre'); out.id = 'bnfold-measure';
  out.textContent = JSON.stringify({
    scroll_width: d.scrollWidth, inner_width: W, inner_height: window.innerHeight,
    wrapped: wrapped, wide: wide.slice(0, 20), right: right, numbers: document.querySelectorAll('td.num').length,
    max_row: Math.max(0, ...rows.map(r => r.getBoundingClientRect().height)),
    line: probe ? parseFloat(getComputedStyle(probe).lineHeight) : 0,
    verdict: {top: v.top, bottom: v.bottom, text: document.getElementById('verdict').textContent},
    first_site_bottom: first ? first.getBoundingClientRect().bottom : null,
  });
  document.body.appendChild(out);
});
</script>"""


def _flags(width: int, height: int) -> list[str]:
    assert CHROMIUM is not None
    return [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--hide-scrollbars", f"--window-size={width},{height}"]


def measure(page: Path, workdir: Path, width: int = WIDTH, height: int = HEIGHT) -> dict[str, Any]:
    """The layout figures of the HTML file ``page`` (see the module docstring)."""
    text = page.read_text(encoding="utf-8")
    text, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    assert n == 1, "the page has no Content-Security-Policy meta tag to lift for the measurement"
    probe = workdir / f"{page.stem}.measure.html"
    probe.write_text(text.replace("</body>", _SCRIPT + "</body>"), encoding="utf-8")
    proc = subprocess.run(
        _flags(width, height) + ["--run-all-compositor-stages-before-draw", "--virtual-time-budget=3000",
                                 "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="bnfold-measure">(.*?)</pre>', proc.stdout, re.S)
    assert found, "the measuring script wrote nothing: " + proc.stdout[-500:]
    figures: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    return figures


def screenshot(page: Path, png: Path, width: int = WIDTH, height: int = HEIGHT) -> None:
    """A PNG of ``page`` as a ``width`` x ``height`` window shows it (the page as written, CSP on)."""
    proc = subprocess.run(_flags(width, height) + [f"--screenshot={png}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
