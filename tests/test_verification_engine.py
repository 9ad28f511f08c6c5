"""Verification engine (issue 3): verdicts, localisation, providers, tolerances, repro bundle.

Reference models are inference-mode Conv->BN->Relu chains built with onnx.helper; candidates are
what bnfold folds from them, or that with one weight deliberately perturbed.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FLOAT16, bn, bn_params, init, make_model, rand, vi
from onnx import numpy_helper

import bnfold.api as api
from bnfold.api import fold
from bnfold.errors import BadInputError, ProviderUnavailable
from bnfold.verification.config import VerifyConfig
from bnfold.verification.engine import verify

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _chain(rng, blocks=3, c=4, dtype=np.float32, elem=None):
    """x -> [Conv(pads=1) -> BN -> Relu] * blocks -> y, inference-mode BN."""
    nodes, inits = [], []
    cur = "x"
    for k in range(blocks):
        w = (rng.standard_normal((c, c, 3, 3)) * 0.3).astype(dtype)
        inits.append(init(f"w{k}", w))
        nodes.append(onnx.helper.make_node("Conv", [cur, f"w{k}"], [f"z{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]))
        p = {key: v.astype(dtype) for key, v in bn_params(rng, c).items()}
        node, bi = bn(f"bn{k}", f"z{k}", f"b{k}", p)
        nodes.append(node)
        inits += bi
        out = "y" if k == blocks - 1 else f"r{k}"
        nodes.append(onnx.helper.make_node("Relu", [f"b{k}"], [out], name=f"relu{k}"))
        cur = out
    et = elem or onnx.TensorProto.FLOAT
    return make_model(nodes, [vi("x", ["N", c, 6, 6], et)], [vi("y", ["N", c, 6, 6], et)], inits)


@pytest.fixture
def pair(rng, tmp_path):
    """(reference path, folded candidate path)."""
    ref = tmp_path / "ref.onnx"
    onnx.save(_chain(rng), ref)
    cand = tmp_path / "folded.onnx"
    res = fold(ref, output=cand)
    assert res.ok and res.report.folded == 3
    return ref, cand


def _perturb(src, dst, weight: str, delta: float):
    m = onnx.load(src)
    for t in m.graph.initializer:
        if t.name == weight:
            w = numpy_helper.to_array(t).copy()
            w.flat[0] += delta
            t.CopyFrom(numpy_helper.from_array(w, t.name))
            break
    else:
        raise AssertionError(f"no initializer {weight}")
    onnx.save(m, dst)


def _feeds(rng, n=3):
    return [{"x": rand(rng, 1, 4, 6, 6)} for _ in range(n)]


def test_exact_candidate_passes_with_every_figure(pair, rng):
    ref, cand = pair
    res = verify(ref, cand, _feeds(rng))
    assert res.passed and res.samples == 3
    [run] = res.runs
    assert run.status == "ran" and run.used[0] == "CPUExecutionProvider"
    [out] = run.outputs
    assert out.passed and out.max_abs < 1e-5 and out.mismatches == 0 and out.cosine > 0.999999
    assert res.settings["graph_optimization_level"] == "ORT_DISABLE_ALL"
    # every folded BN is a site, found from the two graphs alone, in network order, all passing
    assert [s.bn for s in res.sites] == ["bn0", "bn1", "bn2"]
    assert all(s.passed and s.direction == "backward" for s in res.sites)
    assert res.first_divergent_site is None
    assert len(res.inputs["sha256"]["x"]) == 64


def test_perturbed_weight_fails_and_localises_the_site(pair, rng, tmp_path):
    ref, cand = pair
    folded = onnx.load(cand)
    conv1_weight = next(n for n in folded.graph.node if n.name == "conv1").input[1]
    bad = tmp_path / "bad.onnx"
    _perturb(cand, bad, conv1_weight, 0.5)
    res = verify(ref, bad, _feeds(rng), VerifyConfig(repro_dir=str(tmp_path / "repro")))
    assert not res.passed
    assert res.first_divergent_site == "bn1"  # not bn0 (upstream, exact) and not bn2 (downstream)
    by = {s.bn: s for s in res.sites}
    assert by["bn0"].passed and not by["bn1"].passed
    assert by["bn1"].worst_channels[0][0] == 0  # w.flat[0] feeds output channel 0
    out = res.outputs[0]
    assert out.mismatches > 0 and out.min_atol > out.atol
    # repro bundle: the inputs as ONNX test data and the models' paths
    pb = tmp_path / "repro" / "test_data_set_0" / "input_0.pb"
    t = onnx.TensorProto()
    t.ParseFromString(pb.read_bytes())
    assert t.name == "x" and numpy_helper.to_array(t).shape == (1, 4, 6, 6)
    meta = json.loads((tmp_path / "repro" / "repro.json").read_text())
    assert meta["candidate"] == os.path.abspath(bad)


def test_per_output_tolerance_and_error_stat(pair, rng, tmp_path):
    ref, cand = pair
    folded = onnx.load(cand)
    w = next(n for n in folded.graph.node if n.name == "conv2").input[1]
    bad = tmp_path / "bad.onnx"
    _perturb(cand, bad, w, 0.05)
    feeds = _feeds(rng)
    assert not verify(ref, bad, feeds).passed
    # a loose per-output atol for 'y' passes; the global default still applies elsewhere
    loose = verify(ref, bad, feeds, VerifyConfig(atol=(None, {"y": 10.0}), localize=False))
    assert loose.passed and loose.outputs[0].atol == 10.0 and loose.outputs[0].rtol == 1e-4
    # one weight touches few elements: the median excess is within tolerance, the max is not
    median = verify(ref, bad, feeds, VerifyConfig(error_stat="median", localize=False))
    assert median.passed and median.outputs[0].error_stat == "median"


def test_fp16_model_passes_with_fp16_defaults(rng, tmp_path):
    ref = tmp_path / "ref16.onnx"
    onnx.save(_chain(rng, dtype=np.float16, elem=FLOAT16), ref)
    cand = tmp_path / "f16.onnx"
    res = fold(ref, output=cand)
    assert res.report.folded == 3
    v = res.report.verification
    assert v.passed and v.outputs[0].dtype == "float16"
    assert (v.outputs[0].atol, v.outputs[0].rtol) == (1e-2, 1e-2)
    # a fixed fp32-style 1e-6 tolerance alone fails this honest fold; the float16 noise floor (one
    # ulp of the fold sites' weights, issue 15) accepts it even at that tolerance
    feeds = [{"x": rand(rng, 1, 4, 6, 6).astype(np.float16)} for _ in range(3)]
    strict = verify(ref, cand, feeds, VerifyConfig(atol=(1e-6, {}), rtol=(1e-6, {}), localize=False,
                                                   noise_floor=False))
    assert not strict.passed
    floored = verify(ref, cand, feeds, VerifyConfig(atol=(1e-6, {}), rtol=(1e-6, {}), localize=False))
    assert floored.passed and floored.outputs[0].floor_max is not None


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA onnxruntime: the GPU path runs instead")
def test_missing_cuda_provider_is_exit_4_or_skipped(pair, rng):
    ref, cand = pair
    with pytest.raises(ProviderUnavailable) as info:
        verify(ref, cand, _feeds(rng), VerifyConfig(providers=("cpu", "cuda")))
    assert info.value.exit_code == 4
    res = verify(ref, cand, _feeds(rng), VerifyConfig(providers=("cpu", "cuda"), allow_missing_providers=True))
    assert res.passed
    assert [(r.provider, r.status) for r in res.runs] == [("cpu", "ran"), ("cuda", "skipped")]
    assert "CUDA" in res.runs[1].note


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU (runs on the lent GPU machine)")
def test_cuda_provider_runs_with_noise_floor(pair, rng):  # pragma: no cover - GPU only
    ref, cand = pair
    res = verify(ref, cand, _feeds(rng), VerifyConfig(providers=("cpu", "cuda")))
    cuda = res.runs[1]
    assert cuda.status == "ran" and cuda.used[0] == "CUDAExecutionProvider"
    assert dict(cuda.noise_floor)["y"] >= 0.0
    assert res.settings["cuda"]["cudnn_conv_algo_search"] == "DEFAULT"


def test_check_equivalence_random_inputs_are_seeded(pair):
    ref, cand = pair
    a = api.verify(ref, cand, seed=7, val_range=(-2.0, 2.0), iterations=2)
    b = api.verify(ref, cand, seed=7, val_range=(-2.0, 2.0), iterations=2)
    c = api.verify(ref, cand, seed=8, val_range=(-2.0, 2.0), iterations=2)
    assert a.passed and a.samples == 2
    assert a.inputs["sha256"] == b.inputs["sha256"] != c.inputs["sha256"]
    assert a.inputs["seed"] == 7 and a.inputs["val_range"] == [-2.0, 2.0]


def test_check_equivalence_with_data(pair, rng, tmp_path):
    ref, cand = pair
    np.savez(tmp_path / "d.npz", x=rand(rng, 5, 4, 6, 6))
    res = api.verify(ref, cand, data=tmp_path / "d.npz", batch_size=2)
    assert res.passed and res.samples == 5 and res.inputs["source"] == "data"
    with pytest.raises(BadInputError, match="LO must not exceed HI"):
        api.verify(ref, cand, val_range=(1.0, 0.0))


def test_different_interfaces_are_bad_input(pair, rng, tmp_path):
    ref, _ = pair
    other = tmp_path / "other.onnx"
    m = _chain(rng)
    m.graph.output[0].name = "renamed"
    m.graph.node[-1].output[0] = "renamed"
    onnx.save(m, other)
    with pytest.raises(BadInputError, match="different outputs"):
        verify(ref, other, _feeds(rng))


# ---- fold-site localisation on models with external data (the >2 GiB path, in small) --------


def _save_external(src, dst):
    m = onnx.load(src)
    onnx.save_model(m, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=0)


def test_sites_of_external_data_models_without_loading_weights(pair, rng, tmp_path, monkeypatch):
    """The site copies are built from the graphs alone; onnxruntime reads the weights from the
    models' folders (models in different folders, cwd elsewhere)."""
    ref, cand = pair
    folded = onnx.load(cand)
    conv1_weight = next(n for n in folded.graph.node if n.name == "conv1").input[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ext_ref, ext_bad = tmp_path / "a" / "ref.onnx", tmp_path / "b" / "bad.onnx"
    _save_external(ref, ext_ref)
    _perturb(cand, tmp_path / "bad_inline.onnx", conv1_weight, 0.5)
    _save_external(tmp_path / "bad_inline.onnx", ext_bad)
    assert (tmp_path / "b" / "bad.onnx.data").is_file()

    import bnfold.verification.engine as engine

    def no_full_load(*args, **kwargs):  # the weights must not be loaded into Python
        if kwargs.get("load_external_data", True):
            raise AssertionError("a model was loaded with its external data")
        return real_load(*args, **kwargs)

    real_load = onnx.load
    monkeypatch.setattr(engine.onnx, "load", no_full_load)
    monkeypatch.chdir(tmp_path)
    res = verify(ext_ref, ext_bad, _feeds(rng), VerifyConfig(localize=True))
    assert not res.passed
    assert [s.bn for s in res.sites] == ["bn0", "bn1", "bn2"]
    assert res.first_divergent_site == "bn1"


def test_sites_fall_back_to_a_file_copy(pair, rng, tmp_path, monkeypatch):
    """Where onnxruntime cannot take the external-data folder, the copy is written with weights."""
    import bnfold.verification.engine as engine

    ref, cand = pair
    ext_ref = tmp_path / "ext" / "ref.onnx"
    ext_ref.parent.mkdir()
    _save_external(ref, ext_ref)

    def refuse(*args, **kwargs):
        raise RuntimeError("no external-data folder option")

    monkeypatch.setattr(engine, "make_session_from_model", refuse)
    res = verify(ext_ref, cand, _feeds(rng))
    assert res.passed and [s.bn for s in res.sites] == ["bn0", "bn1", "bn2"]
    assert all(s.passed for s in res.sites)


def test_a_failing_localisation_never_hides_the_verdict(pair, rng, tmp_path, monkeypatch):
    import bnfold.verification.engine as engine

    ref, cand = pair

    def boom(*args, **kwargs):
        raise MemoryError("out of memory while exposing the sites")

    monkeypatch.setattr(engine, "with_outputs", boom)
    res = verify(ref, cand, _feeds(rng))
    assert res.passed and res.sites == () and res.first_divergent_site is None


def test_progress_is_reported_per_model_run(pair, rng):
    """Issue 15 point 5: a long verification (8192 samples) ran 6-11 s silent. ``config.progress`` is
    called after each model run on each batch (reference and candidate, each provider), ending at the
    total, and the verdict is the same with or without it."""
    ref, cand = pair
    feeds = _feeds(rng, n=5)
    calls: list[tuple[int, int]] = []
    res = verify(ref, cand, feeds, VerifyConfig(progress=lambda done, total: calls.append((done, total))))
    assert res.passed == verify(ref, cand, feeds).passed
    total = 2 * len(feeds)  # one provider: the reference's 5 runs, then the candidate's
    assert calls[-1] == (total, total) and {t for _, t in calls} == {total}
    assert [d for d, _ in calls] == list(range(1, total + 1))
