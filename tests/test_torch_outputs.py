"""Container outputs (issue 16 point 2): a module returning an ``OrderedDict`` (every torchvision
segmentation model), a namedtuple or a dataclass folds through ``bnfold.torch.fold``, the folded
module returns the module's own container type, and ``bnfold.torch.convert`` writes .pt2, .ts and
.onnx files whose outputs match (where a format cannot hold the class, a note says what it returns).

The oracle is the module itself in eval mode after calibration: bnfold's frozen copy (the fold
must compute the same function) and, for the statistics, Algorithm 2 by hand in float64.
"""
from __future__ import annotations

import dataclasses
import typing
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.fx as fx  # noqa: E402
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import UnsupportedModelError  # noqa: E402
from bnfold.torch.batches import as_batch  # noqa: E402
from bnfold.torch.export import flat_outputs, load_saved, output_names  # noqa: E402
from bnfold.torch.trace import trace  # noqa: E402


class SegOut(typing.NamedTuple):
    out: torch.Tensor
    aux: torch.Tensor


@dataclasses.dataclass
class SegResult:
    out: torch.Tensor
    aux: torch.Tensor


class Seg(nn.Module):
    """A segmentation-style head: backbone Conv -> BN, main 'out' and auxiliary 'aux' outputs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)
        self.aux_conv = nn.Conv2d(6, 2, 3, padding=1, bias=False)
        self.aux_bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.bn(self.conv(x)))
        out, aux = self.head(h), self.aux_bn(self.aux_conv(h))
        if self.kind == "ordereddict":
            result: OrderedDict[str, torch.Tensor] = OrderedDict()
            result["out"] = out
            result["aux"] = aux
            return result
        if self.kind == "namedtuple":
            return SegOut(out, aux)
        if self.kind == "dataclass":
            return SegResult(out, aux)
        return {"pair": (out, [aux])}  # nested


KINDS = {"ordereddict": OrderedDict, "namedtuple": SegOut, "dataclass": SegResult, "nested": dict}


def make(kind: str) -> Seg:
    torch.manual_seed(0)
    net = Seg(kind)
    with torch.no_grad():
        for m in (net.bn, net.aux_bn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
    return net.train()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 8, 8, generator=g) * 2 + 0.5 for _ in range(3)]


def algorithm2(net: nn.Module, data: list[torch.Tensor], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the batch means and m/(m-1) x mean of the biased batch variances of BN ``name``'s
    input, in float64, in the training network (every BN on batch statistics)."""
    seen: list[np.ndarray] = []
    h = net.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().double().numpy()))
    with torch.no_grad():
        for x in data:
            net.train()(x)
    h.remove()
    mus = [s.mean(axis=(0, 2, 3)) for s in seen]
    vs = [s.var(axis=(0, 2, 3)) for s in seen]
    m = seen[0].size // seen[0].shape[1]
    return np.mean(mus, axis=0), np.mean(vs, axis=0) * m / (m - 1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_fold_keeps_the_container_and_its_values(kind: str) -> None:
    net = make(kind)
    data = batches()
    res = bt.fold(net, data)  # before: UnsupportedModelError "its outputs have another structure"
    folded = res.module
    assert isinstance(folded, fx.GraphModule)
    assert {b.name for b in res.report.bns if b.action.value == "folded"} == {"bn", "aux_bn"}
    got = folded(data[0])
    assert type(got) is KINDS[kind]
    frozen = make(kind)
    for name in ("bn", "aux_bn"):
        mean, var = algorithm2(make(kind), data, name)
        bn = frozen.get_submodule(name)
        assert isinstance(bn, nn.BatchNorm2d)
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
    frozen.eval()
    with torch.no_grad():
        ref = frozen(data[0])
    assert type(ref) is type(got)
    assert output_names(got) == output_names(ref)
    for a, b in zip(flat_outputs(ref), flat_outputs(got)):
        # float32 conv + folded weights: a few ulps of the activations' scale (~10)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_output_names_follow_keys_and_fields() -> None:
    t = torch.zeros(1)
    assert output_names(OrderedDict(out=t, aux=t)) == ["out", "aux"]
    assert output_names(SegOut(t, t)) == ["out", "aux"]
    assert output_names(SegResult(t, t)) == ["out", "aux"]
    assert output_names({"pair": (t, [t])}) == ["pair_0", "pair_1_0"]
    assert output_names((t, t)) == ["output_0", "output_1"]
    assert len(flat_outputs(SegResult(t, t))) == 2  # torch's pytree sees one leaf (no tensor) here


def test_trace_still_refuses_another_structure() -> None:
    """Keys that differ are still a different output (fx fixes a branch on a Python value once)."""

    class Flip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.calls += 1
            return {"a": x} if self.calls == 1 else {"b": x}

    with pytest.raises(UnsupportedModelError, match=r"another structure \(dict\['a'\], not dict\['b'\]\)"):
        trace(Flip(), as_batch(torch.zeros(1, 2), torch.device("cpu"), torch.float32))


@pytest.mark.parametrize("kind", ["ordereddict", "namedtuple", "dataclass"])
@pytest.mark.parametrize("suffix", [".pt2", ".ts", ".onnx"])
def test_convert_writes_each_format(kind: str, suffix: str, tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    out = tmp_path / f"seg{suffix}"
    result = bt.convert(make(kind), path, out, batch_size=4, device="cpu")
    assert result.passed and out.exists()
    notes = " | ".join(result.report.warnings)
    if suffix == ".onnx":
        import onnx

        assert [o.name for o in onnx.load(out).graph.output] == ["out", "aux"]
        return
    fmt = "pt2" if suffix == ".pt2" else "torchscript"
    written = load_saved(out, fmt)(torch.from_numpy(x[:4]))
    if kind == "ordereddict":
        # torch.export keeps an OrderedDict; TorchScript returns a plain dict (said in a note)
        assert list(written) == ["out", "aux"]
        assert type(written) is (OrderedDict if fmt == "pt2" else dict)
        assert ("returns a dict where the module returns an OrderedDict" in notes) == (fmt == "torchscript")
    elif kind == "namedtuple":
        assert type(written) is tuple and len(written) == 2
        assert "returns tuple of 2 where the module returns SegOut['out', 'aux']" in notes
    else:
        assert type(written) is dict and list(written) == ["out", "aux"]
        assert "returns dict['out', 'aux'] where the module returns SegResult['out', 'aux']" in notes
