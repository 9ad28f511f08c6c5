"""Fuzz: byte-flip mutants and truncations of the shipped sample models through ``bnfold fold``,
``inspect`` and ``verify`` (in-process CLI, ``bnfold.cli.main.main``).

Each command ends in exit 0 (for fold: a folded model that loads) or exit 3 with one line
(``bnfold: error: ...``), never a traceback or an "internal error", and fold writes nothing on exit 3.
The mutants are drawn with a fixed seed: half the flips land anywhere (mostly weight bytes, which
give valid models that must fold), half in the first and last 4 KiB, where the graph's nodes,
inputs and outputs are serialised. ``BNFOLD_FUZZ_MUTANTS`` / ``BNFOLD_FUZZ_TRUNCATIONS`` set the
counts (default 150 and 30, spread over the three models; the first 36 and 12 in the fast tier).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from fuzz_graphs import report_line

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MUTANTS = int(os.environ.get("BNFOLD_FUZZ_MUTANTS", "150"))
TRUNCATIONS = int(os.environ.get("BNFOLD_FUZZ_TRUNCATIONS", "30"))
# the first of them run in the fast tier (about 10 s on 2 busy cores), the rest are marked slow
FAST_MUTANTS, FAST_TRUNCATIONS = 36, 12
# model -> (calibration data, its key, samples kept: resnet_trs has a fixed batch of 8)
MODELS = {"unfoldable.onnx": (None, "", 0), "resnet_trs.onnx": ("trs_calib.npz", "images", 8),
          "resnet_train.onnx": ("resnet_calib.npz", "images", 4)}
EXITS: Counter[str] = Counter()

# Mutants found failing (none now; issue 14 fixed every one found), xfail(strict=True) while a fix is pending:
# (command, mutant id) -> what failed
KNOWN: dict[tuple[str, str], str] = {
}


def _mutants() -> list[tuple[str, str, str, int, int]]:
    """(id, model, kind, seed-derived position, value) for every case; fixed seed 14 (the issue)."""
    rng = np.random.default_rng(14)
    names = sorted(MODELS)
    out = []
    for i in range(MUTANTS):
        model = names[i % len(names)]
        out.append((f"{model.removesuffix('.onnx')}-flip{i:03d}", model, "flip", int(rng.integers(2**31)), 0))
    for i in range(TRUNCATIONS):
        model = names[i % len(names)]
        out.append((f"{model.removesuffix('.onnx')}-trunc{i:02d}", model, "trunc", int(rng.integers(2**31)), 0))
    return out


def _mutate(data: bytes, kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "trunc":
        return data[:int(rng.integers(0, len(data)))]
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if rng.random() < 0.5:
            pos = int(rng.integers(0, len(buf)))
        else:  # the structure: nodes near the start, graph inputs/outputs near the end
            pos = int(rng.integers(0, 4096)) if rng.random() < 0.5 else len(buf) - 1 - int(rng.integers(0, 4096))
        buf[pos] ^= int(rng.integers(1, 256))
    return bytes(buf)


@pytest.fixture(scope="module", autouse=True)
def _report_exits(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report_line(request, "fuzz mutants, exits: " + ", ".join(f"{k}={v}" for k, v in sorted(EXITS.items())))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few samples of each model's calibration data (enough to calibrate, quick to run)."""
    folder = tmp_path_factory.mktemp("calib")
    out = {}
    for model, (data, key, n) in MODELS.items():
        if data:
            path = folder / data
            np.savez(path, **{key: np.load(SAMPLES / data)[key][:n]})
            out[model] = path
    return out


def _assert_clean(cmd: str, rc: int, stderr: str, case: str) -> None:
    EXITS[f"{cmd}:{rc}"] += 1
    assert rc in (0, 3), f"{case}: bnfold {cmd} exit {rc}: {stderr[-800:]}"
    assert "Traceback" not in stderr and "internal error" not in stderr, f"{case}: {cmd}: {stderr[-800:]}"
    if rc == 3:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), f"{case}: {cmd}: {stderr[-800:]}"


def _params(cmd: str) -> list[object]:
    """One param per mutant; the first FAST_MUTANTS flips and FAST_TRUNCATIONS truncations run in the
    fast tier, the rest are marked slow; a KNOWN failure is xfail(strict=True)."""
    params: list[object] = []
    for case in _mutants():
        ident = case[0]
        index = int(ident.rsplit("flip", 1)[-1] if "-flip" in ident else ident.rsplit("trunc", 1)[-1])
        fast = index < (FAST_MUTANTS if "-flip" in ident else FAST_TRUNCATIONS)
        marks = [] if fast else [pytest.mark.slow]
        if (cmd, ident) in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[cmd, ident]))
        params.append(pytest.param(*case[1:4], id=ident, marks=marks))
    return params


def _write(tmp_path: Path, model: str, kind: str, seed: int) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(_mutate((SAMPLES / model).read_bytes(), kind, seed))
    return path


@pytest.mark.parametrize("model,kind,seed", _params("fold"))
def test_fold_of_a_mutant_folds_or_says_one_line(model: str, kind: str, seed: int, tmp_path: Path,
                                                 calibration: dict[str, Path]) -> None:
    path = _write(tmp_path, model, kind, seed)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "folded.onnx"
    data = ["--data", calibration[model]] if model in calibration else []
    r = run_cli("fold", path, "-o", output, *data)
    _assert_clean("fold", r.returncode, r.stderr, f"{model} {kind} {seed}")
    if r.returncode == 0:
        onnx.load(str(output))  # a valid fold: the output loads
    else:
        assert sorted(os.listdir(out_dir)) == []  # nothing written on exit 3


@pytest.mark.parametrize("model,kind,seed", _params("inspect"))
def test_inspect_of_a_mutant_lists_or_says_one_line(model: str, kind: str, seed: int, tmp_path: Path) -> None:
    r = run_cli("inspect", _write(tmp_path, model, kind, seed))
    _assert_clean("inspect", r.returncode, r.stderr, f"{model} {kind} {seed}")


@pytest.mark.parametrize("model,kind,seed", _params("verify"))
def test_verify_of_a_mutant_with_itself_passes_or_says_one_line(model: str, kind: str, seed: int,
                                                                tmp_path: Path) -> None:
    path = _write(tmp_path, model, kind, seed)
    r = run_cli("verify", path, path)  # a model compared with itself
    _assert_clean("verify", r.returncode, r.stderr, f"{model} {kind} {seed}")
