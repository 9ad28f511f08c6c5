"""bnfold.report: the JSON report (schema, numbers, atomic write), the summary and the plan table."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import bnfold
from bnfold.records import (
    Action,
    BnRecord,
    FoldDecision,
    FrozenStats,
    Mode,
    OutputError,
    Reason,
    Report,
    VerifyResult,
)
from bnfold.report.json_report import SCHEMA_VERSION, report_to_dict, to_json, write_json
from bnfold.report.summary import ellipsize, plan_table, summary_text

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "report-schema.json"
SHA_IN = "a" * 64
SHA_OUT = "0123456789abcdef" * 4


@pytest.fixture(scope="module")
def schema():
    s = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def _validate(doc, schema):
    jsonschema.Draft202012Validator(schema).validate(doc)


def make_stats(gap: float, samples: int = 96) -> FrozenStats:
    return FrozenStats(
        mean=np.array([-0.5, 0.25, 1.5]),
        var=np.array([0.5, 2.0, 4.0]),
        var_unbiased=np.array([0.5, 2.0, 4.0]),
        var_pooled=np.array([0.75, 2.5, 4.5]),
        gap=gap,
        samples=samples,
        batches=np.int64(3),  # numpy ints must come out as JSON ints
    )


def make_report(**overrides) -> Report:
    bns = [
        BnRecord(
            name="layer1.0.bn1",
            mode_before=Mode.TRAINING,
            action=Action.FOLDED,
            target="layer1.0.conv1",
            direction="backward",
            channels=3,
            stats=make_stats(0.125),
        ),
        BnRecord(
            name="layer1.0.bn2",
            mode_before=Mode.DECOMPOSED,
            action=Action.FOLDED,
            target="layer1.0.conv2",
            direction="backward",
            reason=Reason.SHARED_WEIGHT_CLONED,
            detail="weight shared with layer2.0.conv2; folded into a copy",
            channels=3,
            stats=make_stats(0.5),
        ),
        BnRecord(
            name="head.bn",
            mode_before=Mode.INFERENCE,
            action=Action.FROZEN_KEPT,
            reason=Reason.PRODUCER_FANOUT,
            detail="head.conv output also feeds aux.conv",
            channels=np.int64(3),
            stats=None,
        ),
    ]
    verification = VerifyResult(
        passed=True,
        provider="cpu",
        samples=8,
        outputs=(
            OutputError("logits", "float32", 2.5e-6, 1.5e-5, 1e-4, 1e-4, True),
            OutputError("features", "float32", np.float32(1e-6), 3e-6, 1e-4, 1e-4, np.bool_(True)),
        ),
        note="batch size 1",
    )
    fields = dict(
        input_path="in/model.onnx",
        output_path=Path("out/model.folded.onnx"),
        input_sha256=SHA_IN,
        output_sha256=SHA_OUT,
        estimator="unbiased",
        batch_size=32,
        calibrated=True,
        bns=bns,
        verification=verification,
        warnings=["opset 9 model: upgraded to 15"],
        dry_run=False,
        extra={"timing_s": {"fold": np.float64(0.25)}, "shape": (1, 3), "mode": Mode.TRAINING,
               "arr": np.arange(3)},
    )
    fields.update(overrides)
    return Report(**fields)


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def test_report_validates_and_round_trips(schema):
    doc = report_to_dict(make_report())
    _validate(doc, schema)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc


def test_report_numbers(schema):
    doc = report_to_dict(make_report())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["tool"] == {"name": "bnfold", "version": bnfold.__version__}
    assert set(doc["versions"]) == {"onnx", "onnxruntime", "numpy", "python"}
    assert doc["versions"]["numpy"] == np.__version__
    assert doc["input"] == {"path": "in/model.onnx", "sha256": SHA_IN}
    assert doc["output"] == {"path": str(Path("out/model.folded.onnx")), "sha256": SHA_OUT}
    assert doc["counts"] == {"bn": 3, "folded": 2, "frozen_kept": 1}
    assert (doc["estimator"], doc["batch_size"], doc["calibrated"], doc["dry_run"]) == (
        "unbiased", 32, True, False,
    )
    bn0, bn1, bn2 = doc["bns"]
    assert bn0["mode_before"] == "training" and bn0["action"] == "folded" and bn0["reason"] is None
    assert bn1["mode_before"] == "training-decomposed" and bn1["reason"] == "SHARED_WEIGHT_CLONED"
    assert bn2["action"] == "frozen-kept" and bn2["reason"] == "PRODUCER_FANOUT"
    assert bn2["stats"] is None and bn2["channels"] == 3 and type(bn2["channels"]) is int
    s = bn0["stats"]
    assert s == {
        "samples": 96, "batches": 3, "estimator_gap": 0.125,
        "mean_min": -0.5, "mean_max": 1.5,
        "var_min": 0.5, "var_max": 4.0,
        "var_unbiased_min": 0.5, "var_unbiased_max": 4.0,
        "var_pooled_min": 0.75, "var_pooled_max": 4.5,
    }
    assert type(s["batches"]) is int
    v = doc["verification"]
    assert v["passed"] is True and v["provider"] == "cpu" and v["samples"] == 8
    assert v["max_abs"] == 2.5e-6 and v["max_rel"] == 1.5e-5
    assert v["rule"].startswith("|folded - frozen|")
    assert [o["name"] for o in v["outputs"]] == ["logits", "features"]
    assert v["outputs"][1]["passed"] is True
    assert v["outputs"][1]["max_abs"] == pytest.approx(1e-6)
    assert doc["warnings"] == ["opset 9 model: upgraded to 15"]
    assert doc["extra"] == {"timing_s": {"fold": 0.25}, "shape": [1, 3], "mode": "training", "arr": [0, 1, 2]}


def test_report_minimal_and_non_finite(schema):
    failed = VerifyResult(
        passed=False, provider="cuda", samples=1,
        outputs=(OutputError("y", "float32", float("inf"), float("nan"), 1e-4, 1e-4, False),),
    )
    report = make_report(
        output_path=None, output_sha256=None, batch_size=None, calibrated=False, dry_run=True,
        bns=[], verification=failed, warnings=[], extra={},
    )
    doc = report_to_dict(report)
    _validate(doc, schema)
    assert doc["verification"]["max_abs"] == "inf"
    assert doc["verification"]["outputs"][0]["max_rel"] == "nan"
    assert doc["counts"] == {"bn": 0, "folded": 0, "frozen_kept": 0}
    json.loads(to_json(report))  # strict JSON
    doc = report_to_dict(make_report(verification=None))
    _validate(doc, schema)
    assert doc["verification"] is None


def test_schema_catches_drift(schema):
    doc = report_to_dict(make_report())
    doc["unexpected"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = report_to_dict(make_report())
    del doc["counts"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)


def test_schema_enums_match_records(schema):
    bn = schema["$defs"]["bn"]["properties"]
    assert set(bn["reason"]["enum"]) - {None} == {r.value for r in Reason}
    assert set(bn["mode_before"]["enum"]) == {m.value for m in Mode}
    assert set(bn["action"]["enum"]) == {a.value for a in Action}
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_write_json_atomic(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")
    write_json(make_report(), path)
    assert json.loads(path.read_text(encoding="utf-8"))["counts"]["bn"] == 3
    assert sorted(os.listdir(tmp_path)) == ["report.json"]
    write_json(make_report(bns=[]), str(path))  # overwrite; str path
    assert json.loads(path.read_text(encoding="utf-8"))["counts"]["bn"] == 0
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_write_json_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "report.json"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(make_report(), path)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# summary and plan table
# ---------------------------------------------------------------------------------------------


def test_summary_text():
    text = summary_text(make_report())
    lines = text.splitlines()
    assert lines[0] == "BN found 3: folded 2, frozen and kept 1 (PRODUCER_FANOUT: 1)"
    assert "SHARED_WEIGHT_CLONED: 1" in text
    assert "unbiased" in text and "0.5 at layer1.0.bn2" in text  # largest gap and its layer
    assert "max abs 2.5e-06" in text and "max rel 1.5e-05" in text and "PASSED" in text
    assert "opset 9 model: upgraded to 15" in text
    assert "\x1b" not in text and text.isascii()
    assert len(lines) <= 10


def test_summary_text_failed_and_uncalibrated():
    failed = VerifyResult(
        passed=False, provider="cpu", samples=2,
        outputs=(OutputError("y", "float32", 0.3, 0.1, 1e-4, 1e-4, False),),
    )
    text = summary_text(make_report(verification=failed, calibrated=False, dry_run=True))
    assert "FAILED" in text and "y" in text
    assert "not calibrated" in text and "Dry run" in text
    assert "Verification: not run" in summary_text(make_report(verification=None))


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
