"""bnfold.report.markdown: the Markdown summary of a VerifyResult and the GitHub job summary. Results are
built by hand in report_builders.py."""
from __future__ import annotations

import dataclasses
import re

from report_builders import (
    make_failing_result,
    make_metrics,
    make_passing_result,
    make_site,
)

from bnfold.report.facts import worst_sites
from bnfold.report.markdown import (
    WORST_SITES,
    append_github_step_summary,
    markdown_summary,
    write_markdown,
)
from bnfold.run_records import ProviderRun, VerifyResult

# make_failing_result: cpu (logits ok, probs<&> fails), cuda (same, with a noise floor), rocm
# skipped; 5 fold sites of which 3 fail (layer1.bn<1>, layer2.bn = inf, layer3.bn = nan).


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


def test_markdown_names_the_first_divergent_site():
    """Issue 15 point 5: the Markdown named the first divergent fold site only inside the table of the
    10 worst sites, so where later sites inherit a larger error it was not named at all."""
    base = make_failing_result()
    first = make_site("stage1.conv3.bn|x", 3, 2e-4, channels=((5, 2e-4),))
    later = tuple(make_site(f"late{i}", 10 + i, 1e-2 * (i + 1)) for i in range(WORST_SITES + 2))
    result = dataclasses.replace(base, sites=(make_site("stem.bn", 1, 1e-7), first) + later,
                                 first_divergent_site=first.bn)
    text = markdown_summary(result)
    *_, site_table = _tables(text)
    assert all("stage1.conv3" not in row[1] for row in site_table)  # not among the 10 worst
    lines = text.splitlines()
    verdict = next(i for i, line in enumerate(lines) if line.startswith("❌ **FAILED**"))
    assert lines[verdict + 2] == (
        "**First divergent fold site:** stage1.conv3.bn\\|x (backward into stage1.conv3.bn\\|x\\_conv, "
        "position 3): max abs 0.0002, max rel 0.002 (atol 0.0001, rtol 0.0001); worst channels 5 (0.0002)")
    # a passing verification names none
    assert "First divergent" not in markdown_summary(make_passing_result())


def test_markdown_calibration_section():
    """A fold's statistics lines: a section under the verdict, escaped, one line each (hard breaks);
    none without them."""
    result = make_passing_result()
    lines = ["Statistics: estimator unbiased; 2 BN calibrated on 4 batches; gap 0.1 at layer_1*bn",
             "Sufficiency: 1 of 2 BN within 1 % after 32 samples; <b>x</b> needs ~900"]
    text = markdown_summary(result, statistics=lines)
    head, rest = text.split("### Calibration\n\n", 1)
    assert "**PASSED**" in head and "Rule:" not in head and "Rule:" in rest
    block = rest.split("\n\n", 1)[0].splitlines()
    assert block == ["Statistics: estimator unbiased; 2 BN calibrated on 4 batches; gap 0.1 at layer\\_1\\*bn  ",
                     "Sufficiency: 1 of 2 BN within 1 % after 32 samples; &lt;b&gt;x&lt;/b&gt; needs ~900"]
    assert "Calibration" not in markdown_summary(result) and markdown_summary(result, statistics=[]) == \
        markdown_summary(result)
