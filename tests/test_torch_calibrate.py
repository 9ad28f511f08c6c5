"""bnfold.torch.calibrate: Algorithm 2 over a torch module's training network.

The reference in these tests is a brute-force float64 computation written here: the exact inputs
of every BN are captured with our own forward pre-hooks on a *plain* training network (the model
in ``train()`` mode, so every BN normalises with its batch statistics as torch does in training),
and the formulas of math.md section 2 are applied to them with numpy.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bnfold.errors import BadInputError  # noqa: E402
from bnfold.torch import calibrate  # noqa: E402
from bnfold.torch.calibrate import run_calibration  # noqa: E402

# ----------------------------------------------------------------------------- reference


def capture_bn_inputs(model: nn.Module, batches, kwargs_batches: bool = False) -> dict[str, list[np.ndarray]]:
    """Inputs of every BN call, float64, from a plain train-mode copy of ``model``."""
    net = copy.deepcopy(model).train()
    seen: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, args, _name=name):
                seen.setdefault(_name, []).append(args[0].detach().double().numpy().copy())
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            if kwargs_batches:
                net(**b)
            elif isinstance(b, (tuple, list)):
                net(*b)
            else:
                net(b)
    for h in hooks:
        h.remove()
    return seen


def algorithm2(inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """math.md section 2, written out: weighted Algorithm 2 and the pooled variance."""
    mus, vars_, ms, values = [], [], [], []
    for x in inputs:
        per_channel = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # (C, m_b)
        m = per_channel.shape[1]
        mu = per_channel.mean(axis=1)
        var = ((per_channel - mu[:, None]) ** 2).mean(axis=1)  # biased, two passes
        mus.append(mu)
        vars_.append(var)
        ms.append(m)
        values.append(per_channel)
    ms_a = np.array(ms, dtype=np.float64)[:, None]
    mean = (ms_a * np.array(mus)).sum(0) / ms_a.sum()
    var_unbiased = (ms_a * np.array(vars_)).sum(0) / (ms_a - 1).sum()
    allv = np.concatenate(values, axis=1)
    return {"mean": mean, "var_unbiased": var_unbiased, "var_pooled": allv.var(axis=1),
            "samples": int(ms_a.sum()), "batches": len(inputs)}


def _moment_tolerances(mean, var):
    """(mean atol, variance atol) for statistics built from float32 per-batch moments.

    Each batch's moments come out of the BN kernel in the activation's float32: the mean to a
    few ulps of the activations' scale (``e = 4 * eps32 * scale``, scale = |mean| + std), and the
    variance of deviations taken from that mean to ``2*e*std + e**2`` (plus ~1e-7 relative). The
    pooled variance also holds the spread of the batch means, whose error enters the same way.
    A naive float32 E[x^2] - E[x]^2 would be off by ~eps32 * scale**2 instead (1e1 at 1e4).
    """
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    std = float(np.sqrt(np.max(var)))
    e = 4 * np.finfo(np.float32).eps * (float(np.max(np.abs(mean))) + std)
    return e, 2 * e * std + e * e


def assert_stats_match(stats, ref, *, rtol=1e-6):
    mean_atol, var_atol = _moment_tolerances(ref["mean"], ref["var_pooled"])
    np.testing.assert_allclose(stats.mean, ref["mean"], rtol=rtol, atol=mean_atol)
    np.testing.assert_allclose(stats.var_unbiased, ref["var_unbiased"], rtol=rtol, atol=var_atol)
    np.testing.assert_allclose(stats.var_pooled, ref["var_pooled"], rtol=rtol, atol=var_atol)


def unequal_batches(shape_tail, sizes=(4, 4, 4, 3), offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [offset + torch.randn((n, *shape_tail), generator=g) for n in sizes]


# ----------------------------------------------------------------------------- models


def mlp_bn1d():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5), nn.BatchNorm1d(5))


def conv1d_bn1d():
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Conv1d(5, 4, 3, padding=1),
                         nn.BatchNorm1d(4))


def conv2d_bn2d():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, groups=2), nn.BatchNorm2d(4, affine=False))


def conv3d_bn3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 3, 1),
                         nn.BatchNorm3d(3, momentum=None))


class Permuted(nn.Module):
    """A BN whose input is a non-contiguous view (channels moved by a permute), then a BN on a
    channels-last activation: both take the strided moments path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_t = nn.BatchNorm1d(5)
        self.bn_cl = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (N, 4, H, 5)
        t = self.bn_t(y.flatten(1, 2).transpose(1, 2))  # (N, 5, 4*H): a transposed view
        z = self.bn_cl(y.contiguous(memory_format=torch.channels_last))
        return t.sum() + z


# small spatial sizes take the strided moments path; the "-rows" cases (spatial >= 16) the row sums
CASES = {
    "bn1d-NC": (mlp_bn1d, (6,)),
    "bn1d-NCL": (conv1d_bn1d, (3, 9)),
    "bn1d-NCL-rows": (conv1d_bn1d, (3, 45)),
    "bn2d": (conv2d_bn2d, (3, 6, 5)),
    "bn2d-rows": (conv2d_bn2d, (3, 19, 23)),
    "bn3d": (conv3d_bn3d, (2, 4, 3, 5)),
    "bn3d-rows": (conv3d_bn3d, (2, 4, 6, 5)),
    "non-contiguous": (Permuted, (3, 6, 5)),
}


@pytest.fixture(params=["numba", "torch"])
def moments_path(request, monkeypatch):
    """The CPU moments under test: the numba kernels, or torch's (``BNFOLD_NUMBA=0``)."""
    from bnfold.torch import kernels

    if request.param == "torch":
        monkeypatch.setenv(kernels.ENV, "0")
    else:
        monkeypatch.setenv(kernels.ENV, "1")  # opt-in
    if request.param == "numba" and not kernels.enabled():
        pytest.skip(f"numba kernels unavailable: {kernels.reason_disabled()}")
    return request.param


@pytest.mark.parametrize("offset", [0.0, 30.0], ids=["centred", "offset"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_equal_brute_force_algorithm2(case, offset, moments_path):
    """At an offset of 30 (std ~1) the first BN's float32 raw sums cancel and its channels are
    centred (torch path); the kernels' float64 sums keep them."""
    torch.manual_seed(1)
    make, tail = CASES[case]
    model = make()
    batches = unequal_batches(tail, offset=offset)
    frozen, stats = calibrate(model, batches)
    ref = capture_bn_inputs(model, batches)
    assert set(stats) == set(ref)
    for name, st in stats.items():
        r = algorithm2(ref[name])
        assert_stats_match(st, r)
        np.testing.assert_allclose(st.var, st.var_unbiased)  # default estimator
        bn = frozen.get_submodule(name)
        np.testing.assert_allclose(bn.running_mean.double().numpy(), r["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(bn.running_var.double().numpy(), r["var_unbiased"], rtol=1e-6)
    assert not frozen.training and not any(m.training for m in frozen.modules())


def test_float64_model_keeps_float64_precision(moments_path):
    """A float64 model's statistics come out to float64 round-off, not float32's (rows path, with
    an offset large enough that float32 arithmetic anywhere would show)."""
    torch.manual_seed(4)
    model = conv2d_bn2d().double()
    batches = [b.double() for b in unequal_batches((3, 19, 23), offset=1e3)]
    _, stats = calibrate(model, batches)
    ref = capture_bn_inputs(model, batches)
    for name, st in stats.items():
        r = algorithm2(ref[name])
        np.testing.assert_allclose(st.mean, r["mean"], rtol=1e-13, atol=1e-12)
        np.testing.assert_allclose(st.var_unbiased, r["var_unbiased"], rtol=1e-10)
        np.testing.assert_allclose(st.var_pooled, r["var_pooled"], rtol=1e-10)


def test_unequal_last_batch_is_weighted_by_its_size():
    """A short last batch counts by its m_b: not the plain mean of per-batch statistics."""
    model = nn.Sequential(nn.BatchNorm1d(2))
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 2, generator=g), 5.0 + 3.0 * torch.randn(2, 2, generator=g)]
    _, stats = calibrate(model, batches)
    r = algorithm2(capture_bn_inputs(model, batches)["0"])
    assert_stats_match(stats["0"], r)
    x0, x1 = (b.double().numpy() for b in batches)
    unweighted = (x0.mean(0) + x1.mean(0)) / 2
    assert np.abs(stats["0"].mean - unweighted).min() > 0.5  # the weighting matters here


def test_large_common_offset_keeps_its_digits(moments_path):
    """1e4 + N(0, 1) in float32: two-pass float64 moments, never E[x^2] - E[x]^2."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    batches = unequal_batches((3, 5, 5), offset=1e4)
    # the inputs BN "2" sees in this run: at an offset of 1e4 a float32 BN output is only good to
    # ~5e-4 (torch's own training kernel included), so downstream statistics are checked against
    # the activations of the same run, and the raw-input BN against its inputs
    net = copy.deepcopy(model)
    seen: dict[str, list[np.ndarray]] = {}
    net[2].register_forward_pre_hook(lambda mod, args: seen.setdefault("2", []).append(args[0].double().numpy()))
    _, stats = calibrate(net, batches, inplace=True)
    ref = capture_bn_inputs(model, batches)
    assert_stats_match(stats["0"], algorithm2(ref["0"]))
    assert_stats_match(stats["2"], algorithm2(seen["2"]))
    # the first BN sees the raw inputs: variance about 1, mean about 1e4
    assert np.all(np.abs(stats["0"].var - 1.0) < 0.35)
    assert np.all(np.abs(stats["0"].mean - 1e4) < 0.5)
    # what the naive float32 one-pass formula would give, to show the test has teeth
    x = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    naive = (x * x).mean(1) - x.mean(1) ** 2
    assert np.max(np.abs(naive.numpy() - stats["0"].var_pooled)) > 1.0


def test_pooled_estimator_is_written_when_asked():
    torch.manual_seed(4)
    model = conv2d_bn2d()
    batches = unequal_batches((3, 6, 5))
    frozen, stats = calibrate(model, batches, estimator="pooled")
    for name, st in stats.items():
        np.testing.assert_array_equal(st.var, st.var_pooled)
        np.testing.assert_allclose(frozen.get_submodule(name).running_var.double().numpy(), st.var_pooled,
                                   rtol=1e-6)
    with pytest.raises(BadInputError, match="unknown estimator"):
        calibrate(model, batches, estimator="ema")


def test_dropout_stays_off_during_calibration():
    torch.manual_seed(5)
    with_dropout = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(p=0.9),
                                 nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    without = copy.deepcopy(with_dropout)
    without[3] = nn.Identity()
    with_dropout.train()  # the caller's model may well be in training mode
    batches = unequal_batches((3, 6, 6))
    _, s_with = calibrate(with_dropout, batches)
    _, s_without = calibrate(without, batches)
    for name in ("1", "5"):
        np.testing.assert_array_equal(s_with[name].mean, s_without[name].mean)
        np.testing.assert_array_equal(s_with[name].var, s_without[name].var)
    # torch's swa_utils.update_bn runs the whole model in train mode: Dropout changes the statistics
    swa = copy.deepcopy(with_dropout)
    torch.optim.swa_utils.update_bn(batches, swa)
    rel = np.abs(swa[5].running_var.double().numpy() - s_without["5"].var) / s_without["5"].var
    assert rel.max() > 0.5


def test_callers_module_is_untouched_unless_inplace():
    torch.manual_seed(6)
    model = conv2d_bn2d().train()
    model[1].running_mean.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = unequal_batches((3, 6, 5))
    frozen, stats = calibrate(model, batches)
    assert frozen is not model
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not hasattr(model[1], "forward") or "forward" not in model[1].__dict__

    same, stats2 = calibrate(model, batches, inplace=True)
    assert same is model and not model.training
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), stats2["1"].mean, rtol=1e-6)
    assert "forward" not in model[1].__dict__  # the batch-statistics forward is gone again
    for name in stats:
        np.testing.assert_array_equal(stats[name].var, stats2[name].var)


def test_inplace_failure_restores_training_flags():
    model = conv2d_bn2d().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [torch.randn(2, 3, 6, 5), torch.randn(2, 7, 6, 5)]  # second batch has the wrong channel count
    with pytest.raises(BadInputError, match="failed on calibration batch 2") as info:
        calibrate(model, bad, inplace=True)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error, kept as the cause
    assert all(m.training for m in model.modules())
    assert "forward" not in model[1].__dict__
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_track_running_stats_false_becomes_a_module_with_running_stats():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    model.eval()  # still batch statistics: no running buffers
    batches = unequal_batches((3, 6, 6))
    frozen, stats = calibrate(model, batches)
    assert model[1].running_mean is None and not model[1].track_running_stats  # caller's untouched
    bn = frozen[1]
    assert bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    assert int(bn.num_batches_tracked) == len(batches)
    assert_stats_match(stats["1"], algorithm2(capture_bn_inputs(model, batches)["1"]))
    # it normalises with the frozen statistics now: the output no longer depends on the batch
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        full, first = frozen(x), frozen(x[:1])
    torch.testing.assert_close(full[:1], first)
    conv_out = frozen[0](x).detach().double()
    expect = (conv_out - torch.from_numpy(stats["1"].mean).view(1, 4, 1, 1)) / torch.sqrt(
        torch.from_numpy(stats["1"].var).view(1, 4, 1, 1) + bn.eps) * bn.weight.detach().double().view(1, 4, 1, 1) \
        + bn.bias.detach().double().view(1, 4, 1, 1)
    torch.testing.assert_close(full.double(), expect, rtol=1e-5, atol=1e-5)
    # its state dict loads into an ordinary BatchNorm2d
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(bn.state_dict())


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_reused_bn_is_refused_then_pooled_with_the_flag():
    torch.manual_seed(8)
    model = Reuse()
    batches = unequal_batches((3, 6, 6))
    with pytest.raises(BadInputError, match=r"BN 'bn'.*allow_reused_bn=True"):
        calibrate(model, batches)
    run = run_calibration(model, batches, allow_reused_bn=True)
    ref = capture_bn_inputs(model, batches)["bn"]  # two calls per batch, in call order
    assert len(ref) == 2 * len(batches)
    assert_stats_match(run.stats["bn"], algorithm2(ref))
    assert run.reused == {"bn": 2}
    assert any("'bn'" in w and "2 places" in w for w in run.warnings)


def test_lazy_batchnorm_is_initialised_by_the_first_batch():
    torch.manual_seed(9)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.LazyBatchNorm2d())
    batches = unequal_batches((2, 6, 6))
    frozen, stats = calibrate(model, batches)
    assert isinstance(model[1], nn.LazyBatchNorm2d)  # the caller's module is still lazy
    assert type(frozen[1]) is nn.BatchNorm2d and type(frozen[4]) is nn.BatchNorm2d
    ref = capture_bn_inputs(frozen, batches)  # same (now materialised) weights
    for name in ("1", "4"):
        assert_stats_match(stats[name], algorithm2(ref[name]))
        assert frozen.get_submodule(name).running_var.shape == (stats[name].var.shape[0],)


def test_syncbatchnorm_calibrates_like_batchnorm_on_one_process():
    torch.manual_seed(10)
    plain = conv2d_bn2d()
    sync = copy.deepcopy(plain)
    sync[1] = nn.SyncBatchNorm(6)
    sync[4] = nn.SyncBatchNorm(4, affine=False)
    sync.load_state_dict(plain.state_dict())
    batches = unequal_batches((3, 6, 5))
    f_plain, s_plain = calibrate(plain, batches)
    f_sync, s_sync = calibrate(sync, batches)
    assert isinstance(f_sync[1], nn.SyncBatchNorm)
    for name in s_plain:
        np.testing.assert_array_equal(s_plain[name].mean, s_sync[name].mean)
        np.testing.assert_array_equal(s_plain[name].var, s_sync[name].var)
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(f_sync(x), f_plain(x), rtol=0, atol=0)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.cx = nn.Conv2d(3, 4, 3, padding=1)
        self.cy = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn2(self.bn1(self.cx(x)) + self.cy(y))


def test_input_formats_give_the_same_statistics():
    torch.manual_seed(11)
    model = TwoInputs()
    g = torch.Generator().manual_seed(12)
    xs = torch.randn(10, 3, 5, 5, generator=g)
    ys = torch.randn(10, 2, 5, 5, generator=g)
    tuples = [(xs[i:i + 4], ys[i:i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2
    dicts = [{"x": x, "y": y} for x, y in tuples]
    lists = [[x, y] for x, y in tuples]
    arrays = [(x.double().numpy(), y.double().numpy()) for x, y in tuples]  # float64 numpy: cast to float32
    loader = DataLoader(TensorDataset(xs, ys), batch_size=4, shuffle=False)
    gen = ((x, y) for x, y in tuples)

    _, ref_stats = calibrate(model, tuples)
    ref = capture_bn_inputs(model, tuples)
    for name in ("bn1", "bn2"):
        assert_stats_match(ref_stats[name], algorithm2(ref[name]))
    for data in (dicts, lists, arrays, loader, gen):
        _, stats = calibrate(model, data)
        for name in ("bn1", "bn2"):
            np.testing.assert_allclose(stats[name].mean, ref_stats[name].mean, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(stats[name].var, ref_stats[name].var, rtol=1e-12)
            assert stats[name].batches == 3 and stats[name].samples == 10 * 25


def test_calibration_data_that_requires_grad(moments_path):
    """Batches with requires_grad set reach the first BN as they are (no_grad does not clear a
    leaf's flag); the statistics are the same as without it."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = unequal_batches((3, 6, 7))
    _, stats = calibrate(model, [b.clone().requires_grad_() for b in batches])
    ref = capture_bn_inputs(model, batches)
    for name, st in stats.items():
        assert_stats_match(st, algorithm2(ref[name]))


def test_single_tensor_batches_and_a_tensor_as_one_batch():
    torch.manual_seed(13)
    model = conv2d_bn2d()
    x = torch.randn(6, 3, 6, 5)
    _, one = calibrate(model, x)  # a tensor as data is one batch, not 6 samples
    _, listed = calibrate(model, [x])
    assert one["1"].batches == 1 and one["1"].samples == 6 * 30
    np.testing.assert_array_equal(one["1"].var, listed["1"].var)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # items are [x_b]
    _, from_loader = calibrate(model, loader)
    _, direct = calibrate(model, [x[:4], x[4:]])
    np.testing.assert_allclose(from_loader["4"].var, direct["4"].var, rtol=1e-12)


def test_input_target_pairs_are_explained():
    model = conv2d_bn2d()
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 6, 5), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(BadInputError, match=r"\(input, target\)"):
        calibrate(model, loader)
    _, stats = calibrate(model, (x for x, _ in loader))
    assert stats["1"].batches == 2


def test_progress_is_reported_per_batch():
    calls = []
    calibrate(conv2d_bn2d(), unequal_batches((3, 6, 5)), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    calls.clear()
    calibrate(conv2d_bn2d(), (b for b in unequal_batches((3, 6, 5), sizes=(2, 2))),
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, None), (1, None), (2, None)]


@pytest.mark.parametrize("spatial, dtype", [((6, 5), torch.float32), ((20, 20), torch.float32),
                                            ((20, 20), torch.bfloat16)],
                         ids=["strided", "rows", "device-path"])
def test_no_host_copy_per_batch(monkeypatch, spatial, dtype):
    """Statistics stay on the device: synchronising host transfers (``item``, ``tolist``, ``cpu``,
    ``numpy`` of a tensor off the CPU) do not grow with the number of batches. On the CPU the
    moments path reads its per-row sums through ``numpy()``, a view of host memory, not a copy:
    those calls are not counted. A bfloat16 model takes the branch a CUDA model takes (moments
    from the BN kernel, float64 sums in device tensors); there every ``numpy()`` counts too, so
    the CUDA path's accumulation is checked here without a GPU. (The CUDA test checks the real
    thing with sync debug mode where a GPU is lent.)"""
    model = conv2d_bn2d().to(dtype)
    strict = dtype != torch.float32
    counts = {"n": 0}
    for meth in ("item", "cpu", "numpy", "tolist"):
        orig = getattr(torch.Tensor, meth)

        def wrapped(self, *a, _orig=orig, _meth=meth, **k):
            if strict or _meth != "numpy" or self.device.type != "cpu":
                counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, meth, wrapped)
    calibrate(model, [b.to(dtype) for b in unequal_batches((3, *spatial), sizes=(2, 2))])
    two = counts["n"]
    counts["n"] = 0
    calibrate(model, [b.to(dtype) for b in unequal_batches((3, *spatial), sizes=(2,) * 12)])
    assert counts["n"] == two


def test_errors_are_clear():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with pytest.raises(BadInputError, match="empty"):
        calibrate(model, [])
    # one value per channel in every batch: no unbiased estimate
    with pytest.raises(BadInputError, match=r"BN '1'.*no unbiased variance"):
        calibrate(model, [torch.randn(1, 3), torch.randn(1, 3)])
    # a batch of one among larger ones is fine (it adds m_b - 1 = 0 to the denominator)
    _, stats = calibrate(model, [torch.randn(1, 3), torch.randn(4, 3)])
    assert stats["1"].samples == 5 and stats["1"].batches == 2
    # non-finite activations: the first BN that sees them is named
    bad = torch.randn(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(BadInputError, match=r"BN '1' saw non-finite"):
        calibrate(model, [torch.randn(4, 3), bad])
    with pytest.raises(BadInputError, match="not an iterable"):
        calibrate(model, 3)
    with pytest.raises(BadInputError, match="calibration batch is a"):
        calibrate(model, [object()])
    # a forward that fails names the batch and, where the dtypes differ, the conversion
    with pytest.raises(BadInputError, match=r"failed on calibration batch 2 .*torch\.float64 tensors and the module "
                                            r"is torch\.float32: convert the data"):
        calibrate(model, [torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)])
    with pytest.raises(BadInputError, match=r"failed on calibration batch 1 \(RuntimeError: .*\); check that the "
                                            r"batches match"):
        calibrate(model, [torch.randn(4, 5)])


def test_calibration_runs_on_the_requested_device():
    model = conv2d_bn2d()
    batches = [b.numpy() for b in unequal_batches((3, 6, 5))]
    frozen, stats = calibrate(model, batches, device="cpu")
    assert frozen[1].running_var.device.type == "cpu"
    assert stats["1"].batches == 4


def test_importing_bnfold_does_not_import_torch():
    code = ("import sys, bnfold; assert 'torch' not in sys.modules, 'bnfold imported torch'; "
            "import bnfold.torch; assert 'torch' in sys.modules; "
            "from bnfold.torch import fold, calibrate, TorchFoldResult")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- against the numpy reference

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

from bnfold.formulas.stats import batch_moments, finalize, update  # noqa: E402
from bnfold.records import BnStats  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(sizes=hst.lists(hst.integers(1, 5), min_size=1, max_size=5), c=hst.integers(1, 4),
       spatial=hst.lists(hst.integers(1, 3), min_size=0, max_size=2), offset=hst.sampled_from([0.0, 1e4]),
       seed=hst.integers(0, 2**16))
def test_device_accumulation_equals_the_numpy_reference(sizes, c, spatial, offset, seed):
    """The torch hooks' sums (on device, Chan's merge in torch) equal bnfold.formulas.stats."""
    if sum(n * int(np.prod(spatial)) for n in sizes) == len(sizes):
        sizes = sizes + [2]  # at least one batch with m_b > 1, else there is no estimate at all
    bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[len(spatial)](c)
    g = torch.Generator().manual_seed(seed)
    data = [offset + torch.randn((n, c, *spatial), generator=g) for n in sizes]
    _, stats = calibrate(nn.Sequential(bn), data)
    ref = BnStats(channels=c)
    for x in data:
        update(ref, *batch_moments(x.numpy()))
    expect = finalize(ref, "unbiased", "0")
    got = stats["0"]
    mean_atol, var_atol = _moment_tolerances(expect.mean, expect.var_pooled)
    np.testing.assert_allclose(got.mean, expect.mean, rtol=1e-6, atol=mean_atol)
    np.testing.assert_allclose(got.var_unbiased, expect.var_unbiased, rtol=1e-6, atol=var_atol + 1e-12)
    np.testing.assert_allclose(got.var_pooled, expect.var_pooled, rtol=1e-6, atol=var_atol + 1e-12)
    assert (got.samples, got.batches) == (expect.samples, expect.batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_statistics_stay_on_the_device():
    """On CUDA: the same statistics as on CPU, and no synchronising host copy in the batch loop."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    host = unequal_batches((3, 6, 5), offset=1e4)
    on_device = [b.cuda() for b in host]
    _, s_cpu = calibrate(model, host)

    def progress(done, total):  # sync debug mode "error" exactly while batches run
        torch.cuda.set_sync_debug_mode("error" if done < total else "default")

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        frozen, s_gpu = calibrate(model, on_device, device="cuda", progress=progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.backends.cudnn.allow_tf32 = tf32
    assert frozen[0].running_var.device.type == "cuda"
    assert_stats_match(s_gpu["0"], algorithm2([b.double().numpy() for b in host]))
    np.testing.assert_allclose(s_gpu["2"].mean, s_cpu["2"].mean, rtol=1e-5)
    np.testing.assert_allclose(s_gpu["2"].var, s_cpu["2"].var, rtol=1e-4)


def test_a_torchscript_module_is_refused_in_one_line_naming_the_way_through_onnx():
    """Its BN modules' forwards cannot be replaced (torch's raw 'register_forward_pre_hook is not
    supported on ScriptModules' before stop 23); the module is left as it was."""
    import warnings

    from bnfold.errors import UnsupportedModelError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for inplace in (False, True):
        with pytest.raises(UnsupportedModelError) as info:
            calibrate(m, [torch.randn(2, 3, 8, 8)], inplace=inplace)
        text = str(info.value)
        assert "\n" not in text and "TorchScript" in text and "bnfold.torch.convert" in text
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
