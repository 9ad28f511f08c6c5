"""review24g: a generator that was already read (partly, e.g. by an earlier call that stopped on a
bad batch, or wholly) is refused with one line, instead of calibrating silently on what is left."""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from test_data_stream import _model, _x

import bnfold
from bnfold.errors import BadInputError


def _gen(x: np.ndarray, step: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), step):
        yield {"x": x[i:i + step]}


def test_generator_left_half_read_by_a_failed_call_is_refused(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 11)
    x[5, 0, 0, 0] = np.nan  # batch 2 stops the first call; batch 3 is still in the generator
    g = _gen(x, 4)
    with pytest.raises(BadInputError, match="NaN"):
        bnfold.fold(model, data=g, dry_run=True, verify=False)
    with pytest.raises(BadInputError, match="already read") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bnfold.fold(model, data=g, dry_run=True, verify=False)
    assert "\n" not in str(info.value) and "new generator" in str(info.value)


def test_exhausted_generator_says_it_was_read(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 8)
    g = _gen(x, 4)
    list(g)
    with pytest.raises(BadInputError, match="already read"):
        bnfold.fold(model, data=g, dry_run=True, verify=False)


def test_fresh_generator_still_works(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = bnfold.fold(model, data=_gen(x, 4), dry_run=True, verify=False)
    [rec] = [b for b in r.report.bns if b.stats is not None]
    assert rec.stats.batches == 2


def test_skipping_items_on_purpose_goes_through_islice(rng: np.random.Generator) -> None:
    # the refusal's own advice: a generator advanced on purpose is passed as islice(gen, k, None)
    import itertools

    model, x = _model(rng), _x(rng, 12)
    g = _gen(x, 4)
    next(g)
    with pytest.raises(BadInputError, match=r"itertools.islice\(gen, k, None\)"):
        bnfold.fold(model, data=g, dry_run=True, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = bnfold.fold(model, data=itertools.islice(g, 0, None), dry_run=True, verify=False)
        rest = bnfold.fold(model, data=_gen(x[4:], 4), dry_run=True, verify=False)
    [rec] = [b for b in r.report.bns if b.stats is not None]
    [want] = [b for b in rest.report.bns if b.stats is not None]
    assert rec.stats.batches == 2  # the two batches after the skipped one, and nothing else
    assert (rec.stats.mean == want.stats.mean).all() and (rec.stats.var == want.stats.var).all()


def test_batch_larger_than_memory_is_one_line_up_front(rng: np.random.Generator, tmp_path, monkeypatch) -> None:
    import onnx
    from cli_run import run_cli

    from bnfold.data import sources

    model, x = _model(rng), _x(rng, 11)  # 11 samples x 360 bytes
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(sources, "_physical_memory", lambda: 2000)
    proc = run_cli("fold", tmp_path / "m.onnx", "--data", tmp_path / "x.npy", "-o", tmp_path / "o.onnx")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert "all 11 samples in one batch" in proc.stderr and "--batch-size" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(BadInputError, match="batches of 8 samples"):
        bnfold.fold(model, data=tmp_path / "x.npy", batch_size=8, dry_run=True, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = bnfold.fold(model, data=tmp_path / "x.npy", batch_size=4, dry_run=True, verify=False)
    assert [b.stats.batches for b in r.report.bns if b.stats is not None] == [3]


def test_input_shape_for_an_input_the_data_supplies_stops_before_calibration(rng: np.random.Generator, tmp_path,
                                                                              monkeypatch) -> None:
    import onnx
    from cli_run import run_cli

    import bnfold.api

    model, x = _model(rng), _x(rng, 11)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)

    def no_calibration(*a, **k):  # the error must come before the data is run through the model
        raise AssertionError("calibrated before refusing --input-shape")

    monkeypatch.setattr(bnfold.api, "_calibrate_and_freeze", no_calibration)
    for extra in ([], ["--dry-run"]):
        proc = run_cli("fold", tmp_path / "m.onnx", "--data", tmp_path / "x.npy", "-o", tmp_path / "o.onnx",
                       "--input-shape", "x:1x3x6x5", *extra)
        assert proc.returncode == 3, proc.stderr
        assert "is fed from the data" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()
    onnx.save(_model(rng, batch=4), tmp_path / "fixed.onnx")  # fixed batch: the data without its short tail
    with pytest.raises(BadInputError, match="is fed from the data"):
        bnfold.fold(tmp_path / "fixed.onnx", data=tmp_path / "x.npy", input_shapes={"x": (4, 3, 6, 5)}, dry_run=True)


def test_factory_attribute_errors_name_the_fix(tmp_path, monkeypatch) -> None:
    from bnfold.data.factory import call_data_factory

    (tmp_path / "r24g_fac.py").write_text("NOT_CALLABLE = 3\n")
    (tmp_path / "r24g_badsyn.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInputError, match=r"has no attribute 'absent'; check the name after ':'"):
        call_data_factory("r24g_fac:absent")
    with pytest.raises(BadInputError, match=r"not a callable; name a function"):
        call_data_factory("r24g_fac:NOT_CALLABLE")
    with pytest.raises(BadInputError, match=r"SyntaxError.*; fix that module"):
        call_data_factory("r24g_badsyn:f")


def test_torch_calibrate_refuses_a_half_read_generator() -> None:
    torch = pytest.importorskip("torch")
    import bnfold.torch as bt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    xs = torch.randn(12, 3, 8, 8)

    def gen():
        for i in range(0, 12, 4):
            yield xs[i:i + 4]

    g = gen()
    next(g)  # as an earlier call that stopped on a bad batch leaves it
    for call in (bt.calibrate, bt.drift, bt.fold):
        with pytest.raises(BadInputError, match="already read"):
            call(model, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, stats = bt.calibrate(model, gen())  # a fresh one works
    assert len(stats) == 1


def test_a_stray_array_name_is_reported_against_every_model_input(rng: np.random.Generator, tmp_path) -> None:
    model, x = _model(rng, inputs=2), _x(rng, 8)  # inputs 'x' and 'z'; the data spells 'z' as 'zz'
    np.savez(tmp_path / "typo.npz", x=x, zz=x)
    for data in (tmp_path / "typo.npz", [{"x": x, "zz": x}]):
        with pytest.raises(BadInputError) as info:
            bnfold.fold(model, data=data, dry_run=True, verify=False)
        msg = str(info.value)
        assert "'zz'" in msg and "(the model has: 'x')" not in msg and "'z'" in msg.replace("'zz'", ""), msg


def test_a_model_input_first_supplied_by_a_later_batch_is_named_so(rng: np.random.Generator) -> None:
    model, x = _model(rng, inputs=2), _x(rng, 8)
    z = np.zeros((4, 4, 6, 5), np.float32)
    with pytest.raises(BadInputError, match="batch 2 holds model input 'z', which batch 1 did not") as info:
        bnfold.fold(model, data=[{"x": x[:4]}, {"x": x[4:], "z": z}], dry_run=True, verify=False)
    assert "not model inputs" not in str(info.value)
