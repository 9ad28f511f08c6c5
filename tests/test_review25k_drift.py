"""Review 25k: drift of corrupt stored statistics (a negative or NaN variance, a NaN mean).

``fold(recalibrate='all')`` replaces them and records each BN's drift as inf, and
``bnfold.torch.drift`` reports inf too; ``inspect(model, data=...)`` (the README's "Are my stored
statistics stale?") refused the same model with "statistics are corrupt: export it again", after
running the whole calibration. With data it now reports the drift (inf, flagged); without data the
error stays."""
from __future__ import annotations

import math

import numpy as np
import pytest
from bnfold.cli.main import main
from conftest import bn, bn_params, init, make_model, rand, vi
from onnx import helper

from bnfold.api import fold, inspect
from bnfold.errors import BadInputError
from bnfold.formulas.drift import flagged


def _model(rng: np.random.Generator, slot: str, channel: int, value: float):  # type: ignore[no-untyped-def]
    p = bn_params(rng, 4)
    p[slot] = p[slot].copy()
    p[slot][channel] = value
    node, inits = bn("bn", "z", "y", p, eps=1e-5)
    return make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), node],
                      [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))] + inits)


@pytest.mark.parametrize(("slot", "value"), [("var", -1.0), ("var", math.nan), ("mean", math.nan)])
def test_inspect_with_data_reports_corrupt_statistics_as_drift(rng: np.random.Generator, slot: str,
                                                                value: float) -> None:
    model = _model(rng, slot, 2, value)
    x = rng.standard_normal((8, 3, 6, 5)).astype(np.float32)
    (rec,) = fold(model, data={"x": x}, batch_size=4, recalibrate="all", dry_run=True).report.bns
    (row,) = inspect(model, data={"x": x}, batch_size=4)
    assert row.drift == rec.drift and flagged(row.drift) and row.drift is not None
    assert row.drift.worst_channel == 2
    assert math.inf in (row.drift.mean_shift_sigma_max, row.drift.log_var_ratio_max)
    with pytest.raises(BadInputError, match="corrupt|not finite|NaN"):  # without data: nothing to compare
        inspect(model)


def test_cli_inspect_data_flags_a_negative_variance(rng: np.random.Generator, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = _model(rng, "var", 1, -0.5)
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    import onnx
    onnx.save(model, path)
    np.savez(data, x=rng.standard_normal((8, 3, 6, 5)).astype(np.float32))
    assert main(["inspect", str(path), "--data", str(data), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "DRIFT" in out and "inf" in out


def test_recalibration_names_the_upstream_bn_whose_dead_channel_divides_by_zero(rng: np.random.Generator) -> None:
    """Conv -> BN (epsilon 0, channel 1 dead: zero weights) -> Relu -> BN. In the calibration pass the
    first BN normalises with batch statistics, 0 / sqrt(0 + 0) = NaN, and the second BN's statistics
    are NaN. The error blamed the second BN and the data's scale; the cause is the first BN's epsilon."""
    w = rand(rng, 4, 3, 3, 3)
    w[1] = 0.0
    p1, p2 = bn_params(rng, 4), bn_params(rng, 4)
    n1, i1 = bn("bn1", "z", "a", p1, eps=0.0)
    n2, i2 = bn("bn2", "r", "y", p2, eps=1e-5)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), n1,
                        helper.make_node("Relu", ["a"], ["r"], name="relu"), n2],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", w)] + i1 + i2)
    x = rng.standard_normal((8, 3, 6, 5)).astype(np.float32)
    for call in (lambda: inspect(model, data={"x": x}, batch_size=4),
                 lambda: fold(model, data={"x": x}, batch_size=4, recalibrate="all", dry_run=True)):
        with pytest.raises(BadInputError) as err:
            call()
        assert "'bn1'" in str(err.value) and "epsilon" in str(err.value) and "channel(s) 1" in str(err.value)


def _alg2(acts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    m = [a.shape[0] * int(np.prod(a.shape[2:])) for a in acts]
    mu = sum(k * a.mean(axis=(0, 2, 3)) for k, a in zip(m, acts)) / sum(m)
    var = sum(k * a.var(axis=(0, 2, 3)) for k, a in zip(m, acts)) / sum(k - 1 for k in m)
    return mu, var


def test_chain_drift_is_measured_on_the_training_network_as_the_readme_says(rng: np.random.Generator) -> None:
    """Conv -> BN1 (stale) -> Relu -> BN2 whose stored statistics are exactly what the deployed model
    (BN1 on its stored statistics) feeds it. BN2's drift is against Algorithm 2's training network
    (BN1 on batch statistics; README, "Drift of stored statistics"), so it is not 0 here."""
    import npref
    x = (rng.standard_normal((12, 3, 6, 5)) * 2 + 1).astype(np.float32)
    w = rand(rng, 4, 3, 3, 3)
    p1, p2 = bn_params(rng, 4), bn_params(rng, 4)
    p1["mean"] = (p1["mean"] + 1.5).astype(np.float32)
    zs = [npref.conv(x[i:i + 4].astype(np.float64), w.astype(np.float64)) for i in range(0, 12, 4)]

    def bn1(z: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
        c = (1, -1, 1, 1)
        return np.maximum((z - mu.reshape(c)) / np.sqrt(var.reshape(c) + 1e-5) * p1["scale"].reshape(c)
                          + p1["bias"].reshape(c), 0)
    deployed = _alg2([bn1(z, p1["mean"].astype(np.float64), p1["var"].astype(np.float64)) for z in zs])
    training = _alg2([bn1(z, z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))) for z in zs])
    p2["mean"], p2["var"] = deployed[0].astype(np.float32), deployed[1].astype(np.float32)
    n1, i1 = bn("bn1", "z", "a", p1, eps=1e-5)
    n2, i2 = bn("bn2", "r", "y", p2, eps=1e-5)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), n1,
                        helper.make_node("Relu", ["a"], ["r"], name="relu"), n2],
                       [vi("x", ["N", 3, 6, 5])], [vi("y", 4)], [init("w", w)] + i1 + i2)
    rows = {r.name: r.drift for r in inspect(model, data={"x": x}, batch_size=4)}
    d = rows["bn2"]
    assert d is not None and d.mean_shift_sigma_max is not None
    mu_s = p2["mean"].astype(np.float64)
    shift = float((np.abs(mu_s - training[0]) / np.sqrt(training[1] + 1e-5)).max())
    assert d.mean_shift_sigma_max == pytest.approx(shift, rel=1e-4) and shift > 0.1


def test_fold_keeping_corrupt_statistics_says_so_before_calibrating_and_names_recalibrate_all(
        rng: np.random.Generator) -> None:
    """fold with data and recalibrate='training' keeps an inference BN's stored statistics: corrupt
    ones are refused before the calibration pass (which cannot change them), and the message names
    the fix the data allows (recalibrate='all'; the CLI says --recalibrate all)."""
    model = _model(rng, "var", 2, -1.0)
    x = rng.standard_normal((8, 3, 6, 5)).astype(np.float32)
    calls: list[int] = []
    with pytest.raises(BadInputError, match="recalibrate='all'") as err:
        fold(model, data={"x": x}, batch_size=4, dry_run=True, progress=lambda done, total: calls.append(done))
    assert "'bn'" in str(err.value) and "channel(s) 2" in str(err.value)
    assert calls == []  # refused before calibrating
    assert fold(model, data={"x": x}, batch_size=4, dry_run=True, recalibrate="all").report.bns[0].drift is not None


def test_drift_table_counts_the_bns_it_compared() -> None:
    """inspect's table said "0 of 2 BN over the drift thresholds" for two training-mode BNs, which
    have no stored statistics to compare; fold's summary counts over the rated BNs only."""
    from types import SimpleNamespace

    from bnfold.formulas.drift import drift, no_drift
    from bnfold.report.summary import drift_table
    rows = [SimpleNamespace(name="a", drift=no_drift("training mode")),
            SimpleNamespace(name="b", drift=no_drift("training mode"))]
    last = drift_table(rows).splitlines()[-1]
    assert last.startswith("0 of 0 BN over the drift thresholds") and "2 BN without figures" in last
    one = np.ones(3)
    rows.append(SimpleNamespace(name="c", drift=drift(one, one, one * 2, one, 1e-5)))
    assert drift_table(rows).splitlines()[-1].startswith("1 of 1 BN over the drift thresholds")
