"""The report stage: renderers of the records (``Report``, ``VerifyResult``); they compute nothing.

    bnfold.report.write_json(result.report, "report.json")     # kind "fold"
    bnfold.report.write_junit(result.report.verification, "verify.xml")
    print(bnfold.report.summary_text(result.report))
    bnfold.report.write_markdown(result.report.verification, "summary.md",
                                 statistics=bnfold.report.statistics_lines(result.report))
"""
from __future__ import annotations

from bnfold.report.html import render_html, write_html
from bnfold.report.json_report import (
    drift_to_dict,
    report_to_dict,
    verify_report_to_dict,
    write_json,
    write_verify_json,
)
from bnfold.report.junit import junit_to_string, write_junit
from bnfold.report.markdown import append_github_step_summary, markdown_summary, write_markdown
from bnfold.report.summary import drift_table, plan_table, statistics_lines, summary_text, verify_summary_text

__all__ = [
    "append_github_step_summary",
    "drift_table",
    "drift_to_dict",
    "junit_to_string",
    "markdown_summary",
    "plan_table",
    "render_html",
    "report_to_dict",
    "statistics_lines",
    "summary_text",
    "verify_report_to_dict",
    "verify_summary_text",
    "write_html",
    "write_json",
    "write_junit",
    "write_markdown",
    "write_verify_json",
]
