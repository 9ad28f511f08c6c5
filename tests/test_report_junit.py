"""bnfold.report.junit: the JUnit XML of a VerifyResult for CI. Results are built by hand in report_builders.py."""
from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET

from report_builders import make_failing_result, make_metrics, make_passing_result

from bnfold.report.junit import junit_to_string, write_junit
from bnfold.run_records import ProviderRun, VerifyResult

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
