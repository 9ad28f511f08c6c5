"""Which folder a repro bundle may replace (``bnfold/verification/repro_location.py``; issue 14, review F4).

bnfold deletes only what it provably wrote: an existing folder at the bundle's place is replaced only
when its ``repro.json`` carries bnfold's marker and the folder holds exactly the files and folders
that marker lists, with no symbolic link. Real models, the real CLI (in process) and real bundles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import bn, bn_params, init, make_model, vi
from onnx import helper, numpy_helper

import bnfold.verification.repro_location as loc
from bnfold.verification.config import VerifyConfig
from bnfold.verification.repro import write_bundle
from bnfold.verification.repro_location import BUNDLE_FORMAT, choose, is_bundle, replaceable, swap_into_place
from bnfold.version import __version__

C = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """m.onnx (Conv -> BN) and bad.onnx (its Conv weight doubled): verify fails on them."""
    root = tmp_path_factory.mktemp("repro_location_models")
    rng = np.random.default_rng(4)
    node, inits = bn("bn", "c", "y", bn_params(rng, C))
    w = (rng.standard_normal((C, 3, 3, 3)) * 0.3).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node],
                       [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", C, 6, 6])], [init("w", w), *inits])
    paths = {"ref": root / "m.onnx", "bad": root / "bad.onnx"}
    onnx.save(model, paths["ref"])
    next(t for t in model.graph.initializer if t.name == "w").CopyFrom(numpy_helper.from_array(w * 2, "w"))
    onnx.save(model, paths["bad"])
    return paths


def tree(root: Path) -> dict[str, bytes | None]:
    """Everything under ``root``: files with their bytes, folders as None."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def a_bundle(pair: dict[str, Path], where: Path, *, copy_models: bool = False, seed: int = 0) -> Path:
    """A real bundle bnfold wrote at ``where`` (``copy_models``: with the models, as ``fold`` writes it)."""
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}]
    written = write_bundle(where, str(pair["ref"]), str(pair["bad"]), feeds,
                           VerifyConfig(repro_copy_models=copy_models, inputs={"source": "random", "seed": seed}))
    assert written == str(where)
    return where


# --------------------------------------------------------------------------- the reviewer's case


def user_project(root: Path) -> Path:
    """F4's folder: a user's project that happens to hold a repro.json with a "command" key."""
    proj = root / "myproj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.c").write_text("important\n")
    (proj / "repro.json").write_text('{"command": "x"}\n')
    return proj


def test_a_user_folder_with_a_repro_json_is_not_deleted(pair: dict[str, Path], tmp_path: Path) -> None:
    """F4: it was renamed away and rmtree'd (exit 1, src/main.c gone). Now a usage error, untouched."""
    proj = user_project(tmp_path)
    before = tree(proj)
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", proj, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "not a bnfold repro bundle" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(proj) == before
    assert sorted(os.listdir(tmp_path)) == ["myproj"]  # no bundle anywhere, no leftover temporary folder


def test_a_user_folder_at_the_default_place_moves_the_bundle_aside(pair: dict[str, Path], tmp_path: Path) -> None:
    proj = user_project(tmp_path)
    proj.rename(tmp_path / "bnfold-repro")
    proj = tmp_path / "bnfold-repro"
    before = tree(proj)
    proc = run_cli("verify", pair["ref"], pair["bad"], cwd=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert tree(proj) == before
    assert is_bundle(tmp_path / "bnfold-repro-1")
    assert "Reproduction files: bnfold-repro-1" in proc.stdout


def test_the_library_leaves_a_user_folder_alone(pair: dict[str, Path], tmp_path: Path) -> None:
    proj = user_project(tmp_path)
    before = tree(proj)
    written = write_bundle(proj, str(pair["ref"]), str(pair["bad"]), [{"x": np.zeros((1, 3, 6, 6), np.float32)}],
                           VerifyConfig())
    assert written == str(tmp_path / "myproj-1") and is_bundle(written)
    assert tree(proj) == before


# --------------------------------------------------------------------------- what is a bundle


def test_a_real_earlier_bundle_is_replaced(pair: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "repro"
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", bundle, cwd=tmp_path)
    assert proc.returncode == 1 and is_bundle(bundle), proc.stderr
    doc = json.loads((bundle / "repro.json").read_text())
    assert doc["bnfold_repro"] == BUNDLE_FORMAT and doc["bnfold_version"] == __version__
    assert set(doc["files"]) == {"test_data_set_0/input_0.pb", "test_data_set_0/output_0.pb"}
    assert doc["folders"] == ["test_data_set_0"]
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", bundle, "--seed", "5", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert json.loads((bundle / "repro.json").read_text())["inputs"]["seed"] == 5
    assert sorted(os.listdir(tmp_path)) == ["repro"]  # the old one is gone, nothing left aside


def test_a_bundle_with_models_and_their_data_files_is_replaced(pair: dict[str, Path], tmp_path: Path) -> None:
    """fold's bundle holds both models and their external data, under the names the models use
    (here in a sub-folder): the marker lists them, so a later bundle replaces it."""
    src = tmp_path / "models"
    (src / "weights").mkdir(parents=True)
    for name in ("ref", "bad"):
        m = onnx.load(pair[name])
        onnx.save(m, src / f"{name}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"weights/{name}.bin", size_threshold=0)
    models = {"ref": src / "ref.onnx", "bad": src / "bad.onnx"}
    bundle = a_bundle(models, tmp_path / "b", copy_models=True)
    doc = json.loads((bundle / "repro.json").read_text())
    assert {"reference.onnx", "candidate.onnx", "weights/ref.bin", "weights/bad.bin", "inputs.npz"} <= set(doc["files"])
    assert sorted(doc["folders"]) == ["test_data_set_0", "weights"]
    assert is_bundle(bundle)
    a_bundle(models, bundle, copy_models=True, seed=1)
    assert json.loads((bundle / "repro.json").read_text())["inputs"]["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["b", "models"]
    assert (src / "weights" / "ref.bin").is_file()  # the bundle's hard links went, the models' files stay


@pytest.mark.parametrize("extra", ["notes.txt", "test_data_set_0/notes.txt", "weights/notes.txt", "empty_folder/"])
def test_a_bundle_plus_one_foreign_file_is_not_replaced(pair: dict[str, Path], tmp_path: Path, extra: str) -> None:
    bundle = a_bundle(pair, tmp_path / "repro")
    target = bundle / extra
    target.parent.mkdir(parents=True, exist_ok=True)
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.write_text("mine")
    before = tree(bundle)
    assert not is_bundle(bundle) and not replaceable(bundle)
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", bundle, cwd=tmp_path)
    assert proc.returncode == 2 and "not a bnfold repro bundle" in proc.stderr, proc.stderr
    assert tree(bundle) == before
    # the library moves on to the next free name
    assert a_bundle_somewhere(pair, bundle) == tmp_path / "repro-1"
    assert tree(bundle) == before


def a_bundle_somewhere(pair: dict[str, Path], where: Path) -> Path:
    written = write_bundle(where, str(pair["ref"]), str(pair["bad"]), [{"x": np.zeros((1, 3, 6, 6), np.float32)}],
                           VerifyConfig())
    assert written is not None
    return Path(written)


def test_a_bundle_with_a_changed_file_is_not_replaced(pair: dict[str, Path], tmp_path: Path) -> None:
    """A listed file whose size changed is not what bnfold wrote (a user's edit, or a user's file)."""
    bundle = a_bundle(pair, tmp_path / "repro")
    with open(bundle / "test_data_set_0" / "input_0.pb", "ab") as f:
        f.write(b"edited")
    assert not replaceable(bundle)


def test_symbolic_links_are_refused(pair: dict[str, Path], tmp_path: Path) -> None:
    bundle = a_bundle(pair, tmp_path / "repro")
    link = tmp_path / "link"
    link.symlink_to(bundle)
    assert not is_bundle(link) and not replaceable(link)
    assert choose(link) == tmp_path / "link-1"
    # a listed file that is a link (to a user's file of the same size) makes it no bundle
    victim = tmp_path / "victim.pb"
    data = bundle / "test_data_set_0" / "input_0.pb"
    victim.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(victim)
    assert not is_bundle(bundle) and not replaceable(bundle)
    # a linked sub-folder too
    os.unlink(data)
    victim.rename(data)
    assert is_bundle(bundle)
    real = tmp_path / "elsewhere"
    (bundle / "test_data_set_0").rename(real)
    (bundle / "test_data_set_0").symlink_to(real)
    assert not is_bundle(bundle)
    before = tree(real)
    proc = run_cli("verify", pair["ref"], pair["bad"], "--repro-dir", bundle, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert tree(real) == before and (bundle / "test_data_set_0").is_symlink()


def test_a_repro_json_without_the_marker_is_not_a_bundle(pair: dict[str, Path], tmp_path: Path) -> None:
    """Bundles written before the marker existed (a repro.json with a command, no "bnfold_repro")
    are not replaced: an explicit --repro-dir is exit 2, the default place moves on to -1."""
    bundle = a_bundle(pair, tmp_path / "bnfold-repro")
    doc = json.loads((bundle / "repro.json").read_text())
    for key, value in (("bnfold_repro", None), ("bnfold_repro", 99), ("files", None), ("folders", None),
                       ("files", {"../outside": 1}), ("files", {"/etc/passwd": 1}), ("bnfold_version", None)):
        broken = {k: v for k, v in doc.items() if k != key}
        if value is not None:
            broken[key] = value
        (bundle / "repro.json").write_text(json.dumps(broken))
        assert not is_bundle(bundle), (key, value)
    (bundle / "repro.json").write_text(json.dumps(doc))
    assert is_bundle(bundle)  # the document itself was the only difference
    old = {k: v for k, v in doc.items() if k not in ("bnfold_repro", "bnfold_version", "files", "folders")}
    (bundle / "repro.json").write_text(json.dumps(old))
    before = tree(bundle)
    proc = run_cli("verify", pair["ref"], pair["bad"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert tree(bundle) == before and is_bundle(tmp_path / "bnfold-repro-1")


# --------------------------------------------------------------------------- the swap


def test_a_folder_that_changed_after_the_choice_is_given_back(pair: dict[str, Path], tmp_path: Path) -> None:
    """The target was a bundle when chosen and is a user's folder when the bundle is moved there:
    swap_into_place checks what it renamed aside, renames it back and refuses."""
    new = a_bundle(pair, tmp_path / "new")
    target = tmp_path / "target"
    target.mkdir()
    (target / "repro.json").write_text('{"command": "x"}')
    (target / "main.c").write_text("important")
    before = tree(target)
    with pytest.raises(FileExistsError, match="not a bnfold repro bundle"):
        swap_into_place(new, target)
    assert tree(target) == before and is_bundle(new)
    assert sorted(os.listdir(tmp_path)) == ["new", "target"]


def test_the_swap_deletes_only_the_listed_files(pair: dict[str, Path], tmp_path: Path, caplog,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Even once the old bundle was checked, only the files it lists are unlinked: a file that
    appears in it between the check and the removal stays, with the folder (and a warning)."""
    old, new, target = a_bundle(pair, tmp_path / "old"), a_bundle(pair, tmp_path / "new", seed=3), tmp_path / "t"
    old.rename(target)
    checked = loc._bundle_contents

    def check_then_a_file_appears(path: Path):  # the race: a real check, then a write into the folder
        found = checked(path)
        (path / "late.txt").write_text("mine")
        return found

    monkeypatch.setattr(loc, "_bundle_contents", check_then_a_file_appears)
    swap_into_place(new, target)
    assert json.loads((target / "repro.json").read_text())["inputs"]["seed"] == 3
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".t.old-")]
    assert len(left) == 1 and tree(left[0]) == {"late.txt": b"mine"}
    assert "left" in caplog.text and "late.txt" not in caplog.text
