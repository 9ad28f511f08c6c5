"""bnfold.report.html: the self-contained HTML page of a VerifyResult. Results are built by hand in
report_builders.py."""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from report_builders import (
    make_failing_result,
    make_metrics,
    make_passing_result,
    make_site,
)

from bnfold.report.html import FAIL_COLOR, PASS_COLOR, render_html, write_html
from bnfold.run_records import ProviderRun, VerifyResult

# make_failing_result: cpu (logits ok, probs<&> fails), cuda (same, with a noise floor), rocm
# skipped; 5 fold sites of which 3 fail (layer1.bn<1>, layer2.bn = inf, layer3.bn = nan).
FAILING_SITES = {"layer1.bn<1>", "layer2.bn", "layer3.bn"}


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}
SVG_SELF_CLOSING = {"line", "rect", "polyline", "circle", "path"}


class Page(HTMLParser):
    """Collects elements (tag, attrs, parent svg index), text, and checks nesting."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict, int | None, list[str]]] = []
        self.stack: list[str] = []
        self.svg_index = -1
        self.text: list[str] = []
        self.titles: dict[int, str] = {}  # element index of a circle/rect -> its <title> text
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        in_svg = self.svg_index if "svg" in self.stack else None
        if tag == "svg":
            self.svg_index += 1
            in_svg = self.svg_index
        self.elements.append((tag, dict(attrs), in_svg, list(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        in_svg = self.svg_index if "svg" in self.stack else None
        self.elements.append((tag, dict(attrs), in_svg, list(self.stack)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.stack and self.stack[-1] == "title" and len(self.stack) >= 2:
            # the title of the innermost shape: the last element opened before this <title>
            for i in range(len(self.elements) - 1, -1, -1):
                if self.elements[i][0] in ("circle", "rect", "line"):
                    self.titles[i] = self.titles.get(i, "") + data
                    break

    def of(self, tag):
        return [(i, e) for i, e in enumerate(self.elements) if e[0] == tag]


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    assert not page.errors, page.errors[:5]
    assert page.stack == [], page.stack
    return page


def test_html_structure_and_plots(tmp_path):
    result = make_failing_result()
    text = render_html(result, title="bnfold <check>")
    assert text.startswith("<!DOCTYPE html>")
    page = _parse(text)
    body = " ".join("".join(page.text).split())
    assert "Verification FAILED on cpu, cuda, rocm" in body and "bnfold <check>" in body
    assert "<check>" not in text  # the title was escaped in the markup
    svgs = page.of("svg")
    outputs = [o for r in result.runs if r.status == "ran" for o in r.outputs if o.error_histogram]
    assert outputs  # the fixture's outputs carry error histograms
    # fold-site plot, summary bars, and one histogram per (provider, output)
    assert len(svgs) == 2 + len(outputs)
    hist_bars = [e for _, e in page.of("rect") if e[1].get("class") == "hbar"]
    assert len(hist_bars) >= len(outputs)
    circles = page.of("circle")
    assert len(circles) == len(result.sites)
    assert all(e[2] == 0 for _, e in circles)  # all in the first (fold-site) plot
    red = [e for _, e in circles if e[1]["fill"] == FAIL_COLOR]
    blue = [e for _, e in circles if e[1]["fill"] == PASS_COLOR]
    assert len(red) == len(FAILING_SITES) and len(blue) == len(result.sites) - len(FAILING_SITES)
    assert all("fail" in e[1]["class"] for e in red)
    # hover titles name the BN and the value, escaped names decoded back by the parser
    titles = [page.titles.get(i, "") for i, _ in circles]
    assert any(t.startswith("layer1.bn<1> (first divergent): max abs 0.125") for t in titles)
    assert any(t.startswith("layer2.bn: max abs inf") for t in titles)
    assert any(t.startswith("layer3.bn: max abs nan") for t in titles)
    assert any(t.startswith("head.bn: max abs 0,") for t in titles)
    # x follows the position along the network
    xs = [float(e[1]["cx"]) for _, e in circles]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    # every coordinate is a finite number, inf/nan included
    for tag, attrs, in_svg, _ in page.elements:
        if in_svg is None:
            continue
        for key in ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "width", "height"):
            if key in attrs:
                assert math.isfinite(float(attrs[key])), (tag, key, attrs[key])
    # bar chart: 4 bars (max, p99, mean, median) per provider x output, each with a title
    bars = [(i, e) for i, e in page.of("rect") if e[2] == 1 and e[1].get("class") == "bar"]
    assert len(bars) == 4 * 4
    assert all(page.titles.get(i) for i, _ in bars)
    assert any("probs<&>: max |candidate - reference| = 0.5" in page.titles[i] for i, _ in bars)
    # issue 15: the caption said "not a histogram" right above the histograms; it now says what the
    # bars are and points to the histograms
    assert "not a histogram" not in body and "log scale" in body
    assert "Error histogram per output" in body
    # tables: one per provider that ran, the settings/inputs/environment and the site table
    tables = page.of("table")
    assert sum(1 for _, e in tables if e[1].get("class") == "outputs") == 2
    assert sum(1 for _, e in tables if e[1].get("class") == "sites") == 1
    assert "NVIDIA H100 80GB HBM3" in body and "ROCMExecutionProvider not available" in body
    path = tmp_path / "report.html"
    write_html(result, path, title="bnfold <check>")
    assert path.read_text(encoding="utf-8") == text


def test_html_is_self_contained():
    text = render_html(make_failing_result())
    page = _parse(text)
    assert not page.of("script") and not page.of("link") and not page.of("img")
    assert not page.of("iframe") and not page.of("object")
    refs = re.findall(r"https?://[^\s\"'<>)]*", text)
    assert set(refs) <= {"http://www.w3.org/2000/svg"}, refs
    assert "url(" not in text and "@import" not in text and "src=" not in text
    for _, attrs, _, _ in page.elements:
        assert not any(k in ("href", "xlink:href", "src") for k in attrs)
    (csp,) = [e for _, e in page.of("meta") if e[1].get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp[1]["content"]


def test_html_escapes_names():
    result = make_failing_result()
    evil = '<script>alert("x")</script>'
    site = dataclasses.replace(result.sites[1], bn=evil, tensor="t<&>", target="c'\"")
    run = dataclasses.replace(result.runs[0], outputs=(make_metrics(evil, 1e-6),), note="<b>n</b>")
    result = dataclasses.replace(result, sites=(site,), runs=(run,), first_divergent_site=evil,
                                 note="<i>note</i>", settings={"<k>": "<v>"})
    text = render_html(result)
    assert evil not in text and "<b>n</b>" not in text and "<i>" not in text and "<k>" not in text
    page = _parse(text)
    assert not page.of("script") and not page.of("b") and not page.of("i")
    body = "".join(page.text)
    assert evil in body and "<b>n</b>" in body and "t<&>" in body and "<k>" in body


def test_html_empty_sites_skipped_and_nothing_ran():
    result = dataclasses.replace(make_failing_result(), sites=(), first_divergent_site=None)
    page = _parse(render_html(result))
    svgs = page.of("svg")
    n_hist = sum(1 for r in result.runs if r.status == "ran" for o in r.outputs if o.error_histogram)
    assert len(svgs) == 1 + n_hist and not page.of("circle")  # no fold-site plot
    assert "No fold sites were compared." in "".join(page.text)
    nothing = VerifyResult(passed=False, samples=0,
                           runs=(ProviderRun("cuda", "skipped", (), False, note="no GPU"),))
    page = _parse(render_html(nothing))
    assert not page.of("svg") and not page.of("circle")
    body = "".join(page.text)
    assert "No outputs were compared." in body and "no GPU" in body and "FAILED" in body
    empty = VerifyResult(passed=True, samples=0, runs=())
    page = _parse(render_html(empty))
    assert "no provider ran" in "".join(page.text)


def test_html_single_site_and_all_zero():
    base = make_passing_result()
    one = dataclasses.replace(base, sites=(make_site("only", 3, 0.0),))
    page = _parse(render_html(one))
    (circle,) = [e for _, e in page.of("circle")]
    assert circle[1]["fill"] == PASS_COLOR and circle[1]["r"] == "4"
    assert "0" in page.text  # the zero row is labelled "0" (an exact text node)...
    # ...and the point sits on it: the lowest grid line of the plot
    grid = [float(e[1]["y1"]) for _, e in page.of("line") if e[2] == 0 and e[1]["y1"] == e[1]["y2"]]
    assert float(circle[1]["cy"]) == pytest.approx(max(grid))


def test_html_first_divergent_is_ringed():
    page = _parse(render_html(make_failing_result()))
    ringed = [e for _, e in page.of("circle") if e[1]["r"] == "6"]
    assert len(ringed) == 1 and ringed[0][1]["fill"] == FAIL_COLOR


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_html_renders_in_headless_chromium(tmp_path):
    path = tmp_path / "report.html"
    write_html(make_failing_result(), path)
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Verification FAILED" in proc.stdout
    assert proc.stdout.count("<circle") == len(make_failing_result().sites)


def test_site_names_read_apart() -> None:
    """The fold-site table elides names where they still read apart (the full name on hover)."""
    sites = tuple(make_site(f"/stages/stages.{i}/bn{k}/BatchNormalization", 10 * i + k, 1e-6)
                  for i in range(3) for k in (1, 2))
    text = render_html(dataclasses.replace(make_passing_result(), sites=sites))
    shown = re.findall(r'<td><code title="(/stages/[^"]*)">([^<]*)</code></td>', text)
    assert len(shown) == len(sites) and len({s for _, s in shown}) == len(sites)
    assert all("..." in s for _, s in shown)
