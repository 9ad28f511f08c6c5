"""Review 25g: a grouped float64 ConvTranspose, which onnxruntime's CPU provider cannot run, is
evaluated by onnx's reference evaluator; onnx 1.23's ConvTranspose computes ``group > 1`` wrongly
(weight sliced by output channels, the whole bias added to every group, one channel per group), so
an exact fold failed verification (exit 1) or the reference raised (exit 3), and calibration of a
training BN after such a layer could not run. bnfold's ReferenceSession now runs each group alone."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import reference_eval
from cli_run import run_cli
from fuzz_graphs import Case, build

from bnfold.verification.reference_session import ReferenceSession


def _case(training: bool = False, **kw: object) -> Case:
    base: dict[str, object] = dict(op="ConvTranspose", dtype="float64", where="after", chain=(), shared=False,
                                   training=training, bias=True, groups=2, cin_g=1, cout_g=1, kernel=(2, 3, 1),
                                   strides=(1, 1, 2), dilations=(1, 2, 2), pads=(0,) * 6, out_pad=(0, 0, 1),
                                   spatial=(3, 5, 2), seed=3611)
    base.update(kw)
    return Case(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("groups,cin_g,cout_g,bias", list(itertools.product([2, 3], [1, 2], [1, 2], [False, True])))
def test_reference_session_grouped_conv_transpose_matches_spec(groups: int, cin_g: int, cout_g: int,
                                                               bias: bool) -> None:
    built = build(_case(groups=groups, cin_g=cin_g, cout_g=cout_g, bias=bias, kernel=(2, 3), strides=(2, 1),
                        dilations=(1, 2), pads=(0, 1, 1, 0), out_pad=(1, 0), spatial=(3, 5)))
    x = np.random.default_rng(0).standard_normal((2, *built.input_shape))
    want = next(iter(reference_eval.evaluate(built.model, {"x": x}).values()))
    got = ReferenceSession(built.model).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_fold_grouped_float64_conv_transpose_verifies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m.onnx"
    onnx.save(build(_case()).model, model)
    r = run_cli("fold", model, "-o", tmp_path / "f.onnx")
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout
    assert (tmp_path / "f.onnx").exists()


def test_calibrate_training_bn_after_grouped_float64_conv_transpose(tmp_path) -> None:  # type: ignore[no-untyped-def]
    built = build(_case(training=True, cin_g=2, cout_g=2))
    model = tmp_path / "m.onnx"
    onnx.save(built.model, model)
    x = np.random.default_rng(1).standard_normal((8, *built.input_shape))
    np.savez(tmp_path / "c.npz", x=x)
    r = run_cli("fold", model, "-o", tmp_path / "f.onnx", "--data", tmp_path / "c.npz",
                "--frozen-output", tmp_path / "fr.onnx")
    assert r.returncode == 0, r.stderr
    # the calibrated statistics are those of the spec's ConvTranspose output
    conv_only = onnx.load(model)
    pre = next(n for n in conv_only.graph.node if n.op_type == "BatchNormalization").input[0]
    act = reference_eval.evaluate(conv_only, {"x": x}, outputs=[pre])[pre]
    frozen = onnx.load(tmp_path / "fr.onnx")
    bn = next(n for n in frozen.graph.node if n.op_type == "BatchNormalization")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in frozen.graph.initializer}
    axes = (0, *range(2, act.ndim))
    np.testing.assert_allclose(inits[bn.input[3]], act.mean(axis=axes), rtol=1e-9, atol=1e-12)
