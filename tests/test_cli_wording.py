"""cli/wording.py: the library's messages name its parameters; the CLI shows them in flag words,
exactly as before the wording moved (byte for byte), and rewrites nothing but the exact phrases."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from bnfold.cli import main as cli_main
from bnfold.cli.wording import _PATTERNS, _PHRASES, flag_words, worded_report, worded_result
from cli_run import run_cli
from conftest import bn, bn_params, init, make_model, vi
from onnx import helper

from bnfold.data.sources import open_data
from bnfold.errors import BadInputError, ProviderUnavailable
from bnfold.formulas.stats import batch_moments, finalize, update
from bnfold.onnx.runtime import input_specs
from bnfold.records import BnStats
from bnfold.run_records import ProviderRun, Report, VerifyResult
from bnfold.verification.feeds import fold_feeds, random_feeds
from bnfold.verification.tolerances import check_tolerance_names


def _message(fn: Any) -> str:
    with pytest.raises(BadInputError) as exc:
        fn()
    return str(exc.value)


def _dynamic_model() -> Any:
    return make_model([helper.make_node("Identity", ["data"], ["y"])], [vi("data", ["n", "c"])], [vi("y", ["n", "c"])])


def test_library_errors_name_parameters_and_the_cli_shows_the_flags(tmp_path: Path) -> None:
    specs = input_specs(_dynamic_model())
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    stats = BnStats(channels=2)
    update(stats, *batch_moments(np.ones((1, 2), np.float64)))
    cases = [  # (library message, the CLI's words, exactly as bnfold printed them before)
        (_message(lambda: random_feeds(specs, seed=0, val_range=(2.0, 1.0), iterations=1, batch_size=1)),
         "val_range=(2.0, 1.0)", "--val-range 2.0,1.0: LO must not exceed HI; give LO,HI with LO <= HI"),
        (_message(lambda: random_feeds(specs, seed=0, val_range=(0.0, 1.0), iterations=1, batch_size=1)),
         "pass the data argument instead",
         "input 'data' has dynamic dimensions (?, ?); random inputs need static shapes: pass --data instead"),
        (_message(lambda: open_data(tmp_path / "x.npy", specs, 0)), "batch_size=N",
         "batch size must be at least 1, got 0; use --batch-size N with N >= 1"),
        (_message(lambda: check_tolerance_names(["y"], (None, {"logits": 1e-3}), None)), "atol names",
         "--atol names output(s) 'logits' that the model does not have; its outputs are 'y'"),
        (_message(lambda: check_tolerance_names(["y"], None, (None, {"data": 1e-3}))), "rtol names",
         "--rtol names output(s) 'data' that the model does not have; its outputs are 'y'"),
        (_message(lambda: finalize(stats, "unbiased", "bn")), "batch_size of at least 2",
         "BN 'bn' has no unbiased variance estimate with one value per channel per batch (1 batch(es) of m=1); "
         "use --batch-size of at least 2"),
        (str(fold_feeds(None, _dynamic_model(), 2)), "pass the data argument to verify",
         "input 'data' has dynamic dimensions; pass --data to verify"),
    ]
    for library, parameter, cli in cases:
        assert parameter in library and "--" not in library, library
        assert flag_words(library) == cli


@pytest.mark.parametrize(("library", "cli"), [
    ("model input 'x' has a fixed batch size of 16; use batch_size=16 or export the model with a dynamic batch axis",
     "model input 'x' has a fixed batch size of 16; use --batch-size 16 or export the model with a dynamic batch axis"),
    ("BN 'bn' is in training mode (batch statistics); pass calibration data (the data argument) so bnfold can compute "
     "its population statistics",
     "BN 'bn' is in training mode (batch statistics); pass calibration data with --data so bnfold can compute its "
     "population statistics"),
    ("install onnxruntime-gpu (and uninstall onnxruntime) or use providers=('cpu',) (or allow_missing_providers=True)",
     "install onnxruntime-gpu (and uninstall onnxruntime) or use --providers cpu (or --allow-missing-providers)"),
    ("'m.pt' is a whole pickled module: loading it runs arbitrary code from the file, so bnfold refuses it; pass "
     "unsafe_pickle=True only if you trust the file, or save model.state_dict() and use "
     "load_factory('MODULE:CALLABLE', weights=FILE)",
     "'m.pt' is a whole pickled module: loading it runs arbitrary code from the file, so bnfold refuses it; pass "
     "--unsafe-pickle only if you trust the file, or save model.state_dict() and use --model-factory MODULE:CALLABLE "
     "--weights FILE"),
    ("unsafe_pickle=True: unpickling 'm.pt' runs arbitrary code from the file; use it only on files you trust",
     "--unsafe-pickle: unpickling 'm.pt' runs arbitrary code from the file; use it only on files you trust"),
    ("'sd.pt' holds a state_dict (weights only), not a model: build the model with "
     "load_factory('MODULE:CALLABLE', weights=FILE) and pass this file as FILE: sd.pt",
     "'sd.pt' holds a state_dict (weights only), not a model: build the model with --model-factory MODULE:CALLABLE "
     "and pass this file as --weights sd.pt"),
    ("verify against the frozen model (fold(..., frozen_output='FROZEN.onnx'))",
     "verify against the frozen model (bnfold fold --frozen-output FROZEN.onnx)"),
])
def test_library_phrases_become_the_cli_s(library: str, cli: str) -> None:
    assert flag_words(library) == cli


@pytest.mark.parametrize("text", [
    "input 'data' has dtype object and batch_size 4; data, providers, atol, rtol, val_range, unsafe_pickle",
    "model file not found: /tmp/data/batch_size=16/allow_missing_providers/m.onnx",
    "output 'xatol names output(s) ' and 'my_val_range=(1, 2)' are names, not phrases",
    "use batch_size=16 with care",  # not the fixed-batch message
])
def test_only_exact_phrases_are_rewritten(text: str) -> None:
    assert flag_words(text) == text


def test_the_cli_s_words_are_never_rewritten_again() -> None:
    for _, cli in _PHRASES:
        assert flag_words(cli) == cli
    for library, cli in _PHRASES:
        assert flag_words(flag_words(library)) == cli
    assert len(_PATTERNS) == 4


def test_report_warnings_and_verification_notes_are_worded() -> None:
    run = ProviderRun("cuda", "skipped", (), True,
                      note="CUDA execution provider requested but not available: use providers=('cpu',) "
                           "(or allow_missing_providers=True)")
    result = VerifyResult(passed=True, samples=1, runs=(run,),
                          note="verify against the frozen model (fold(..., frozen_output='FROZEN.onnx'))")
    report = Report(input_path="m.onnx", output_path=None, input_sha256=None, output_sha256=None,
                    estimator="unbiased", batch_size=None, calibrated=False, bns=[], verification=result,
                    warnings=["verification skipped: input 'data' has dynamic dimensions; pass the data argument "
                              "to verify"])
    worded = worded_report(report)
    assert worded.warnings == ["verification skipped: input 'data' has dynamic dimensions; pass --data to verify"]
    assert worded.verification.runs[0].note.endswith("use --providers cpu (or --allow-missing-providers)")
    assert worded.verification.note == "verify against the frozen model (bnfold fold --frozen-output FROZEN.onnx)"
    assert worded_result(None) is None


def test_exit_code_for_prints_library_errors_in_flag_words(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_main.RUN_FLAGS, "debug", False)
    rc = cli_main.exit_code_for(ProviderUnavailable("no CUDA; use providers=('cpu',) (or allow_missing_providers=True)"))
    assert rc == 4
    assert capsys.readouterr().err == "bnfold: error: no CUDA; use --providers cpu (or --allow-missing-providers)\n"
    rc = cli_main.exit_code_for(BadInputError("input 'data': pass the data argument instead"))
    assert rc == 3 and capsys.readouterr().err == "bnfold: error: input 'data': pass --data instead\n"


def _conv_bn(path: Path, shape: list[Any]) -> Path:
    """Conv -> inference BN with input ``x`` of ``shape`` (4 channels out)."""
    rng = np.random.default_rng(0)
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    w = init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    out = [s if i != 1 else 4 for i, s in enumerate(shape)]
    model = make_model([conv, node], [vi("x", shape)], [vi("y", out)], [w, *inits])
    path.write_bytes(model.SerializeToString())
    return path


def test_fold_input_shape_messages_are_in_flag_words_everywhere(tmp_path: Path) -> None:
    """A model with dynamic H and W is verified at a probe size now (it was written unverified with
    the warning 'verification skipped: ... pass --data to verify'); where no shape works, the error
    names --input-shape, never the library's input_shapes."""
    model = _conv_bn(tmp_path / "m.onnx", ["n", 3, "h", "w"])
    report = tmp_path / "r.json"
    proc = run_cli("fold", model, "-o", tmp_path / "out.onnx", "--report", report)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(report.read_text(encoding="utf-8"))["warnings"] == []
    assert "Verified at x: 1x3x224x224 (probe)" in proc.stdout
    assert "data argument" not in proc.stdout + proc.stderr + report.read_text(encoding="utf-8")

    rng = np.random.default_rng(0)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    w = init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    reshape = helper.make_node("Reshape", ["b", "s"], ["y"])  # 7 is no multiple of 4 channels: no size fits
    never = make_model([conv, node, reshape], [vi("x", ["n", 3, "h", "w"])], [vi("y", [1, 7])],
                       [w, *inits, init("s", np.array([1, 7], np.int64))], check=False)
    (tmp_path / "never.onnx").write_bytes(never.SerializeToString())
    proc = run_cli("fold", tmp_path / "never.onnx", "-o", tmp_path / "never_out.onnx")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "pass --input-shape x:1x3xHxW" in proc.stderr and "input_shapes" not in proc.stderr
    assert not (tmp_path / "never_out.onnx").exists()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="onnxruntime has the CUDA execution provider here")
def test_verify_skipped_provider_note_is_in_flag_words_in_every_report(tmp_path: Path) -> None:
    model = _conv_bn(tmp_path / "m.onnx", [1, 3, 5, 5])
    files = {"json": tmp_path / "r.json", "md": tmp_path / "s.md", "xml": tmp_path / "j.xml", "html": tmp_path / "r.html"}
    proc = run_cli("verify", model, model, "--providers", "cpu,cuda", "--allow-missing-providers",
                   "--report", files["json"], "--summary-md", files["md"], "--junit-xml", files["xml"],
                   "--html", files["html"])
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    note = json.loads(files["json"].read_text(encoding="utf-8"))["verification"]["runs"][1]["note"]
    assert note.endswith("or use --providers cpu (or --allow-missing-providers)"), note
    for kind, path in files.items():
        text = path.read_text(encoding="utf-8")
        assert "--providers cpu" in text and "providers=(" not in text and "=True" not in text, kind
