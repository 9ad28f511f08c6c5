"""bnfold.report.summary: the terminal summaries of fold and verify, and the plan table. The records are
built by hand in report_builders.py."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from report_builders import (
    make_failing_result,
    make_metrics,
    make_passing_result,
    make_report,
)

import bnfold
from bnfold.records import Action, Mode, Reason
from bnfold.report.summary import (
    elide_apart,
    ellipsize,
    plan_table,
    summary_text,
    verify_summary_text,
)
from bnfold.run_records import FoldDecision, ProviderRun, VerifyResult

# ---------------------------------------------------------------------------------------------
# summaries and plan table
# ---------------------------------------------------------------------------------------------

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_summary_text():
    report = make_report()
    text = summary_text(report)
    lines = text.splitlines()
    assert lines[0] == "BN found 3: folded 2, frozen and kept 1 (PRODUCER_FANOUT: 1)"
    assert "SHARED_WEIGHT_CLONED: 1" in text
    assert "unbiased" in text and "0.5 at layer1.0.bn2" in text  # largest gap and its layer
    v = report.verification
    assert f"max abs {v.max_abs:.3g}" in text and f"max rel {v.max_rel:.3g}" in text
    assert "PASSED" in text and "cpu: ran on CPUExecutionProvider -> passed" in text
    assert "Fold sites: all 2 within tolerance" in text
    assert "opset 9 model: upgraded to 15" in text
    assert "\x1b" not in text and text.isascii()
    assert len(lines) <= 12


def test_summary_text_failed_and_uncalibrated():
    failed = VerifyResult(
        passed=False, samples=2,
        runs=(ProviderRun("cpu", "ran", ("CPUExecutionProvider",), False,
                          (make_metrics("y", 0.3),)),),
    )
    text = summary_text(make_report(verification=failed, calibrated=False, dry_run=True))
    assert "FAILED" in text and "y [float32]: max abs 0.3" in text and "-> FAIL" in text
    assert "not calibrated" in text and "Dry run" in text
    assert "Verification: not run" in summary_text(make_report(verification=None))


def test_verify_summary_text():
    result = make_failing_result()
    text = verify_summary_text(result)
    lines = text.splitlines()
    assert lines[0].startswith("Verification (cpu, cuda, rocm, 4 samples): max abs 0.5")
    assert lines[0].endswith("-> FAILED")
    assert "  cpu: ran on CPUExecutionProvider -> FAILED" in lines
    assert any(line.startswith("  cuda: ran on CUDAExecutionProvider, CPUExecutionProvider -> FAILED")
               and "TF32 off" in line for line in lines)
    assert "  rocm: skipped (ROCMExecutionProvider not available)" in lines
    (logits_cuda,) = [l for l in lines if "logits" in l and "noise floor" in l]
    assert re.search(r"max abs 3(\.\d+)?e-06 \(noise floor 1\.5e-06\)", logits_cuda)
    assert "-> ok" in logits_cuda
    assert "cosine 1-" in logits_cuda and "top-1 100%" in logits_cuda
    probs = [l for l in lines if "probs<&>" in l]
    assert len(probs) == 2 and all("-> FAIL" in l and "mismatches 24/24 (100%)" in l for l in probs)
    assert "noise floor inf" in probs[1]
    (first,) = [l for l in lines if "First divergent fold site" in l]
    assert "layer1.bn<1>" in first and "max abs 0.125" in first
    assert "worst channels 7 (0.125), 2 (0.01)" in first
    assert "  Fold sites: 3 of 5 out of tolerance" in lines
    assert "/tmp/bnfold-repro" in text and "2 of 3 providers ran" in text
    assert "\x1b" not in text


def test_verify_summary_first_divergent_defaults_to_earliest_failing():
    result = dataclasses.replace(make_failing_result(), first_divergent_site=None)
    (first,) = [l for l in verify_summary_text(result).splitlines() if "First divergent" in l]
    assert "layer1.bn<1>" in first and "position 4" in first
    passing = verify_summary_text(make_passing_result())
    assert "PASSED" in passing and "First divergent" not in passing
    assert math.isfinite(make_passing_result().max_abs)



@dataclass
class Row:
    name: str
    mode: Mode
    producer: str | None
    producer_op: str | None
    decision: FoldDecision


def test_plan_table_alignment():
    long = "model.backbone.stage4.block17.residual_branch.second_conv.batch_norm"
    rows = [
        Row("bn1", Mode.TRAINING, "conv1", "Conv",
            FoldDecision("bn1", Action.FOLDED, target="conv1", direction="backward")),
        Row(long, Mode.DECOMPOSED, "model.backbone.stage4.block17.residual_branch.second_conv", "Conv",
            FoldDecision(long, Action.FROZEN_KEPT, reason=Reason.PRODUCER_FANOUT)),
        Row("bn_in", Mode.INFERENCE, None, None,
            FoldDecision("bn_in", Action.FOLDED, target="conv9", direction="forward")),
    ]
    table = plan_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    header = lines[0]
    assert header.split() == ["BN", "mode", "producer", "action", "target", "reason"]
    starts = [header.index(h) for h in ("mode", "producer", "action", "target", "reason")]
    for line in lines[2:]:
        # every column starts where its header does: the character before is a blank
        for s in starts:
            assert line[s - 1] == " " and line[s] != " ", (line, s)
    assert all(line == line.rstrip() for line in lines)
    assert long not in table
    assert "model.backbone" in table and "..." in table and "batch_norm" in table
    assert "PRODUCER_FANOUT" in lines[3] and "training-decomposed" in lines[3]
    assert "frozen-kept" in lines[3] and "folded" in lines[2]
    assert "conv1 (Conv)" in lines[2]
    assert table.isascii()


def test_plan_table_empty_and_ellipsize():
    assert "no BatchNormalization" in plan_table([])
    assert ellipsize("abcdefghij", 10) == "abcdefghij"
    cut = ellipsize("abcdefghijklmnop", 9)
    assert len(cut) == 9 and cut.startswith("abc") and cut.endswith("nop") and "..." in cut


def _cells_of(table: str, column: str) -> list[str]:
    """The cells of ``column`` in a plan table (columns start where their header does)."""
    lines = table.splitlines()
    start = lines[0].index(column)
    end = min((lines[0].index(h) for h in ("mode", "producer", "action", "target", "reason")
               if lines[0].index(h) > start), default=None)
    return [line[start:end].strip() for line in lines[2:]]


def test_plan_table_keeps_names_tellable_apart():
    """Issue 15 point 5: three rows of resnet_train read '/stages/stages.0/...tchNormalization': the
    middle elision cut exactly the part that tells them apart. The real model's table now shows every
    BN, producer and target differently (and each cell still fits its column)."""
    rows = bnfold.inspect(SAMPLES / "resnet_train.onnx")
    table = plan_table(rows)
    for column, of in (("BN", lambda r: r.name), ("target", lambda r: r.decision.target)):
        cells = _cells_of(table, column)
        assert len(set(cells)) == len({of(r) for r in rows}) == len(rows), cells
        assert any("..." in c for c in cells)  # long names are still shortened
        assert all(len(c) <= 36 for c in cells)
    assert "/stages/stages.0/bn1...Normalization" in _cells_of(table, "BN")


def test_plan_table_names_apart_on_thousands_of_rows():
    """1500 names whose differences (layers.I, block.J, normK) spread over more than the 36-character
    cap: no single cut keeps them apart there, so the column widens until one does."""
    names = [f"/model/encoder/layers.{i}/block.{j}/norm{k}/BatchNormalization"
             for i in range(20) for j in range(25) for k in range(3)]
    assert len(set(elide_apart(names, 36).values())) < len(names)
    rows = [Row(n, Mode.TRAINING, "conv", "Conv", FoldDecision(n, Action.FOLDED, target="conv")) for n in names]
    cells = _cells_of(plan_table(rows), "BN")
    assert len(set(cells)) == len(names) and all("..." in c for c in cells)
    assert max(len(c) for c in cells) < max(len(n) for n in names)
    assert elide_apart(["short", "x" * 50], 36)["short"] == "short"
