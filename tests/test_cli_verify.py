"""End-to-end tests of ``bnfold verify`` (and ``bnfold fold --frozen-output``) on the command line.

The reference is an inference-mode Conv -> BN -> Relu chain (3 blocks, IR 10, opset 17) built with
onnx.helper; ``bnfold fold --frozen-output`` writes the folded candidate and the frozen reference.
A second candidate has one weight of the middle Conv perturbed, so the first divergent fold site is
the middle BN. Commands run in this process (``cli_run.run_cli``: ``bnfold.cli.main.main(argv)``
with stdout and stderr captured apart, ``$GITHUB_STEP_SUMMARY`` removed unless a test sets it);
the exit statuses 2 (usage) and 4 (missing provider) are also proven on a real process
(``python -m bnfold.cli.main``, ``run_process``).
"""
from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_run import run_cli, run_process
from conftest import bn, bn_params, init, make_model, ort_run, vi
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "report-schema.json"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
C = 4  # channels


# --------------------------------------------------------------------------- helpers


def error_lines(stderr: str) -> list[str]:
    """stderr lines other than bnfold's own warnings."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("bnfold: warning:")]


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bnfold: error: "), proc.stderr
    return lines[0]


def validate(doc: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text(encoding="utf-8")))


def chain_model(rng: np.random.Generator, blocks: int = 3) -> onnx.ModelProto:
    """x -> [Conv(3x3, pads 1) -> BN (inference) -> Relu] * blocks -> y."""
    nodes, inits = [], []
    cur = "x"
    for k in range(blocks):
        inits.append(init(f"w{k}", (rng.standard_normal((C, C, 3, 3)) * 0.3).astype(np.float32)))
        nodes.append(helper.make_node("Conv", [cur, f"w{k}"], [f"z{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        node, params = bn(f"bn{k}", f"z{k}", f"b{k}", bn_params(rng, C))
        nodes.append(node)
        inits += params
        out = "y" if k == blocks - 1 else f"r{k}"
        nodes.append(helper.make_node("Relu", [f"b{k}"], [out], name=f"relu{k}"))
        cur = out
    return make_model(nodes, [vi("x", ["N", C, 6, 6])], [vi("y", ["N", C, 6, 6])], inits)


def perturb(src: Path, dst: Path, node_name: str, delta: float) -> None:
    """Copy ``src`` to ``dst`` with the first element of ``node_name``'s weight moved by ``delta``."""
    model = onnx.load(src)
    weight = next(n for n in model.graph.node if n.name == node_name).input[1]
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    w = numpy_helper.to_array(tensor).copy()
    w.flat[0] += delta
    tensor.CopyFrom(numpy_helper.from_array(w, weight))
    onnx.save(model, dst)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """reference (as built), frozen and folded (written by one ``bnfold fold``), bad (perturbed)."""
    root = tmp_path_factory.mktemp("verify_models")
    paths = {name: root / f"{name}.onnx" for name in ("reference", "frozen", "folded", "bad")}
    onnx.save(chain_model(np.random.default_rng(1234)), paths["reference"])
    proc = run_cli("fold", paths["reference"], "-o", paths["folded"], "--frozen-output", paths["frozen"])
    assert proc.returncode == 0, proc.stderr
    assert "folded 3" in proc.stdout
    perturb(paths["folded"], paths["bad"], "conv1", 0.5)
    return paths


@pytest.fixture(scope="module")
def failing(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """One ``bnfold verify`` of the perturbed candidate with every report and a repro bundle."""
    out = tmp_path_factory.mktemp("verify_failing")
    files = {
        "report": out / "report.json", "junit": out / "junit.xml", "md": out / "summary.md",
        "html": out / "page.html", "repro": out / "repro",
    }
    proc = run_cli("verify", models["frozen"], models["bad"], "--report", files["report"],
                   "--junit-xml", files["junit"], "--summary-md", files["md"], "--html", files["html"],
                   "--repro-dir", files["repro"])
    return proc, files


# --------------------------------------------------------------------------- fold --frozen-output


def test_fold_frozen_output_computes_the_reference_function(models: dict[str, Path]) -> None:
    frozen, folded = onnx.load(models["frozen"]), onnx.load(models["folded"])
    assert [n.op_type for n in frozen.graph.node].count("BatchNormalization") == 3
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    feeds = {"x": np.random.default_rng(7).standard_normal((2, C, 6, 6)).astype(np.float32)}
    [ref] = ort_run(models["reference"], feeds)
    [frz] = ort_run(models["frozen"], feeds)
    [fld] = ort_run(models["folded"], feeds)
    # inference-mode BNs keep their statistics: the frozen model is the reference's graph
    np.testing.assert_allclose(frz, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fld, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- verdicts


def test_verify_exact_pair_passes(models: dict[str, Path], tmp_path: Path) -> None:
    md = tmp_path / "summary.md"
    proc = run_cli("verify", models["frozen"], models["folded"], "--summary-md", md)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "PASSED" in proc.stdout
    assert "FAILED" not in proc.stdout
    assert error_lines(proc.stderr) == []
    text = md.read_text(encoding="utf-8")
    assert "✅" in text and "❌" not in text


def test_perturbed_candidate_exits_1_with_one_error_line(failing) -> None:
    proc, _ = failing
    line = assert_one_line_error(proc, 1)
    assert "bn1" in line  # the first divergent fold site is named
    assert "FAILED" in proc.stdout


def test_failing_json_report_names_the_first_divergent_site(failing, models: dict[str, Path]) -> None:
    _, files = failing
    doc = json.loads(files["report"].read_text(encoding="utf-8"))
    validate(doc)
    assert doc["schema_version"] == "2.2" and doc["kind"] == "verify"
    assert doc["reference"]["path"] == str(models["frozen"])
    assert doc["candidate"]["path"] == str(models["bad"])
    v = doc["verification"]
    assert v["passed"] is False and v["verdict"] == "fail"
    assert v["first_divergent_site"] == "bn1"  # not bn0 (upstream, exact), not bn2 (downstream)
    sites = {s["bn"]: s for s in v["sites"]}
    assert sites["bn0"]["passed"] is True and sites["bn1"]["passed"] is False
    assert sites["bn1"]["worst_channels"][0]["channel"] == 0  # w.flat[0] feeds output channel 0
    [run] = v["runs"]
    assert run["provider"] == "cpu" and run["status"] == "ran" and run["passed"] is False
    [out] = run["outputs"]
    assert out["name"] == "y" and out["passed"] is False and out["mismatches"] > 0
    assert v["settings"]["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert v["settings"]["tf32"] is False and v["settings"]["deterministic"] is True
    assert v["repro_dir"] == str(files["repro"])


def test_failing_junit_markdown_html(failing) -> None:
    _, files = failing
    root = ET.parse(files["junit"]).getroot()
    failures = root.findall(".//testcase/failure")
    assert failures, ET.tostring(root, encoding="unicode")
    assert any(case.get("name") == "y" and case.find("failure") is not None for case in root.iter("testcase"))
    assert "❌" in files["md"].read_text(encoding="utf-8")
    page = files["html"].read_text(encoding="utf-8")
    assert "<svg" in page


def test_failing_repro_bundle(failing, models: dict[str, Path]) -> None:
    _, files = failing
    pb = files["repro"] / "test_data_set_0" / "input_0.pb"
    tensor = onnx.TensorProto()
    tensor.ParseFromString(pb.read_bytes())
    assert tensor.name == "x" and numpy_helper.to_array(tensor).shape == (1, C, 6, 6)
    meta = json.loads((files["repro"] / "repro.json").read_text(encoding="utf-8"))
    assert meta["candidate"] == os.path.abspath(models["bad"])
    assert meta["command"].startswith("bnfold verify ")


# --------------------------------------------------------------------------- providers


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime has the CUDA execution provider here")
def test_missing_provider_exits_4(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = run_process("verify", models["frozen"], models["folded"], "--providers", "cpu,cuda", "--report", report)
    line = assert_one_line_error(proc, 4)
    assert "CUDA" in line
    assert not report.exists()


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime has the CUDA execution provider here")
def test_allow_missing_providers_records_the_skip(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    proc = run_cli("verify", models["frozen"], models["folded"], "--providers", "cpu,cuda",
                   "--allow-missing-providers", "--report", report)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    doc = json.loads(report.read_text(encoding="utf-8"))
    validate(doc)
    v = doc["verification"]
    assert v["passed"] is True
    runs = {r["provider"]: r for r in v["runs"]}
    assert [r["provider"] for r in v["runs"]] == ["cpu", "cuda"]
    assert runs["cpu"]["status"] == "ran" and runs["cpu"]["passed"] is True
    assert runs["cuda"]["status"] == "skipped" and runs["cuda"]["outputs"] == []
    assert "CUDA" in runs["cuda"]["note"]
    assert v["settings"]["allow_missing_providers"] is True


# --------------------------------------------------------------------------- usage and input errors


@pytest.mark.parametrize(
    "extra",
    [
        ["--atol", "foo:bar:"],
        ["--providers", "tpu"],
        ["--val-range", "2,1"],
        ["--check-error-stat", "p95"],
    ],
    ids=["bad-atol", "bad-provider", "bad-val-range", "bad-error-stat"],
)
def test_bad_usage_exits_2(models: dict[str, Path], extra: list[str]) -> None:
    proc = run_cli("verify", models["frozen"], models["folded"], *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_candidate_argument_exits_2(models: dict[str, Path]) -> None:
    proc = run_process("verify", models["frozen"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "CANDIDATE" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("which", ["reference", "candidate"])
def test_missing_model_file_exits_3(models: dict[str, Path], tmp_path: Path, which: str) -> None:
    missing = tmp_path / "nope.onnx"
    args = [missing, models["folded"]] if which == "reference" else [models["frozen"], missing]
    line = assert_one_line_error(run_cli("verify", *args), 3)
    assert "model file not found" in line and "nope.onnx" in line


# --------------------------------------------------------------------------- GitHub job summary


def test_github_step_summary_gets_the_markdown(models: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "step_summary.md"
    target.write_text("earlier step\n", encoding="utf-8")
    proc = run_cli("verify", models["frozen"], models["folded"], env={"GITHUB_STEP_SUMMARY": str(target)})
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    text = target.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n")  # appended, not overwritten
    assert "bnfold verification" in text and "✅" in text


def test_training_mode_reference_explains_the_mismatch(tmp_path: Path) -> None:
    """A training-mode BN normalises with each batch's statistics: verifying a fold against the
    training-mode input fails, and the error says why and which file to verify against instead;
    the frozen model written by ``--frozen-output`` passes."""
    rng = np.random.default_rng(7)
    p = bn_params(rng, C)
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    node = helper.make_node("BatchNormalization", ["z", *names], ["y", "bn.rm", "bn.rv"], name="bn", epsilon=1e-5,
                            training_mode=1)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1]), node],
        [vi("x", ["N", C, 6, 6])], [vi("y", ["N", C, 6, 6])],
        [init("w", (rng.standard_normal((C, C, 3, 3)) * 0.3).astype(np.float32))]
        + [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))])
    src, out, frozen, data = (tmp_path / f for f in ("train.onnx", "folded.onnx", "frozen.onnx", "x.npy"))
    onnx.save(model, src)
    np.save(data, (rng.standard_normal((16, C, 6, 6)) * 2 + 1).astype(np.float32))
    proc = run_cli("fold", src, "--data", data, "--batch-size", 8, "-o", out, "--frozen-output", frozen)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("verify", src, out, "--data", data, "--batch-size", 4, "--no-repro")
    line = assert_one_line_error(proc, 1)
    assert "1 BN in training mode ('bn')" in line and "--frozen-output" in line
    proc = run_cli("verify", frozen, out, "--data", data, "--batch-size", 4)
    assert proc.returncode == 0, proc.stderr
    assert "training mode" not in proc.stdout + proc.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA can run here")
def test_every_provider_skipped_is_exit_1_in_verify_and_fold(models: dict[str, Path], tmp_path: Path) -> None:
    """--allow-missing-providers with no provider that can run: nothing was compared, which is no
    pass (exit 1, README), said as such; fold and verify agree (before: verify exit 4, fold exit 1
    with 'max abs diff 0')."""
    report = tmp_path / "r.json"
    proc = run_cli("verify", models["frozen"], models["folded"], "--providers", "cuda", "--allow-missing-providers",
                   "--report", report)
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "no requested execution provider could run (all skipped under --allow-missing-providers)" in line
    assert json.loads(report.read_text())["verification"]["runs"][0]["status"] == "skipped"
    out = tmp_path / "f.onnx"
    proc = run_cli("fold", models["reference"], "-o", out, "--providers", "cuda", "--allow-missing-providers",
                   "--no-repro")
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "the folded model was not verified: no requested execution provider could run" in line, line
    assert "max abs diff" not in line and not out.exists()


# --------------------------------------------------------------------------- issue 15 point 5


def fixed_batch(src: Path, dst: Path, batch: int) -> None:
    """Copy ``src`` to ``dst`` with the batch axis of every input and output fixed to ``batch``."""
    model = onnx.load(src)
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    onnx.save(model, dst)


def test_candidate_that_cannot_run_is_said_on_stderr(models: dict[str, Path], tmp_path: Path) -> None:
    """A candidate with a fixed batch of 8 against batch-1 inputs: the run used to say "max abs diff 0"
    on stderr, with onnxruntime's reason cut to its first line and on stdout only."""
    cand = tmp_path / "batch8.onnx"
    fixed_batch(models["folded"], cand, 8)
    proc = run_cli("verify", models["frozen"], cand, "--no-repro")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    (line,) = error_lines(proc.stderr)
    assert line.startswith("bnfold: error: the candidate failed to run on cpu (verification batch 0): ")
    assert "max abs diff" not in line
    # onnxruntime's whole reason, its later lines included, on that one line
    assert "invalid dimensions for input: x" in line and "Got: 1 Expected: 8" in line
    assert "max abs 0" not in proc.stdout and "candidate failed to run" in proc.stdout


def test_fold_says_it_wrote_the_frozen_model(models: dict[str, Path], tmp_path: Path) -> None:
    out, frozen = tmp_path / "f.onnx", tmp_path / "fr.onnx"
    proc = run_cli("fold", models["reference"], "-o", out, "--frozen-output", frozen)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"Wrote {out}" in lines and f"Wrote frozen model {frozen}" in lines
    assert frozen.is_file()
