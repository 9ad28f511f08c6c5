"""Review 25j: checkpoints as people have them, through ``--model-factory ... --weights``.

torch.compile'd models (``_orig_mod.``), Lightning modules (``model.``), DataParallel around a compiled
model, timm's EMA-only checkpoints (``state_dict_ema``) and checkpoints without ``num_batches_tracked``
(which torch's own ``load_state_dict(strict=True)`` accepts) load like a plain state_dict.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_run import run_cli
from torch import nn

from bnfold.errors import BadInputError
from bnfold.torch.load import load_factory

_MODULE = "r25j_ckpt_factory"
_SOURCE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net()
"""


@pytest.fixture
def factory_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / f"{_MODULE}.py").write_text(_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(_MODULE, None)
    return tmp_path


def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = nn.Module()
    net.conv = nn.Conv2d(3, 4, 3)
    net.bn = nn.BatchNorm2d(4)
    net.fc = nn.Linear(4, 2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["bn.running_mean"] = torch.rand(4) * 2 - 1
    state["bn.running_var"] = torch.rand(4) + 0.5
    state["bn.num_batches_tracked"] = torch.tensor(7)
    return state


def _checkpoints() -> dict[str, Any]:
    sd = _trained_state()
    return {
        "compiled": {"_orig_mod." + k: v for k, v in sd.items()},
        "dp_compiled": {"module._orig_mod." + k: v for k, v in sd.items()},
        "lightning": {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},
        "ema_only": {"state_dict_ema": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        "no_num_batches_tracked": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    }


@pytest.mark.parametrize("name", list(_checkpoints()))
def test_wrapped_checkpoints_load_as_the_plain_state_dict(factory_dir: Path, name: str) -> None:
    path = factory_dir / f"{name}.pt"
    torch.save(_checkpoints()[name], path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_factory(f"{_MODULE}:build", path)
    got = loaded.module.state_dict()
    for k, v in _trained_state().items():
        if k.endswith("num_batches_tracked") and name == "no_num_batches_tracked":
            continue
        assert torch.equal(got[k], v), k
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_dict_without_a_state_dict_names_its_keys(factory_dir: Path) -> None:
    path = factory_dir / "opt.pt"
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3}, path)
    with pytest.raises(BadInputError) as err:
        load_factory(f"{_MODULE}:build", path)
    assert "'optimizer'" in str(err.value) and "'state_dict_ema'" in str(err.value)


def test_cli_folds_a_torch_compile_checkpoint(factory_dir: Path) -> None:
    torch.save(_checkpoints()["compiled"], factory_dir / "w.pt")
    np.savez(factory_dir / "d.npz", x=np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32))
    res = run_cli(*["fold", "--model-factory", f"{_MODULE}:build", "--weights", "w.pt", "--data", "d.npz",
                   "--batch-size", "4", "-o", "out.pt2", "--device", "cpu"], cwd=factory_dir)
    assert res.returncode == 0, res.stderr
    assert (factory_dir / "out.pt2").is_file()


def test_a_lightning_module_with_more_than_the_model_names_the_prefix_to_save(factory_dir: Path) -> None:
    sd = {"net." + k: v for k, v in _trained_state().items()}
    sd["criterion.weight"] = torch.ones(2)
    path = factory_dir / "lit.pt"
    torch.save({"state_dict": sd, "epoch": 1}, path)
    with pytest.raises(BadInputError) as err:
        load_factory(f"{_MODULE}:build", path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "under the prefix 'net.'" in msg and "with p = 'net.'" in msg


def test_a_training_checkpoint_with_its_argparse_namespace_loads(factory_dir: Path) -> None:
    import argparse
    path = factory_dir / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "net", "state_dict": _trained_state(), "args": argparse.Namespace(lr=0.1),
                "state_dict_ema": _trained_state()}, path)
    loaded = load_factory(f"{_MODULE}:build", path)
    assert torch.equal(loaded.module.state_dict()["bn.running_var"], _trained_state()["bn.running_var"])
    np.savez(factory_dir / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    res = run_cli("fold", str(path), "--data", "d.npz", "-o", "out.pt2", cwd=factory_dir)
    assert res.returncode == 3 and "holds a state_dict" in res.stderr and "--model-factory" in res.stderr


class _Payload:
    """Unpickling it would create ``marker`` (what an os.system payload would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["namespace_attribute", "beside_the_weights"])
def test_allowing_argparse_namespace_lets_no_other_object_through(factory_dir: Path, where: str) -> None:
    """weights_only with argparse.Namespace allowed (docs/security.md): a payload held by the
    Namespace, or beside it, is refused with nothing run."""
    import argparse
    marker = factory_dir / "ran"
    args = argparse.Namespace(lr=0.1)
    if where == "namespace_attribute":
        args.hook = _Payload(marker)
    ckpt: dict[str, Any] = {"state_dict": _trained_state(), "args": args}
    if where == "beside_the_weights":
        ckpt["extra"] = _Payload(marker)
    path = factory_dir / "evil.pth.tar"
    torch.save(ckpt, path)
    assert not marker.exists()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(BadInputError):
        load_factory(f"{_MODULE}:build", path)
    res = run_cli("fold", "--model-factory", f"{_MODULE}:build", "--weights", str(path), "-o", "out.pt2",
                  cwd=factory_dir)
    assert res.returncode == 3, res.stderr
    assert not marker.exists()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_factory_that_needs_arguments_names_the_fix(factory_dir: Path) -> None:
    (factory_dir / "r25j_args_factory.py").write_text("def build(num_classes, pretrained=False):\n    return None\n")
    sys.modules.pop("r25j_args_factory", None)
    with pytest.raises(BadInputError) as err:
        load_factory("r25j_args_factory:build", None)
    assert "num_classes required" in str(err.value) and "def build(): return" in str(err.value)


def test_a_safetensors_model_file_says_to_pass_it_as_weights(factory_dir: Path) -> None:
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file({k: v.contiguous() for k, v in _trained_state().items()}, str(factory_dir / "w.safetensors"))
    np.savez(factory_dir / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    res = run_cli("fold", "w.safetensors", "--data", "d.npz", "-o", "out.onnx", cwd=factory_dir)
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert "safetensors file" in res.stderr and "--weights FILE" in res.stderr
    res = run_cli("fold", "--model-factory", f"{_MODULE}:build", "--weights", "w.safetensors", "--data", "d.npz",
                  "-o", "out.pt2", "--device", "cpu", cwd=factory_dir)
    assert res.returncode == 0, res.stderr
