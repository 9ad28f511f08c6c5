"""bnfold.report.json_report: the JSON report (both kinds: schema, numbers, environment, atomic write).
The records are built by hand in report_builders.py."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from report_builders import (
    CAND,
    REF,
    SHA_IN,
    SHA_OUT,
    make_failing_result,
    make_metrics,
    make_passing_result,
    make_report,
)

import bnfold
from bnfold.environment import collect_environment
from bnfold.records import Action, Mode, Reason
from bnfold.report.facts import INPUTS_KEYS, SETTINGS_KEYS
from bnfold.report.json_report import (
    SCHEMA_VERSION,
    report_to_dict,
    to_json,
    verify_report_to_dict,
    verify_to_json,
    write_json,
    write_verify_json,
)
from bnfold.run_records import OutputMetrics, ProviderRun, SiteResult, VerifyResult
from bnfold.verification.metrics import ERROR_STATS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "report-schema.json"


@pytest.fixture(scope="module")
def schema():
    s = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def _validate(doc, schema):
    jsonschema.Draft202012Validator(schema).validate(doc)


# ---------------------------------------------------------------------------------------------
# JSON: fold kind
# ---------------------------------------------------------------------------------------------


def test_report_validates_and_round_trips(schema):
    doc = report_to_dict(make_report())
    _validate(doc, schema)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc
    assert json.loads(to_json(make_report())) == doc


def test_report_numbers(schema):
    doc = report_to_dict(make_report())
    assert doc["schema_version"] == SCHEMA_VERSION == "2.2"
    assert doc["kind"] == "fold"
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
        "sufficiency": None,  # schema 2.2: FrozenStats made without a sufficiency (not computed)
    }
    assert type(s["batches"]) is int
    v = doc["verification"]
    result = make_report().verification
    assert v["verdict"] == "pass" and v["passed"] is True and v["samples"] == 8
    assert v["rule"] == result.rule and v["note"] == "batch size 1"
    assert v["max_abs"] == result.max_abs and v["max_rel"] == result.max_rel
    (run,) = v["runs"]
    assert run["provider"] == "cpu" and run["status"] == "ran" and run["passed"] is True
    assert run["used"] == ["CPUExecutionProvider"] and run["noise_floor"] == {}
    assert [o["name"] for o in run["outputs"]] == ["logits", "features"]
    assert run["outputs"][0] == result.runs[0].outputs[0].to_dict()
    assert run["outputs"][1]["shape"] == [4, 3, 2, 2]
    assert run["outputs"][0]["max_abs"] == pytest.approx(2.5e-6, rel=0.1)
    assert [s["bn"] for s in v["sites"]] == ["layer1.0.bn1", "layer1.0.bn2"]
    assert v["sites"][1] == {
        "bn": "layer1.0.bn2", "tensor": "layer1.0.bn2_out", "target": "layer1.0.bn2_conv",
        "direction": "backward", "position": 5, "max_abs": 0.0, "max_rel": 0.0, "atol": 1e-4,
        "rtol": 1e-4, "passed": True, "worst_channels": [], "floor_max": None,
    }
    assert v["first_divergent_site"] is None and v["repro_dir"] is None
    assert v["settings"]["tf32"] is False and v["settings"]["graph_optimization_level"] == "disabled"
    assert v["inputs"]["val_range"] == [-1.0, 1.0] and v["inputs"]["sha256"] == {"input": "c" * 64}
    assert doc["warnings"] == ["opset 9 model: upgraded to 15"]
    assert doc["extra"] == {"timing_s": {"fold": 0.25}, "shape": [1, 3], "mode": "training", "arr": [0, 1, 2]}


def test_report_minimal_and_non_finite(schema):
    bad = make_metrics("y", 0.0)
    bad = dataclasses.replace(bad, passed=False, max_abs=float("inf"), max_rel=float("nan"),
                              min_atol=float("inf"), snr_db=float("-inf"), cosine=None, top1=None)
    failed = VerifyResult(passed=False, samples=1,
                          runs=(ProviderRun("cuda", "ran", ("CUDAExecutionProvider",), False, (bad,)),))
    report = make_report(
        output_path=None, output_sha256=None, batch_size=None, calibrated=False, dry_run=True,
        bns=[], verification=failed, warnings=[], extra={},
    )
    doc = report_to_dict(report)
    _validate(doc, schema)
    v = doc["verification"]
    assert v["max_abs"] == "inf" and v["verdict"] == "fail"
    out = v["runs"][0]["outputs"][0]
    assert (out["max_rel"], out["min_atol"], out["snr_db"], out["cosine"]) == ("nan", "inf", "-inf", None)
    # no settings/inputs given: every documented key present, derived from the metrics when possible
    assert list(v["settings"]) == list(SETTINGS_KEYS)
    assert v["settings"]["error_stat"] == "max" and v["settings"]["tf32"] is None
    assert v["settings"]["tolerances"] == {"per_output": {"y": {"atol": 1e-4, "rtol": 1e-4}}}
    assert list(v["inputs"]) == list(INPUTS_KEYS) and v["inputs"]["sha256"] == {}
    assert v["sites"] == [] and v["first_divergent_site"] is None
    assert doc["counts"] == {"bn": 0, "folded": 0, "frozen_kept": 0}
    json.loads(to_json(report))  # strict JSON
    doc = report_to_dict(make_report(verification=None))
    _validate(doc, schema)
    assert doc["verification"] is None


def test_report_no_runs(schema):
    """A verification where nothing ran (every provider skipped) still renders and validates."""
    result = VerifyResult(passed=False, samples=0,
                          runs=(ProviderRun("cuda", "skipped", (), False, note="not available"),))
    doc = report_to_dict(make_report(verification=result))
    _validate(doc, schema)
    v = doc["verification"]
    assert v["max_abs"] == 0.0 and v["runs"][0]["status"] == "skipped"
    assert v["runs"][0]["outputs"] == [] and v["settings"]["error_stat"] is None


# ---------------------------------------------------------------------------------------------
# JSON: verify kind
# ---------------------------------------------------------------------------------------------


def test_verify_report_validates_and_round_trips(schema):
    result = make_failing_result()
    doc = verify_report_to_dict(result, reference=REF, candidate=CAND)
    _validate(doc, schema)
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert json.loads(verify_to_json(result, reference=REF, candidate=CAND)) == doc
    assert doc["kind"] == "verify" and doc["schema_version"] == SCHEMA_VERSION
    assert doc["reference"] == REF and doc["candidate"] == CAND
    assert set(doc) == {"schema_version", "kind", "tool", "reference", "candidate", "verification"}


def test_verify_report_content(schema):
    result = make_failing_result()
    v = verify_report_to_dict(result, reference=REF, candidate=CAND)["verification"]
    assert v["verdict"] == "fail" and v["passed"] is False and v["samples"] == 4
    assert [r["provider"] for r in v["runs"]] == ["cpu", "cuda", "rocm"]
    cpu, cuda, rocm = v["runs"]
    assert [o["passed"] for o in cpu["outputs"]] == [True, False]
    assert cpu["outputs"][1]["name"] == "probs<&>" and cpu["outputs"][1]["mismatches"] == 24
    assert cuda["used"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda["noise_floor"] == {"logits": 1.5e-6, "probs<&>": "inf"}
    assert cuda["note"] == "TF32 off"
    assert rocm["status"] == "skipped" and rocm["outputs"] == [] and rocm["used"] == []
    assert v["max_abs"] == pytest.approx(0.5)  # the worst over every provider that ran
    sites = {s["bn"]: s for s in v["sites"]}
    assert sites["layer1.bn<1>"]["worst_channels"] == [
        {"channel": 7, "max_abs": 0.125}, {"channel": 2, "max_abs": 0.01}]
    assert sites["layer2.bn"]["max_abs"] == "inf" and sites["layer3.bn"]["max_abs"] == "nan"
    assert sites["layer2.bn"]["passed"] is False and sites["head.bn"]["passed"] is True
    assert v["first_divergent_site"] == "layer1.bn<1>" and v["repro_dir"] == "/tmp/bnfold-repro"
    assert v["settings"]["tf32"] is True and v["settings"]["deterministic"] is True
    assert v["inputs"]["seed"] == 0 and v["inputs"]["source"] == "random"
    env = v["environment"]
    assert env["gpu"] == "NVIDIA H100 80GB HBM3" and env["driver"] == "550.54"  # record wins
    assert set(env["versions"]) >= {"bnfold", "onnx", "onnxruntime", "numpy", "torch", "python"}


def test_verify_report_normalises_verifier_spellings(schema):
    """The engine's own key spellings land on the documented keys; nothing is lost."""
    settings = {
        "graph_optimization_level": "ORT_DISABLE_ALL",
        "deterministic_compute": True,
        "tf32": False,
        "cuda": {"use_tf32": "0 unless --tf32", "cudnn_conv_algo_search": "DEFAULT"},
        "error_stat": "quantile",
        "quantile": 0.99,
        "atol": {"global": 1e-4, "per_output": {"logits": 1e-3}},
        "rtol": {"global": None, "per_output": {}},
        "providers_requested": ["cpu", "cuda"],
    }
    inputs = {"source": "data", "path": "calib.npz", "batch_size": 8, "iterations": 3,
              "sha256": {"x": "d" * 64}}
    result = dataclasses.replace(make_passing_result(), settings=settings, inputs=inputs,
                                 environment={"versions": {"onnxruntime-gpu": "1.20.0"}})
    v = verify_report_to_dict(result, reference=REF, candidate=CAND)
    _validate(v, schema)
    v = v["verification"]
    s = v["settings"]
    assert s["deterministic"] is True and "deterministic_compute" not in s
    assert s["cudnn_conv_algo_search"] == "DEFAULT" and s["cuda"]["use_tf32"] == "0 unless --tf32"
    assert s["tolerances"] == {"atol": {"global": 1e-4, "per_output": {"logits": 1e-3}},
                               "rtol": {"global": None, "per_output": {}}}
    assert "atol" not in s and s["providers_requested"] == ["cpu", "cuda"]
    assert (s["error_stat"], s["quantile"]) == ("quantile", 0.99)
    i = v["inputs"]
    assert i["data"] == "calib.npz" and "path" not in i and i["seed"] is None
    assert i["val_range"] is None and i["iterations"] == 3
    versions = v["environment"]["versions"]
    assert versions["onnxruntime-gpu"] == "1.20.0" and "torch" in versions


def test_verify_report_file_specs():
    result = make_passing_result()
    doc = verify_report_to_dict(result, reference={"path": Path("a.onnx"), "sha256": None},
                                candidate={"path": None, "sha256": None})
    assert doc["reference"] == {"path": "a.onnx", "sha256": None}
    with pytest.raises(ValueError, match="sha1"):
        verify_report_to_dict(result, reference={"path": "a", "sha1": "x"}, candidate=CAND)


def test_environment_versions_without_importing_torch():
    env = collect_environment()
    assert env["versions"]["bnfold"] == bnfold.__version__
    assert env["versions"]["numpy"] == np.__version__
    assert env["versions"]["python"].count(".") == 2
    assert set(env) == {"versions", "platform", "providers_available", "gpu"}
    # in a fresh interpreter: rendering a report imports none of torch, onnx, onnxruntime
    code = (
        "import sys\n"
        "from bnfold.environment import collect_environment\n"
        "from bnfold.report.json_report import verify_report_to_dict\n"
        "from bnfold.report import junit, markdown, html, summary\n"
        "env = collect_environment()\n"
        "assert env['providers_available'] is None and env['gpu'] is None, env\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # the record's values win key by key; versions merge
    env = collect_environment({"versions": {"torch": "9.9"}, "gpu": "X"})
    assert env["versions"]["torch"] == "9.9" and env["versions"]["numpy"] == np.__version__
    assert env["gpu"] == "X"


def test_environment_providers_when_onnxruntime_loaded():
    import onnxruntime

    env = collect_environment()
    assert env["providers_available"] == list(onnxruntime.get_available_providers())
    assert "CPUExecutionProvider" in env["providers_available"]


def test_schema_catches_drift(schema):
    doc = report_to_dict(make_report())
    doc["unexpected"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = report_to_dict(make_report())
    del doc["counts"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = verify_report_to_dict(make_failing_result(), reference=REF, candidate=CAND)
    doc["verification"]["runs"][0]["outputs"][0]["extra_metric"] = 1.0
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = verify_report_to_dict(make_failing_result(), reference=REF, candidate=CAND)
    doc["verification"]["sites"][0]["worst_channels"].append({"channel": 1, "max_abs": 1, "x": 2})
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = verify_report_to_dict(make_failing_result(), reference=REF, candidate=CAND)
    doc["verification"]["max_abs"] = float("inf")  # a bare number would not be strict JSON
    doc["verification"]["max_abs"] = "Infinity"
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    doc = verify_report_to_dict(make_passing_result(), reference=REF, candidate=CAND)
    doc["kind"] = "fold"  # a verify document does not pass as a fold report
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, schema)
    # settings / inputs / environment are open: extra keys are allowed there
    doc = verify_report_to_dict(make_passing_result(), reference=REF, candidate=CAND)
    doc["verification"]["settings"]["intra_op_threads"] = 1
    doc["verification"]["inputs"]["shapes"] = {"input": [1, 3]}
    doc["verification"]["environment"]["cuda"] = "12.4"
    _validate(doc, schema)


def test_schema_enums_match_records(schema):
    defs = schema["$defs"]
    bn = defs["bn"]["properties"]
    assert set(bn["reason"]["enum"]) - {None} == {r.value for r in Reason}
    assert set(bn["mode_before"]["enum"]) == {m.value for m in Mode}
    assert set(bn["action"]["enum"]) == {a.value for a in Action}
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    for kind in ("fold_report", "verify_report"):
        assert defs[kind]["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    # the records' fields and the schema's objects stay in step
    output = defs["output"]
    assert set(output["required"]) == set(output["properties"]) == {f.name for f in dataclasses.fields(OutputMetrics)}
    assert set(output["properties"]["error_stat"]["enum"]) == set(ERROR_STATS)
    site = defs["site"]
    assert set(site["required"]) == {f.name for f in dataclasses.fields(SiteResult)}
    run = defs["run"]
    assert set(run["required"]) == {f.name for f in dataclasses.fields(ProviderRun)}
    verification = defs["verification"]["required"]
    record = {f.name for f in dataclasses.fields(VerifyResult)}
    assert record <= set(verification)
    assert set(defs["settings"]["required"]) == set(SETTINGS_KEYS)
    assert set(defs["inputs"]["required"]) == set(INPUTS_KEYS)


def test_schema_doc_covers_every_field():
    """docs/report-schema.md names every property the schema defines."""
    doc = (SCHEMA_PATH.parent / "report-schema.md").read_text(encoding="utf-8")
    s = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    missing = set()

    def walk(node):
        if isinstance(node, dict):
            for name in node.get("properties", {}):
                if f"`{name}`" not in doc:
                    missing.add(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(s)
    assert not missing, sorted(missing)
    assert f'"{SCHEMA_VERSION}"' in doc


def test_write_json_atomic(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old", encoding="utf-8")
    write_json(make_report(), path)
    assert json.loads(path.read_text(encoding="utf-8"))["counts"]["bn"] == 3
    assert sorted(os.listdir(tmp_path)) == ["report.json"]
    write_json(make_report(bns=[]), str(path))  # overwrite; str path
    assert json.loads(path.read_text(encoding="utf-8"))["counts"]["bn"] == 0
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_write_verify_json(tmp_path, schema):
    path = tmp_path / "verify.json"
    write_verify_json(make_failing_result(), path, reference=REF, candidate=CAND)
    doc = json.loads(path.read_text(encoding="utf-8"))
    _validate(doc, schema)
    assert doc["kind"] == "verify" and doc["verification"]["verdict"] == "fail"
    assert sorted(os.listdir(tmp_path)) == ["verify.json"]


def test_write_json_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "report.json"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json(make_report(), path)
    with pytest.raises(OSError, match="disk full"):
        write_verify_json(make_passing_result(), path, reference=REF, candidate=CAND)
    assert os.listdir(tmp_path) == []
