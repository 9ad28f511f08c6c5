"""JUnit XML for CI test dashboards (GitLab, Jenkins, GitHub test reporters): ``write_junit``.

One ``<testsuite>`` inside ``<testsuites>``:

- one ``<testcase>`` per provider x output, ``classname="bnfold.verify.<provider>"``,
  ``name=<output name>``; a failing output carries ``<failure message="...">`` with its figures
  (the message is one line, the element text has every metric);
- a skipped provider gives one ``<skipped message="...">`` case per output name known from the
  providers that ran (a single ``"(all outputs)"`` case when none ran);
- a provider that ran but failed without any failing output (it fell back to another execution
  provider, or produced no outputs) gives one failing case named ``"(provider)"``;
- one case per fold site that fails, ``classname="bnfold.verify.sites"``, ``name=<BN name>``.

``tests``/``failures``/``skipped`` count those cases; ``errors`` is always 0. The verdict, sample
count and settings go into ``<properties>``. The file is written atomically.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Any

from bnfold.report.facts import verify_facts
from bnfold.report.json_report import write_text_atomic
from bnfold.report.summary import (
    channels_text,
    floor_setting_text,
    fmt,
    fmt_cosine,
    output_figures,
    tolerance_text,
)
from bnfold.run_records import OutputMetrics, VerifyResult

__all__ = ["junit_to_string", "write_junit"]

SITES_CLASSNAME = "bnfold.verify.sites"


def _metrics_text(o: OutputMetrics, noise: float | None) -> str:
    lines = [f"output {o.name} [{o.dtype}] shape {list(o.shape)}: {tolerance_text(o)}"]
    for key in (
        "max_abs", "p99_abs", "mean_abs", "median_abs", "max_rel", "mismatches", "mismatch_pct",
        "elements", "min_atol", "min_rtol", "cosine", "snr_db", "max_ulp", "top1", "top5",
        "nan_ref", "nan_cand", "inf_ref", "inf_cand", "floor_max",
    ):
        value = getattr(o, key)
        lines.append(f"{key} = {fmt_cosine(value) if key == 'cosine' else fmt(value)}")
    if o.worst_index is not None:
        lines.append(
            f"worst element {list(o.worst_index)}: reference {fmt(o.worst_ref)}, "
            f"candidate {fmt(o.worst_cand)}"
        )
    if noise is not None:
        lines.append(f"noise floor = {fmt(noise)}")
    return "\n".join(lines)


def _clean(text: str) -> str:
    # XML 1.0 cannot hold most control characters, not even escaped; keep tab/newline/CR
    return "".join(ch if _xml_char(ch) else "?" for ch in str(text))


def _xml_char(ch: str) -> bool:
    c = ord(ch)
    if c < 0x20:
        return ch in "\t\n\r"
    return not (0xD800 <= c <= 0xDFFF or c in (0xFFFE, 0xFFFF))


def _case(suite: ET.Element, classname: str, name: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=_clean(classname), name=_clean(name), time="0")


def _build(result: VerifyResult, suite_name: str) -> ET.Element:
    facts = verify_facts(result)
    root = ET.Element("testsuites", name=_clean(suite_name))
    suite = ET.SubElement(root, "testsuite", name=_clean(suite_name))
    props = ET.SubElement(suite, "properties")

    def prop(name: str, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        ET.SubElement(props, "property", name=name, value=_clean("" if value is None else text))

    prop("verdict", "pass" if facts.passed else "fail")
    prop("samples", result.samples)
    prop("rule", result.rule)
    prop("noise_floor", floor_setting_text(result.settings))
    prop("first_divergent_site", result.first_divergent_site)
    prop("repro_dir", result.repro_dir)
    for key, value in sorted(result.settings.items()):
        prop(f"settings.{key}", value)

    tests = failures = skipped = 0
    known = list(facts.output_names)

    for run, noise in zip(result.runs, facts.noise):
        classname = f"bnfold.verify.{run.provider}"
        if run.status != "ran":
            message = f"provider {run.provider} {run.status}" + (f": {run.note}" if run.note else "")
            for name in known or ["(all outputs)"]:
                case = _case(suite, classname, name)
                ET.SubElement(case, "skipped", message=_clean(message))
                tests += 1
                skipped += 1
            continue
        output_failed = False
        for o in run.outputs:
            case = _case(suite, classname, o.name)
            tests += 1
            if not o.passed:
                output_failed = True
                failures += 1
                message = f"{output_figures(o, noise.get(o.name))} ({tolerance_text(o)})"
                if run.note and repr(o.name) in run.note:  # "output dtypes differ: 'y' is int32 ...": why 0 fails
                    message += f"; {run.note}"
                failure = ET.SubElement(case, "failure", message=_clean(message), type="OutOfTolerance")
                failure.text = _clean(_metrics_text(o, noise.get(o.name)))
        if not run.passed and not output_failed:
            case = _case(suite, classname, "(provider)")
            tests += 1
            failures += 1
            used = ", ".join(run.used) or "none"
            message = f"provider {run.provider} failed (used: {used})" + (f": {run.note}" if run.note else "")
            ET.SubElement(case, "failure", message=_clean(message), type="ProviderFailed")

    for site in facts.failing_sites:
        case = _case(suite, SITES_CLASSNAME, site.bn)
        tests += 1
        failures += 1
        message = (
            f"fold site {site.bn} ({site.direction} into {site.target}, tensor {site.tensor}): "
            f"max abs {fmt(site.max_abs)}, max rel {fmt(site.max_rel)} "
            f"(atol {fmt(site.atol)}, rtol {fmt(site.rtol)}"
            + (f", noise floor {fmt(site.floor_max)})" if site.floor_max is not None else ")")
        )
        failure = ET.SubElement(case, "failure", message=_clean(message), type="FoldSiteDiverges")
        text = [message, f"position {site.position}"]
        if site.worst_channels:
            text.append(f"worst channels: {channels_text(site)}")
        if site.bn == result.first_divergent_site:
            text.append("first divergent fold site")
        failure.text = _clean("\n".join(text))

    for element in (root, suite):
        element.set("tests", str(tests))
        element.set("failures", str(failures))
        element.set("errors", "0")
        element.set("skipped", str(skipped))
    suite.set("time", "0")
    return root


def junit_to_string(result: VerifyResult, suite_name: str = "bnfold.verify") -> str:
    """The JUnit XML document as text (UTF-8 declaration, indented)."""
    root = _build(result, suite_name)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(
    result: VerifyResult, path: str | os.PathLike, suite_name: str = "bnfold.verify"
) -> None:
    """Write the JUnit XML to ``path`` atomically (temporary file, then ``os.replace``)."""
    write_text_atomic(junit_to_string(result, suite_name), path)
