"""Issue 17 point 2: ``bnfold.fold(..., data=ITERABLE)`` and ``inspect`` read any iterable of batches
(a generator, a list, a torch DataLoader; dicts, bare arrays or tensors), with the sample count
unknown up front, and give exactly the statistics the same samples give from an .npz."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import init, make_model, rand, vi
from onnx import helper

import bnfold
from bnfold.api import fold, inspect
from bnfold.errors import BadInputError

EPS = 1e-5


def _model(rng: np.random.Generator, batch: int | str = "N", inputs: int = 1) -> onnx.ModelProto:
    """conv -> training BN 'bn' (-> + second input 'z' when ``inputs == 2``)."""
    w = rand(rng, 4, 3, 3, 3)
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    vals = [rng.uniform(0.5, 2, 4), rng.standard_normal(4), np.zeros(4), np.ones(4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", *names], ["y" if inputs == 1 else "b", "rm", "rv"],
                              name="bn", epsilon=EPS, training_mode=1)]
    ins = [vi("x", [batch, 3, 6, 5])]
    if inputs == 2:
        nodes.append(helper.make_node("Add", ["b", "z"], ["y"], name="add"))
        ins.append(vi("z", [batch, 4, 6, 5]))
    return make_model(nodes, ins, [vi("y", 4)], [init("w", w)] + [init(n, v.astype(np.float32))
                                                                     for n, v in zip(names, vals)])


def _x(rng: np.random.Generator, n: int = 10) -> np.ndarray:
    return (rng.standard_normal((n, 3, 6, 5)) * 2 + 1).astype(np.float32)


def _stats(result: bnfold.FoldResult) -> tuple[np.ndarray, np.ndarray, int, int]:
    [rec] = [r for r in result.report.bns if r.stats is not None]
    return rec.stats.mean, rec.stats.var, rec.stats.samples, rec.stats.batches


def _gen(x: np.ndarray, step: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(x), step):
        yield {"x": x[i:i + step]}


@pytest.fixture
def npz_reference(rng: np.random.Generator, tmp_path: Path) -> tuple[onnx.ModelProto, np.ndarray, tuple]:
    model, x = _model(rng), _x(rng)
    np.savez(tmp_path / "d.npz", x=x)
    ref = fold(model, data=tmp_path / "d.npz", batch_size=4, verify=False, dry_run=True)
    return model, x, _stats(ref)


def _same(result: bnfold.FoldResult, ref: tuple) -> None:
    # the same samples in the same batches reach onnxruntime: the float64 sums are bitwise equal
    mean, var, samples, batches = _stats(result)
    np.testing.assert_array_equal(mean, ref[0])
    np.testing.assert_array_equal(var, ref[1])
    assert (samples, batches) == (ref[2], ref[3])


def test_generator_equals_npz(npz_reference: tuple) -> None:
    model, x, ref = npz_reference
    result = fold(model, data=_gen(x, 4), verify=False, dry_run=True)  # as given: 4, 4, 2
    _same(result, ref)
    assert result.report.extra["calibration_samples"] == 10 and result.report.batch_size == 4


def test_generator_rechunked_to_batch_size(npz_reference: tuple) -> None:
    model, x, ref = npz_reference
    _same(fold(model, data=_gen(x, 3), batch_size=4, verify=False, dry_run=True), ref)  # 3,3,3,1 -> 4,4,2


def test_list_of_bare_arrays_and_tensors(npz_reference: tuple) -> None:
    torch = pytest.importorskip("torch")
    model, x, ref = npz_reference
    _same(fold(model, data=[x[:4], x[4:8], x[8:]], verify=False, dry_run=True), ref)
    _same(fold(model, data=[torch.from_numpy(x[i:i + 4]) for i in (0, 4, 8)], verify=False, dry_run=True), ref)
    _same(fold(model, data=({"x": torch.from_numpy(x[i:i + 2])} for i in range(0, 10, 2)), batch_size=4,
               verify=False, dry_run=True), ref)


def test_torch_dataloaders(npz_reference: tuple) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    model, x, ref = npz_reference
    _same(fold(model, data=DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=4), verify=False,
               dry_run=True), ref)

    class Dicts(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> dict[str, object]:
            return {"x": torch.from_numpy(x[i])}

    _same(fold(model, data=DataLoader(Dicts(), batch_size=4), verify=False, dry_run=True), ref)


def test_one_shot_generator_verifies_with_the_noise_floor(rng: np.random.Generator, tmp_path: Path) -> None:
    """The generator is read once: verification feeds come from the samples kept while streaming."""
    model, x = _model(rng), _x(rng)
    reads = []

    def gen() -> Iterator[dict[str, np.ndarray]]:
        reads.append(1)
        yield from _gen(x, 4)

    result = fold(model, data=gen(), verify_samples=3, output=tmp_path / "o.onnx")
    assert result.ok and result.report.verification is not None
    assert result.report.verification.settings["noise_floor"] != "off"
    assert reads == [1]
    np.savez(tmp_path / "d.npz", x=x)
    ref = fold(model, data=tmp_path / "d.npz", batch_size=4, verify_samples=3, output=tmp_path / "r.onnx")
    _same(result, _stats(ref))
    assert result.report.verification.inputs["samples"] == 3


def test_progress_without_a_total(npz_reference: tuple) -> None:
    model, x, _ = npz_reference
    calls: list[tuple[int, int | None]] = []
    fold(model, data=_gen(x, 4), verify=False, dry_run=True, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, None), (1, None), (2, None), (3, None)]


def test_inspect_drift_from_a_stream(npz_reference: tuple, tmp_path: Path) -> None:
    model, x, _ = npz_reference
    rows = inspect(model, data=_gen(x, 4))
    npz = inspect(model, data=tmp_path / "d.npz", batch_size=4)
    assert rows[0].drift == npz[0].drift


def test_fixed_batch_model_rechunks_and_drops_the_tail(rng: np.random.Generator, tmp_path: Path) -> None:
    model, x = _model(rng, batch=4), _x(rng)
    np.savez(tmp_path / "d.npz", x=x)
    ref = fold(model, data=tmp_path / "d.npz", verify=False, dry_run=True)
    result = fold(model, data=_gen(x, 3), verify=False, dry_run=True)
    _same(result, _stats(ref))
    assert any("the last 2 calibration sample(s) were not used" in w for w in result.report.warnings)
    with pytest.raises(BadInputError, match="fixed batch size of 4; use batch_size=4"):
        fold(model, data=_gen(x, 3), batch_size=3, verify=False, dry_run=True)
    with pytest.raises(BadInputError, match="3 calibration samples, fewer than the model's fixed batch size 4"):
        fold(model, data=_gen(x[:3], 3), verify=False, dry_run=True)


def test_second_pass_reads_a_list_again_but_not_a_generator(rng: np.random.Generator) -> None:
    from bnfold.data.stream import StreamData, StreamSource
    from bnfold.onnx.runtime import input_specs

    model, x = _model(rng), _x(rng)
    specs = input_specs(model)
    listed = StreamData(StreamSource([{"x": x[:4]}, {"x": x[4:]}]), specs, None)
    assert [b["x"].shape[0] for b in listed] == [4, 6] and [b["x"].shape[0] for b in listed] == [4, 6]
    assert listed.num_batches == 2 and listed.num_samples == 10
    np.testing.assert_array_equal(listed.take(7)["x"], x[:7])  # re-read: more than was kept
    once = StreamData(StreamSource(_gen(x, 4)), specs, None, keep=2)
    assert once.num_batches is None
    assert sum(b["x"].shape[0] for b in once) == 10 and once.num_batches == 3
    np.testing.assert_array_equal(once.take(2)["x"], x[:2])
    with pytest.raises(BadInputError, match="one-shot iterator .* was already read; pass a list or a DataLoader"):
        list(once)
    with pytest.raises(BadInputError, match="only 4 were kept; pass a list or a DataLoader"):
        once.take(5)
    ahead = StreamData(StreamSource(_gen(x, 4)), specs, 3)  # take before the pass reads ahead, nothing lost
    np.testing.assert_array_equal(ahead.take(5)["x"], x[:5])
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in ahead]), x)


def test_stream_may_leave_out_an_input_that_is_not_samples(rng: np.random.Generator, tmp_path: Path) -> None:
    """As with files: a static-shape input (here s[4,1,1], added after the BN) need not be in the data."""
    model = _model(rng, inputs=2)
    model.graph.input[1].CopyFrom(vi("z", [4, 1, 1]))
    x = _x(rng)
    np.savez(tmp_path / "d.npz", x=x)
    ref = fold(model, data=tmp_path / "d.npz", batch_size=4, verify=False, dry_run=True)
    _same(fold(model, data=_gen(x, 4), verify=False, dry_run=True), _stats(ref))


def test_progress_bar_without_a_total_shows_the_batch_number() -> None:
    import io

    from bnfold.cli.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream, min_interval=0.0)
    bar(12, None)
    assert stream.getvalue() == "\rcalibrating batch 12" and "/" not in stream.getvalue()
