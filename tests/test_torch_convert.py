"""``bnfold.torch.convert``: an ``nn.Module`` with training-mode BNs -> calibrated, exported, folded,
verified file, and its typed ``ConvertResult``.

The reference is computed here, independently of bnfold: Algorithm 2 of the BN paper from the BN
inputs of the training-mode network (forward pre-hooks, float64, batches of BATCH), written into
a copy of the module in eval mode. The written files are run in onnxruntime / torch.export and
compared with that reference.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from bnfold.cli.wording import flag_words
from torch import nn

import bnfold.torch as bt
from bnfold.errors import BadInputError, ProviderUnavailable

BATCH = 8


class Net(nn.Module):
    """Conv -> BN -> ReLU -> Conv (no bias) -> BN -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.bn2(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (net.bn, net.bn2):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net.train()


def reference_frozen(net: nn.Module, x: np.ndarray) -> nn.Module:
    """Algorithm 2 by hand: E[x] = mean of the batch means, Var[x] = m/(m-1) * mean of the batch
    variances, from the inputs each BN sees in the training-mode network."""
    work = copy.deepcopy(net).train()
    bns = {name: m for name, m in work.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().double()))
             for name, m in bns.items()]
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            work(torch.from_numpy(x[i:i + BATCH]))
    for h in hooks:
        h.remove()
    frozen = copy.deepcopy(net).eval()
    for name, m in frozen.named_modules():
        if name in seen:
            means = torch.stack([t.mean((0, 2, 3)) for t in seen[name]])
            variances = torch.stack([t.var((0, 2, 3), unbiased=False) for t in seen[name]])
            mb = seen[name][0].numel() // seen[name][0].shape[1]
            m.running_mean.copy_(means.mean(0).float())
            m.running_var.copy_((variances.mean(0) * mb / (mb - 1)).float())
    return frozen


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    path = tmp_path_factory.mktemp("convert") / "calib.npy"
    np.save(path, x)
    return path, x


def eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_convert_to_onnx_matches_the_frozen_module(data: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    path, x = data
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out, frozen_out = tmp_path / "o" / "net.onnx", tmp_path / "o" / "frozen.onnx"
    result = bt.convert(net, path, out, frozen_output=frozen_out, batch_size=BATCH, device="cpu")

    assert isinstance(result, bt.ConvertResult)
    assert result.passed and result.failed is None and result.route == "onnx"
    assert result.output == out and out.exists() and result.frozen_output == frozen_out and frozen_out.exists()
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("BatchNormalization") == 0
    assert result.torch_check is None  # the ONNX route checks the export, then verifies the fold
    check = result.export_check
    assert isinstance(check, bt.TensorCheck) and check.passed and check.samples == 4
    assert [o.name for o in check.outputs] == ["output"] and check.max_abs < 1e-4
    assert result.verification is not None and result.verification.passed
    assert result.verification is result.report.verification
    assert result.report.folded == 2 and result.warnings == tuple(result.report.warnings)
    assert result.report.input_path == "module Net" and result.report.output_path == str(out)
    assert result.report.extra["source"] == {"kind": "module", "path": None}
    assert result.report.extra["export_check"]["max_abs"] == check.max_abs

    frozen = reference_frozen(net, x)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # a dynamic batch axis
        np.testing.assert_allclose(sess.run(None, {"x": x[:n]})[0], eager(frozen, x[:n]), atol=1e-4, rtol=1e-4)
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "module changed"


def test_convert_to_pt2_checks_in_torch(data: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, x = data
    net = make_net()
    out = tmp_path / "net.pt2"
    result = bt.convert(net, path, out, batch_size=BATCH, device="cpu")
    assert result.passed and result.route == "torch" and result.output == out
    assert result.torch_check is not None and result.torch_check.passed
    assert result.export_check is not None and result.export_check.passed
    assert result.verification is None and result.frozen_output is None
    folded = torch.export.load(str(out)).module()
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes if n.op == "call_function")
    frozen = reference_frozen(net, x)
    with torch.no_grad():
        got = folded(torch.from_numpy(x[:3])).numpy()
    np.testing.assert_allclose(got, eager(frozen, x[:3]), atol=1e-4, rtol=1e-4)


def test_failed_check_is_a_verdict_and_writes_nothing(data: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """Zero tolerance is below the fold's float32 round-off: the strict torch check (no noise floor,
    which would accept round-off) fails, nothing is written."""
    from bnfold.verification.engine import VerifyConfig

    path, _ = data
    out = tmp_path / "net.pt2"
    result = bt.convert(make_net(), path, out, batch_size=BATCH, device="cpu",
                        config=VerifyConfig(atol=(0.0, {}), rtol=(0.0, {}), noise_floor=False))
    assert not result.passed and result.failed == "torch_check" and result.output is None
    assert result.torch_check is not None and not result.torch_check.passed and result.torch_check.max_abs > 0
    assert result.torch_check.outputs[0].atol == 0.0 and result.export_check is None
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("suffix", "names"), [(".onnx", ["/bn/BatchNormalization", "/bn2/BatchNormalization"]),
                                               (".pt2", ["bn", "bn2"])])
def test_dry_run_writes_nothing(data: tuple[Path, np.ndarray], tmp_path: Path, suffix: str, names: list[str]) -> None:
    """The plan names the BNs as the route sees them: ONNX nodes of the export, or the modules."""
    path, _ = data
    out = tmp_path / "o" / f"net{suffix}"
    result = bt.convert(make_net(), path, out, frozen_output=tmp_path / "o" / f"frozen{suffix}", dry_run=True,
                        device="cpu")
    assert list(tmp_path.iterdir()) == []
    assert result.output is None and result.frozen_output is None and result.report.dry_run
    assert result.plan is not None and sorted(r.name for r in result.plan) == names
    assert all(r.decision.action.value == "folded" for r in result.plan), result.plan


def test_bad_input_raises_with_library_wording(tmp_path: Path) -> None:
    out = tmp_path / "net.onnx"
    with pytest.raises(BadInputError) as info:
        bt.convert(make_net(), None, out, device="cpu")
    text = str(info.value)
    assert text.startswith("data is needed for a PyTorch model") and "--" not in text, text
    # the CLI puts it in flag words, exactly as `bnfold fold` has always said it
    assert flag_words(text) == ("--data is needed for a PyTorch model: bnfold takes the example inputs for the "
                                "export and the checks from it (an .npz keyed by forward's parameter names, or a "
                                ".npy for one input)")
    with pytest.raises(BadInputError, match="suffix"):
        bt.convert(make_net(), None, tmp_path / "net.bin", device="cpu")
    with pytest.raises(BadInputError, match="output is needed"):
        bt.convert(make_net(), None, None, device="cpu")
    with pytest.raises(BadInputError, match="nn.Module"):
        bt.convert("net.pt2", None, out, device="cpu")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: device='cuda' is not an error here")
def test_missing_cuda_names_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ProviderUnavailable) as info:
        bt.convert(make_net(), None, tmp_path / "net.onnx", device="cuda")
    assert "device='cuda' was requested" in str(info.value) and "use device='cpu'" in str(info.value)
    assert flag_words(str(info.value)).startswith("--device cuda was requested")


def test_public_names() -> None:
    assert {"convert", "ConvertResult", "TensorCheck", "calibrate", "fold", "TorchFoldResult"} <= set(bt.__all__)
    assert all(hasattr(bt, n) for n in bt.__all__)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_inplace_calibrates_the_module_itself(data: tuple[Path, np.ndarray], tmp_path: Path, suffix: str) -> None:
    """inplace=True: no copy; the module ends as the frozen, unfolded model (the reference's
    statistics, eval mode), and the written model is the one inplace=False writes."""
    path, x = data
    net, twin = make_net(), make_net()
    got = bt.convert(net, path, tmp_path / "a" / f"net{suffix}", batch_size=BATCH, device="cpu", inplace=True)
    want = bt.convert(twin, path, tmp_path / "b" / f"net{suffix}", batch_size=BATCH, device="cpu")
    assert got.passed and want.passed
    assert twin.training  # inplace=False left it alone
    frozen = reference_frozen(make_net(), x)
    assert not any(m.training for m in net.modules())
    for (name, m), ref in zip(net.named_modules(), frozen.modules()):
        if isinstance(m, nn.BatchNorm2d):
            np.testing.assert_allclose(m.running_var.numpy(), ref.running_var.numpy(), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(m.running_mean.numpy(), ref.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(eager(net, x[:5]), eager(frozen, x[:5]), atol=1e-5, rtol=1e-5)
    assert [(b.name, b.action, b.target) for b in got.report.bns] == [(b.name, b.action, b.target)
                                                                       for b in want.report.bns]
    for a, b in zip(got.report.bns, want.report.bns):
        assert a.stats is not None and b.stats is not None
        np.testing.assert_array_equal(a.stats.var, b.stats.var)


def test_a_torchscript_module_is_not_changed(data: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """A TorchScript module is exported as it is (it cannot be copied as a module), in eval mode:
    its training flags are put back afterwards (up to stop 22 it was left in eval mode)."""
    import warnings

    path, x = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.script(make_net())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = bt.convert(net, path, tmp_path / "net.onnx", batch_size=BATCH, device="cpu")
    assert result.passed and result.route == "onnx-torchscript"
    assert all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net2 = torch.jit.script(make_net())
    assert bt.convert(net2, path, tmp_path / "net2.onnx", batch_size=BATCH, device="cpu", inplace=True).passed
    assert not any(m.training for m in net2.modules())  # inplace=True: it is the frozen model
