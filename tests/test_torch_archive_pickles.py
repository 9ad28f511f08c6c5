"""No code runs from a PyTorch archive without ``--unsafe-pickle`` (issue 14, point 1).

Each hostile archive is a real ``torch.export.save`` file with one member rewritten to carry a
pickle whose ``__reduce__`` opens (creates) a marker file: the sample inputs, a weight marked
``use_pickle`` (torch reads those with ``weights_only=False``), an opaque object constant (plain
``pickle.loads``), and a file of the pre-2.7 layout. ``test_torch_itself_runs_the_payload`` proves
each is a real attack (plain ``torch.export.load`` creates the marker); every other test asserts
that bnfold never does: exit 3, one line naming the file and the member and the ``--unsafe-pickle``
hint, no "Logging error" traceback, nothing written. Honest archives keep folding, with their
example inputs. TorchScript: ``torch.jit.load`` reads ``data.pkl``/``constants.pkl`` with its own
C++ unpickler, which resolves no Python globals; the test proves a payload there does not run.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import child_env, run_cli  # noqa: E402
from torch import nn  # noqa: E402

from bnfold.errors import BadInputError, ProviderUnavailable  # noqa: E402
from bnfold.torch import archive as archive_mod  # noqa: E402
from bnfold.torch import fold, load_model_file, script_code  # noqa: E402

HINT = "--unsafe-pickle only if you trust the file"


class _Marker:
    """Unpickling it opens (creates) ``path``: the visible trace of code run from a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None],
             extra: dict[str, bytes] | None = None) -> None:
    """Copy the zip ``src`` to ``dst``, each member's bytes through ``change`` (None: unchanged)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        prefix = zin.namelist()[0].split("/", 1)[0] + "/"
        for info in zin.infolist():
            data = zin.read(info)
            new = change(info.filename[len(prefix):], data)
            zout.writestr(info, data if new is None else new)
        for name, data in (extra or {}).items():
            zout.writestr(prefix + name, data)


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sample_inputs(root: Path, marker: Path) -> Path:
    dst = root / "evil_inputs.pt2"
    _rewrite(root / "honest.pt2", dst,
             lambda name, _: _saved(_Marker(marker)) if name == "data/sample_inputs/model.pt" else None)
    return dst


def _pickled_weight(root: Path, marker: Path) -> Path:
    """``conv.weight`` marked ``use_pickle`` (as torch writes a tensor subclass): torch.load(weights_only=False)."""
    dst = root / "evil_weight.pt2"
    config = json.loads(zipfile.ZipFile(root / "honest.pt2").read("honest/data/weights/model_weights_config.json"))
    entry = config["config"]["conv.weight"]
    entry["use_pickle"] = True
    member = "data/weights/" + entry["path_name"]

    def change(name: str, data: bytes) -> bytes | None:
        if name == "data/weights/model_weights_config.json":
            return json.dumps(config).encode()
        return _saved(_Marker(marker)) if name == member else None
    _rewrite(root / "honest.pt2", dst, change)
    return dst


def _opaque_constant(root: Path, marker: Path) -> Path:
    """An opaque object constant: torch reads it with plain pickle.loads."""
    dst = root / "evil_opaque.pt2"
    config = {"config": {"k": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    _rewrite(root / "honest.pt2", dst,
             lambda name, _: json.dumps(config).encode() if name == "data/constants/model_constants_config.json"
             else None,
             extra={"data/constants/opaque_obj_0": pickle.dumps(_Marker(marker))})
    return dst


def _legacy_layout(root: Path, marker: Path | None) -> Path:
    """The pre-2.7 layout (top-level serialized_* members, as torch <= 2.6 saved): torch 2.13 still
    reads it, its serialized_*.pt members with the weights_only=False fallback. ``marker`` None:
    the honest file."""
    serde = pytest.importorskip("torch._export.serde.serialize")
    schema = pytest.importorskip("torch._export.serde.schema")
    art = serde.serialize(torch.export.export(_Net().eval(), (torch.randn(2, 3, 8, 8),)))
    dst = root / ("honest_legacy.pt2" if marker is None else "evil_legacy.pt2")
    with zipfile.ZipFile(dst, "w") as zf:
        zf.writestr("serialized_exported_program.json", art.exported_program)
        zf.writestr("serialized_state_dict.pt", art.state_dict if marker is None else _saved(_Marker(marker)))
        zf.writestr("serialized_constants.pt", art.constants)
        zf.writestr("serialized_example_inputs.pt", art.example_inputs)
        zf.writestr("version", ".".join(map(str, schema.SCHEMA_VERSION)))
    return dst


# name: (builder, the member the refusal names)
VARIANTS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "sample_inputs": (_sample_inputs, "data/sample_inputs/model.pt"),
    "pickled_weight": (_pickled_weight, "data/weights/weight_0"),
    "opaque_constant": (_opaque_constant, "data/constants/opaque_obj_0"),
    "legacy_layout": (_legacy_layout, "serialized_state_dict.pt"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive_pickles")
    torch.manual_seed(0)
    net = _Net().eval()
    example = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(net, (example,)), root / "honest.pt2")
    torch.save(example, root / "example.pt")
    np.save(root / "calib.npy", torch.randn(16, 3, 8, 8).numpy())
    return root


def _evil(root: Path, variant: str) -> tuple[Path, Path, str]:
    """A fresh hostile archive for ``variant``: (archive, its marker path, the member it uses)."""
    build, member = VARIANTS[variant]
    marker = root / f"MARKER_{variant}"
    if marker.exists():
        marker.unlink()
    return build(root, marker), marker, member


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- the attacks are real


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_torch_itself_runs_the_payload(root: Path, variant: str) -> None:
    """The reproduction: plain torch.export.load unpickles each payload (the marker appears)."""
    path, marker, _ = _evil(root, variant)
    try:
        torch.export.load(str(path))
    except Exception:  # noqa: BLE001 - the payload returns a file object, which torch then rejects
        pass
    assert marker.exists()


# --------------------------------------------------------------------------- bnfold refuses them


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fold_refuses_every_pickle_that_needs_more_than_weights_only(root: Path, variant: str) -> None:
    path, marker, member = _evil(root, variant)
    out = root / f"out_{variant}" / "m.onnx"
    for argv in (["fold", path.name, "--dry-run"],
                 ["fold", path.name, "--data", "calib.npy", "-o", out]):
        line = _one_error_line(run_cli(*argv, cwd=root))
        assert f"'{path.name}'" in line and f"member '{member}'" in line and HINT in line, line
        assert not marker.exists(), argv
    assert not out.parent.exists()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_api_refuses_with_the_unsafe_pickle_hint(root: Path, variant: str) -> None:
    path, marker, member = _evil(root, variant)
    with pytest.raises(BadInputError) as err:
        load_model_file(path)
    text = str(err.value)
    assert "\n" not in text and f"member '{member}'" in text and "unsafe_pickle=True" in text, text
    assert not marker.exists()


def test_a_real_process_prints_one_line_and_runs_nothing(root: Path) -> None:
    """The issue's command in a real process: exit 3, one stderr line (was 73 lines: torch's
    broken fallback log call), no marker (was created)."""
    path, marker, member = _evil(root, "sample_inputs")
    proc = subprocess.run([sys.executable, "-m", "bnfold.cli.main", "fold", path.name, "--dry-run"], cwd=root,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc)
    assert member in line and HINT in line and proc.stdout == ""
    assert not marker.exists()


def test_inspect_and_verify_never_unpickle_a_pt2(root: Path) -> None:
    """inspect and verify read ONNX only: a .pt2 is bad input, its pickles are never opened."""
    path, marker, _ = _evil(root, "sample_inputs")
    assert run_cli("inspect", path.name, cwd=root).returncode == 3
    assert run_cli("verify", path.name, "honest.pt2", cwd=root).returncode == 3
    assert not marker.exists()


def test_the_load_guard_alone_stops_torchs_fallback(root: Path) -> None:
    """Defence in depth: without the member check, the guarded load itself (every torch.load
    forced to weights_only) refuses the payload; torch's fallback never unpickles it."""
    path, marker, _ = _evil(root, "sample_inputs")
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with pytest.raises(Exception) as err:  # noqa: B017,PT011 - torch's own UnpicklingError
        archive_mod.guarded_export_load(path.read_bytes())
    assert "weights only" in str(err.value).lower() or "weights_only" in str(err.value), err.value
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # put back


def test_aot_inductor_code_is_refused(root: Path) -> None:
    """Compiled AOTInductor members are loaded by torch.export.load as native code: refused."""
    dst = root / "aoti.pt2"
    _rewrite(root / "honest.pt2", dst, lambda name, _: None, extra={"data/aotinductor/model/model.so": b"\x7fELF"})
    line = _one_error_line(run_cli("fold", dst.name, "--dry-run", cwd=root))
    assert "member 'data/aotinductor/model/model.so'" in line and "native" in line and HINT in line, line


def _graph_calls(root: Path, marker: Path) -> Path:
    """A node ``wrap_with_set_grad_enabled(True, <as_operator 'torch.os.mkdir'>, marker)``: the
    deserializer resolves the string to os.mkdir and the higher-order op calls it."""
    dst = root / "evil_graph.pt2"
    model = json.loads(zipfile.ZipFile(root / "honest.pt2").read("honest/models/model.json"))
    model["graph_module"]["graph"]["nodes"].insert(0, {
        "target": "torch.ops.higher_order.wrap_with_set_grad_enabled",
        "inputs": [{"name": "", "arg": {"as_bool": True}, "kind": 1},
                   {"name": "", "arg": {"as_operator": "torch.os.mkdir"}, "kind": 1},
                   {"name": "", "arg": {"as_string": str(marker)}, "kind": 1}],
        "outputs": [{"as_none": True}], "metadata": {}, "is_hop_single_tensor_return": None, "name": "evil"})
    _rewrite(root / "honest.pt2", dst,
             lambda name, _: json.dumps(model).encode() if name == "models/model.json" else None)
    return dst


def test_a_graph_that_calls_a_python_function_is_refused(root: Path) -> None:
    marker = root / "MARKER_graph"
    path = _graph_calls(root, marker)
    ep = torch.export.load(str(path))  # the reproduction: torch loads it and fx.Interpreter runs os.mkdir
    inputs = [ep.state_dict[s.target] if s.target in ep.state_dict else ep.constants.get(s.target)
              for s in ep.graph_signature.input_specs[:-1]] + [torch.randn(2, 3, 8, 8)]
    torch.fx.Interpreter(ep.graph_module).run(*inputs)
    assert marker.exists()
    marker.rmdir()
    line = _one_error_line(run_cli("fold", path.name, "--dry-run", cwd=root))
    assert "posix.mkdir" in line and "graph node" in line and HINT in line, line
    with pytest.raises(BadInputError, match="unsafe_pickle=True"):
        load_model_file(path)
    assert not marker.exists()


def test_a_graph_that_calls_a_file_op_is_refused(root: Path) -> None:
    """``aten.from_file(name, shared=True, size=4)`` creates (or maps for writing) a file when the
    model runs: bnfold ran it during a dry run before this check (the marker appeared)."""
    marker = root / "MARKER_from_file"
    model = json.loads(zipfile.ZipFile(root / "honest.pt2").read("honest/models/model.json"))
    graph = model["graph_module"]["graph"]
    graph["nodes"].insert(0, {
        "target": "torch.ops.aten.from_file.default",
        "inputs": [{"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                   {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                   {"name": "size", "arg": {"as_int": 4}, "kind": 1}],
        "outputs": [{"as_tensor": {"name": "ff"}}], "metadata": {}, "is_hop_single_tensor_return": None,
        "name": "ff"})
    graph["tensor_values"]["ff"] = {
        "dtype": 7, "sizes": [{"as_int": 4}], "requires_grad": False, "device": {"type": "cpu", "index": None},
        "strides": [{"as_int": 1}], "storage_offset": {"as_int": 0}, "layout": 7}
    path = root / "evil_from_file.pt2"
    _rewrite(root / "honest.pt2", path,
             lambda name, _: json.dumps(model).encode() if name == "models/model.json" else None)
    line = _one_error_line(run_cli("fold", path.name, "--dry-run", cwd=root))
    assert "aten.from_file" in line and HINT in line, line
    assert not marker.exists()


# --------------------------------------------------------------------------- --unsafe-pickle


def test_unsafe_pickle_allows_the_old_behaviour_without_a_logging_traceback(root: Path) -> None:
    path, marker, member = _evil(root, "sample_inputs")
    proc = run_cli("fold", path.name, "--dry-run", "--unsafe-pickle", cwd=root)
    assert marker.exists()  # the user said they trust it: torch unpickled it
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: warning: --unsafe-pickle")]
    assert len(warnings) == 1 and member in warnings[0] and "arbitrary code" in warnings[0], proc.stderr
    # this payload returns a file object, not example inputs: torch refuses it afterwards
    assert proc.returncode == 3


def test_honest_archive_folds_with_and_without_unsafe_pickle(root: Path) -> None:
    for flags in ([], ["--unsafe-pickle"]):
        out = root / f"honest_out{len(flags)}" / "m.onnx"
        proc = run_cli("fold", "honest.pt2", "-o", out, *flags, cwd=root)  # no --data: the example inputs
        assert proc.returncode == 0, proc.stderr
        assert "Export check" in proc.stdout and out.exists()
        assert "--unsafe-pickle:" not in proc.stderr  # nothing unsafe was read: no warning


def test_honest_legacy_layout_still_folds(root: Path) -> None:
    path = _legacy_layout(root, None)
    proc = run_cli("fold", path.name, "--dry-run", cwd=root)
    assert proc.returncode == 0 and "folded 1" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr and "deserializ" not in proc.stderr, proc.stderr  # torch's log muted


def test_honest_archive_keeps_its_example_inputs(root: Path) -> None:
    loaded = load_model_file(root / "honest.pt2")
    assert loaded.example_inputs is not None
    (only,) = loaded.example_inputs.values()
    assert torch.equal(only, torch.load(root / "example.pt", weights_only=True))


def test_layout_names_match_torch() -> None:
    """The member names the check mirrors are torch's (a torch upgrade that moves them fails here)."""
    constants = pytest.importorskip("torch.export.pt2_archive.constants")
    assert archive_mod.MODELS_DIR == constants.MODELS_DIR
    assert archive_mod.SAMPLE_INPUTS == constants.SAMPLE_INPUTS_FILENAME_FORMAT
    assert archive_mod.WEIGHTS_DIR == constants.WEIGHTS_DIR
    assert archive_mod.CONSTANTS_DIR == constants.CONSTANTS_DIR
    assert archive_mod.WEIGHTS_CONFIG == constants.WEIGHTS_CONFIG_FILENAME_FORMAT
    assert archive_mod.CONSTANTS_CONFIG == constants.CONSTANTS_CONFIG_FILENAME_FORMAT
    assert archive_mod.TENSOR_CONSTANT_PREFIX == constants.TENSOR_CONSTANT_FILENAME_PREFIX
    assert archive_mod.AOTINDUCTOR_DIR == constants.AOTINDUCTOR_DIR
    assert archive_mod.ARCHIVE_FORMAT == constants.ARCHIVE_FORMAT_PATH


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_pickles_cannot_carry_python_code(root: Path, member: str) -> None:
    """torch.jit.load's C++ unpickler resolves TorchScript types only: 'io open' is an unknown
    type name, so a __reduce__ payload in data.pkl or constants.pkl never runs."""
    honest = root / "honest_ts.pt"
    torch.jit.save(torch.jit.script(_Net().eval()), honest)
    marker = root / f"MARKER_ts_{member}"
    evil = root / f"evil_ts_{member}.pt"
    _rewrite(honest, evil, lambda name, _: pickle.dumps(_Marker(marker), protocol=2) if name == member else None)
    line = _one_error_line(run_cli("fold", evil.name, "--dry-run", cwd=root))
    assert "TorchScript" in line, line
    assert not marker.exists()


class _SetState(nn.Module):
    """TorchScript runs ``__setstate__`` at torch.jit.load: here it creates the file ``p``."""

    def __init__(self, p: str) -> None:
        super().__init__()
        self.p = p
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.p, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.p = state[0]
        self.training = state[1]
        self.n = int(torch.from_file(self.p, True, 4).numel())


def test_torchscript_code_that_opens_files_is_refused(root: Path) -> None:
    marker = root / "MARKER_ts_setstate"
    path = root / "setstate_ts.pt"
    torch.jit.save(torch.jit.script(_SetState(str(marker))), path)
    torch.jit.load(str(path))  # the reproduction: loading alone creates the file
    assert marker.exists()
    marker.unlink()
    line = _one_error_line(run_cli("fold", path.name, "--data", "calib.npy", "-o", root / "ts_out" / "m.onnx",
                                   cwd=root))
    assert "TorchScript code 'code/__torch__/" in line and "opens files" in line and HINT in line, line
    assert not marker.exists() and not (root / "ts_out").exists()


# --------------------------------------------------------------------------- TorchScript code: bypasses of a text match


class _Honest(nn.Module):
    """An honest scripted model whose code holds a string with an op's name among other words."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4, "cannot save or load a tensor that is not 4D"
        return torch.relu(self.bn(self.conv(x)))


#: name: (statement setting ``_0`` in forward, with {m} for the marker path; what the refusal names).
#: Each hides ``torch.from_file(marker, True, 16)`` (or torch.save) from a regex over the text; the
#: reviewer's variants first (space, parentheses, line continuation), then more the lexer accepts.
SCRIPT_VARIANTS: dict[str, tuple[str, str]] = {
    "space": ('torch . from_file("{m}", True, 16)', "uses 'from_file'"),
    "tabs": ('torch\t.\tfrom_file("{m}", True, 16)', "uses 'from_file'"),
    "parentheses": ('(torch.from_file)("{m}", True, 16)', "uses 'from_file'"),
    "continuation": ('torch.\\\n      from_file("{m}", True, 16)', "uses 'from_file'"),
    "comment": ('torch.from_file(#x\n      "{m}", True, 16)', "uses 'from_file'"),
    "form_feed": ('torch.\x0cfrom_file("{m}", True, 16)', "uses 'from_file'"),
    "ops_namespace": ('ops.aten.from_file("{m}", True, 16)', "uses 'from_file'"),
    "getattr": ('getattr(torch, "from_file")("{m}", True, 16)', "uses 'from_file'"),
    "getattr_concatenated": ('getattr(torch, "from_"\n      "file")("{m}", True, 16)', "uses 'from_file'"),
    "getattr_octal_escape": ('getattr(torch, "\\146rom_file")("{m}", True, 16)', "uses 'from_file'"),
    "save": ('torch.save(x, "{m}")', "uses 'save'"),
    # a carriage return: blank to TorchScript's lexer, an error token to Python's: refused as crafted
    "carriage_return": ('torch.\rfrom_file("{m}", True, 16)', "is not valid TorchScript source"),
}


def _script_code_member(names: list[str]) -> str:
    (member,) = [n for n in names if n.endswith("test_torch_archive_pickles.py") and "/code/" in n]
    return member


def _with_forward_statements(src: Path, dst: Path, statements: str) -> None:
    """Copy the TorchScript archive ``src`` to ``dst`` with ``statements`` first in forward."""
    with zipfile.ZipFile(src) as zf:
        member = _script_code_member(zf.namelist())
        code = zf.read(member).decode()
    head = "x: Tensor) -> Tensor:\n"
    assert code.count(head) == 1, code
    code = code.replace(head, head + statements)
    _rewrite(src, dst, lambda name, _: code.encode() if member.endswith(name) else None)


def _script_evil(root: Path, variant: str) -> tuple[Path, Path]:
    """A fresh archive for ``variant`` and its (absent) marker path."""
    honest = root / "honest_code_ts.pt"
    if not honest.exists():
        torch.jit.save(torch.jit.script(_Honest().eval()), honest)
    marker = root / f"MARKER_code_{variant}"
    if marker.exists():
        marker.unlink()
    call = SCRIPT_VARIANTS[variant][0].format(m=marker)
    dst = root / f"evil_code_{variant}.pt"
    _with_forward_statements(honest, dst, f"    _0 = {call}\n    x = torch.add(x, torch.mul(torch.sum(_0), 0.))\n")
    return dst, marker


@pytest.mark.parametrize("variant", sorted(SCRIPT_VARIANTS))
def test_torch_itself_runs_each_hidden_file_op(root: Path, variant: str) -> None:
    """The reproduction: torch.jit.load accepts each variant and forward creates the marker."""
    path, marker = _script_evil(root, variant)
    module = torch.jit.load(str(path))
    try:
        module(torch.randn(2, 3, 8, 8))
    except Exception:  # noqa: BLE001 - torch.save returns None, which sum then refuses: the file is written
        pass
    assert marker.exists()


@pytest.mark.parametrize("variant", sorted(SCRIPT_VARIANTS))
def test_hidden_file_ops_in_torchscript_code_are_refused(root: Path, variant: str) -> None:
    """Before: a regex saw ``torch.from_file(`` only as written; every variant but 'save' folded
    with exit 0 and created the marker."""
    path, marker = _script_evil(root, variant)
    out = root / f"code_out_{variant}" / "m.onnx"
    line = _one_error_line(run_cli("fold", path.name, "--data", "calib.npy", "-o", out, cwd=root))
    expected = SCRIPT_VARIANTS[variant][1]
    assert f"'{path.name}'" in line and "TorchScript code '" in line and expected in line and HINT in line, line
    assert not marker.exists() and not out.parent.exists()


def test_a_hidden_file_op_cannot_overwrite_a_file(root: Path) -> None:
    """The reviewer's attack: ``torch . from_file(victim, True, 9, dtype=0)`` then ``fill_(88)``
    maps the victim for writing and overwrites its first 9 bytes with 'X'."""
    victim = root / "victim.txt"
    honest = root / "honest_code_ts.pt"
    if not honest.exists():
        torch.jit.save(torch.jit.script(_Honest().eval()), honest)
    path = root / "evil_overwrite.pt"
    _with_forward_statements(honest, path, f'    _0 = torch . from_file("{victim}", True, 9, dtype=0)\n'
                             "    _1 = torch.fill_(_0, 88)\n    x = torch.add(x, torch.mul(torch.sum(_1), 0.))\n")
    victim.write_text("important-victim-data\n")
    torch.jit.load(str(path))(torch.randn(1, 3, 8, 8))  # the reproduction: torch overwrites it
    assert victim.read_text() == "XXXXXXXXX-victim-data\n"
    victim.write_text("important-victim-data\n")
    line = _one_error_line(run_cli("fold", path.name, "--data", "calib.npy", "-o", root / "ow" / "m.onnx", cwd=root))
    assert "uses 'from_file'" in line and HINT in line, line
    assert victim.read_text() == "important-victim-data\n" and not (root / "ow").exists()


def test_torchscript_code_that_does_not_tokenize_is_refused(root: Path) -> None:
    """Code Python's tokenizer cannot read (here an unterminated triple-quoted string) is no
    torch.jit.save output: refused as corrupt or crafted, before torch reads it."""
    honest = root / "honest_code_ts.pt"
    if not honest.exists():
        torch.jit.save(torch.jit.script(_Honest().eval()), honest)
    path = root / "untokenizable.pt"
    _with_forward_statements(honest, path, '    _0 = """never closed\n')
    line = _one_error_line(run_cli("fold", path.name, "--dry-run", cwd=root))
    assert "is not valid TorchScript source" in line and "corrupt" in line and HINT in line, line


def test_an_honest_torchscript_model_still_folds(root: Path) -> None:
    """No false alarm on torch's own code (BatchNorm, Conv) nor on a message naming 'save'."""
    path = root / "honest_fold_ts.pt"
    torch.jit.save(torch.jit.script(_Honest().eval()), path)
    assert archive_mod.check_torchscript_code(path.read_bytes(), path) is None
    out = root / "honest_ts_out" / "m.onnx"
    proc = run_cli("fold", path.name, "--data", "calib.npy", "-o", out, cwd=root)
    assert proc.returncode == 0 and out.exists(), proc.stderr


def test_the_file_op_list_covers_every_op_schema_with_a_file_argument() -> None:
    """Every op registered in this torch with a string argument named for a file or a folder is
    refused by name (a torch upgrade adding one fails here until FILE_OPS lists it; meanwhile
    forbidden_names() already includes it)."""
    found = script_code.schema_file_ops()
    assert {("aten", "from_file"), ("aten", "save")} <= found  # the scan itself works
    missing = sorted(f"{ns}::{name}" for ns, name in found
                     if ns not in script_code.FOREIGN_NAMESPACES and name not in script_code.FILE_OPS)
    assert missing == []
    assert {name for _, name in found} | set(script_code.FILE_OPS) <= script_code.forbidden_names()


# --------------------------------------------------------------------------- device


def test_fold_on_a_missing_device_is_one_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device='cuda' is not an error here")
    net = _Net().eval()
    with pytest.raises(ProviderUnavailable) as err:  # was a bare AssertionError from torch
        fold(net, device="cuda")
    text = str(err.value)
    assert "\n" not in text and "CUDA is not available" in text and "device='cpu'" in text, text
    with pytest.raises(BadInputError, match="not a torch device"):
        fold(net, device="bogus")


def test_calibrate_on_a_missing_device_is_one_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device='cuda' is not an error here")
    from bnfold.torch import calibrate

    net = _Net().train()
    data = torch.randn(8, 3, 6, 6)
    with pytest.raises(ProviderUnavailable, match="CUDA is not available.*use device='cpu'"):
        calibrate(net, data, device="cuda")  # before: a bare AssertionError from torch
