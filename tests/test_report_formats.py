"""bnfold.report renderers of a VerifyResult for CI: JUnit XML, Markdown (and the GitHub job
summary), the self-contained HTML page. Results are built by hand in test_report.py."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from test_report import make_failing_result, make_metrics, make_passing_result, make_site

from bnfold.records import ProviderRun, VerifyResult
from bnfold.report.facts import worst_sites
from bnfold.report.html import FAIL_COLOR, PASS_COLOR, render_html, write_html
from bnfold.report.junit import junit_to_string, write_junit
from bnfold.report.markdown import (
    WORST_SITES,
    append_github_step_summary,
    markdown_summary,
    write_markdown,
)

# make_failing_result: cpu (logits ok, probs<&> fails), cuda (same, with a noise floor), rocm
# skipped; 5 fold sites of which 3 fail (layer1.bn<1>, layer2.bn = inf, layer3.bn = nan).
FAILING_SITES = {"layer1.bn<1>", "layer2.bn", "layer3.bn"}


# ---------------------------------------------------------------------------------------------
# JUnit
# ---------------------------------------------------------------------------------------------


def _suite(result: VerifyResult, tmp_path, **kw) -> ET.Element:
    path = tmp_path / "junit.xml"
    write_junit(result, path, **kw)
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for element in (root, suite):  # the counts agree with the cases actually present
        cases = suite.findall("testcase")
        assert int(element.get("tests")) == len(cases)
        assert int(element.get("failures")) == sum(1 for c in cases if c.find("failure") is not None)
        assert int(element.get("skipped")) == sum(1 for c in cases if c.find("skipped") is not None)
        assert element.get("errors") == "0"
    return suite


def _cases(suite: ET.Element) -> dict[tuple[str, str], ET.Element]:
    cases = {(c.get("classname"), c.get("name")): c for c in suite.findall("testcase")}
    assert len(cases) == len(suite.findall("testcase"))  # no duplicate case
    return cases


def test_junit_counts_and_cases(tmp_path):
    result = make_failing_result()
    suite = _suite(result, tmp_path)
    assert suite.get("name") == "bnfold.verify"
    # 2 providers x 2 outputs ran, 2 skipped cases for rocm, 3 failing sites
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("9", "5", "2")
    cases = _cases(suite)
    assert set(cases) == {
        ("bnfold.verify.cpu", "logits"), ("bnfold.verify.cpu", "probs<&>"),
        ("bnfold.verify.cuda", "logits"), ("bnfold.verify.cuda", "probs<&>"),
        ("bnfold.verify.rocm", "logits"), ("bnfold.verify.rocm", "probs<&>"),
        *(("bnfold.verify.sites", bn) for bn in FAILING_SITES),
    }
    assert len(cases[("bnfold.verify.cpu", "logits")]) == 0  # passed: no child element
    failure = cases[("bnfold.verify.cpu", "probs<&>")].find("failure")
    assert failure is not None and "max abs 0.25" in failure.get("message")
    assert "mismatches 24/24 (100%)" in failure.get("message")
    assert "atol 0.0001, rtol 0.0001" in failure.get("message")
    assert "max_abs = 0.25" in failure.text and "worst element" in failure.text
    cuda = cases[("bnfold.verify.cuda", "probs<&>")].find("failure")
    assert "noise floor inf" in cuda.get("message")
    skipped = cases[("bnfold.verify.rocm", "logits")].find("skipped")
    assert skipped is not None and "ROCMExecutionProvider not available" in skipped.get("message")
    site = cases[("bnfold.verify.sites", "layer1.bn<1>")].find("failure")
    assert "max abs 0.125" in site.get("message") and "7 (0.125)" in site.text
    assert "first divergent" in site.text
    assert "max abs inf" in cases[("bnfold.verify.sites", "layer2.bn")].find("failure").get("message")
    assert "max abs nan" in cases[("bnfold.verify.sites", "layer3.bn")].find("failure").get("message")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["verdict"] == "fail" and props["samples"] == "4"
    assert props["first_divergent_site"] == "layer1.bn<1>" and props["settings.tf32"] == "true"  # JSON literals, not Python reprs


def test_junit_passing(tmp_path):
    suite = _suite(make_passing_result(), tmp_path, suite_name="ci.bn")
    assert suite.get("name") == "ci.bn"
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("2", "0", "0")
    assert all(c.get("classname") == "bnfold.verify.cpu" for c in suite.findall("testcase"))


def test_junit_provider_failure_and_nothing_ran(tmp_path):
    # ran but fell back to CPU: every output within tolerance, the provider still fails
    fell_back = ProviderRun("cuda", "ran", ("CPUExecutionProvider",), False,
                            (make_metrics("y", 1e-7),), note="fell back to CPUExecutionProvider")
    result = VerifyResult(passed=False, samples=1, runs=(fell_back,))
    cases = _cases(_suite(result, tmp_path))
    failure = cases[("bnfold.verify.cuda", "(provider)")].find("failure")
    assert "fell back" in failure.get("message") and "used: CPUExecutionProvider" in failure.get("message")
    assert cases[("bnfold.verify.cuda", "y")].find("failure") is None
    # nothing ran: one skipped case per provider, no output names known
    result = VerifyResult(passed=False, samples=0,
                          runs=(ProviderRun("cuda", "skipped", (), False, note="no GPU"),))
    suite = _suite(result, tmp_path)
    assert (suite.get("tests"), suite.get("skipped")) == ("1", "1")
    assert _cases(suite)[("bnfold.verify.cuda", "(all outputs)")].find("skipped") is not None


def test_junit_string_and_odd_names(tmp_path):
    result = make_failing_result()
    bad = dataclasses.replace(make_metrics("out\x01\"'&<>]]>", 1.0), passed=False)
    run = ProviderRun("cpu", "ran", ("CPUExecutionProvider",), False, (bad,), note="a\x00b")
    odd = dataclasses.replace(result, runs=(run,))
    text = junit_to_string(odd)
    root = ET.fromstring(text.encode("utf-8"))  # well-formed despite control characters
    (case,) = [c for c in root.iter("testcase") if c.get("classname") == "bnfold.verify.cpu"]
    assert case.get("name") == "out?\"'&<>]]>"
    path = tmp_path / "j.xml"
    path.write_text("old", encoding="utf-8")
    write_junit(result, path)
    assert path.read_text(encoding="utf-8") == junit_to_string(result)
    assert sorted(os.listdir(tmp_path)) == ["j.xml"]  # atomic: no temporary file left


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


def _tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append(_cells(line))
        else:
            current = None
    return tables


def test_markdown_failing():
    result = make_failing_result()
    text = markdown_summary(result, title="Fold check")
    lines = text.splitlines()
    assert lines[0] == "## Fold check"
    assert lines[2].startswith("❌ **FAILED** on cpu, cuda, rocm: 4 samples, max abs 0.5")
    assert "✅ **PASSED**" not in text
    assert "### cpu ❌" in text and "### cuda ❌" in text
    assert "### rocm ⏭️ skipped: ROCMExecutionProvider not available" in text
    cpu, cuda, sites = _tables(text)
    header = ["output", "max abs", "p99 abs", "max rel", "mismatches", "cosine", "SNR dB",
              "max ULP", "top-1", "atol/rtol", "verdict"]
    assert cpu[0] == header and cuda[0] == header[:2] + ["noise floor"] + header[2:]
    for table in (cpu, cuda, sites):
        assert all(len(row) == len(table[0]) for row in table)  # escaping kept the columns
    logits = cpu[2]
    assert logits[0] == "logits" and logits[-1] == "✅ pass" and logits[4] == "0 (0%)"
    assert logits[8] == "100%" and logits[5].startswith("1-")  # cosine just under 1, not "1"
    probs = cpu[3]
    assert probs[0] == "probs&lt;&amp;&gt;" and probs[1] == "0.25" and probs[-1] == "❌ fail"
    assert probs[4] == "24 (100%)" and probs[9] == "0.0001 / 0.0001"
    assert cuda[2][2] == "1.5e-06" and cuda[3][2] == "inf"  # noise floor next to the error
    # fold sites, worst first: failing ones (inf, nan, 0.125) then passing ones
    assert sites[0][:2] == ["position", "BN"]
    assert [row[1] for row in sites[2:5]] == [
        "layer2.bn", "layer3.bn", "**layer1.bn&lt;1&gt;** (first divergent)"]
    assert sites[4][7] == "7 (0.125), 2 (0.01)" and sites[4][-1] == "❌ fail"
    assert "### Fold sites: 3 of 5 out of tolerance (worst 5 shown)" in text
    assert "**Settings:** graph\\_optimization\\_level disabled; tf32 True" in text
    assert "inputs.seed 0" in text and "Reproduction files: /tmp/bnfold-repro" in text


def test_markdown_passing_and_worst_ten(tmp_path):
    base = make_passing_result()
    sites = tuple(make_site(f"s{i}", i, 10.0 ** -(i % 9)) for i in range(25))
    result = dataclasses.replace(base, sites=sites)
    text = markdown_summary(result)
    assert "✅ **PASSED**" in text and "❌" not in text.split("### Fold sites")[0]
    *_, site_table = _tables(text)
    rows = site_table[2:]
    assert len(rows) == WORST_SITES == 10
    expected = worst_sites(sites, WORST_SITES)
    assert [r[1] for r in rows] == [s.bn for s in expected]
    assert expected[0].max_abs == 1.0 and not expected[0].passed  # 1e0 > atol: failing first
    path = tmp_path / "summary.md"
    write_markdown(result, path)
    assert path.read_text(encoding="utf-8") == text


def test_markdown_escapes_pipes():
    m = make_metrics("a|b_c*", 1e-6)
    run = ProviderRun("cpu", "ran", ("CPUExecutionProvider",), True, (m,))
    text = markdown_summary(VerifyResult(passed=True, samples=1, runs=(run,)))
    (table,) = _tables(text)
    assert table[2][0] == "a\\|b\\_c\\*" and len(table[2]) == len(table[0])


def test_github_step_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert append_github_step_summary("# nothing") is False
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "")
    assert append_github_step_summary("# nothing") is False
    path = tmp_path / "step_summary.md"
    path.write_text("previous step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(path))
    md = markdown_summary(make_failing_result())
    assert append_github_step_summary(md) is True
    assert append_github_step_summary("tail") is True
    content = path.read_text(encoding="utf-8")
    assert content.startswith("previous step\n\n## bnfold verification")
    assert md in content and content.endswith("\n\ntail\n")
    fresh = tmp_path / "fresh.md"  # a file that does not exist yet is created
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(fresh))
    assert append_github_step_summary("x") is True and fresh.read_text(encoding="utf-8") == "x\n"


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
    assert "not a histogram" in body and "log scale" in body
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
