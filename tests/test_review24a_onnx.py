"""Review 24a (hostile ONNX/CLI review): an opset-9 training BN whose saved_mean/saved_var output
is read; names with line breaks in the plan table."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import init, make_model, vi
from onnx import helper

from bnfold.api import fold
from bnfold.errors import UnsupportedModelError

C = 4


def _conv_bn(rng, outputs, extra_outputs=(), opset=9, bn_name="bn", conv_name="conv"):
    p = {"s": rng.uniform(0.5, 2, C), "b": rng.standard_normal(C), "m": rng.standard_normal(C),
         "v": rng.uniform(0.5, 2, C)}
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32))]
    inits += [init(f"bn_{k}", v.astype(np.float32)) for k, v in p.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name=conv_name),
             helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], outputs, name=bn_name)]
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", 4)] + [vi(o, 1) for o in extra_outputs],
                      inits, opset=opset)


@pytest.mark.parametrize("read", ["sm", "sv"])
def test_saved_stats_output_read_is_refused_in_one_line(tmp_path, read):
    rng = np.random.default_rng(0)
    m = _conv_bn(rng, ["y", "rm", "rv", "sm", "sv"], extra_outputs=(read,))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    data = tmp_path / "cal.npz"
    np.savez(data, x=rng.standard_normal((8, 3, 6, 6)).astype(np.float32))
    out = tmp_path / "out.onnx"
    for args in (["fold", path, "-o", out, "--data", data], ["fold", path, "--dry-run", "--data", data],
                 ["inspect", path]):
        r = run_cli(*args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and read in lines[0] and "saved" in lines[0] and "onnxruntime" not in lines[0], lines
    assert not out.exists()
    with pytest.raises(UnsupportedModelError):
        fold(m, data={"x": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)}, dry_run=True)


def test_saved_stats_outputs_unread_still_fold(tmp_path):
    rng = np.random.default_rng(1)
    m = _conv_bn(rng, ["y", "rm", "rv", "sm", "sv"])
    res = fold(m, data={"x": rng.standard_normal((8, 3, 6, 6)).astype(np.float32)}, output=tmp_path / "o.onnx")
    assert [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node] == ["Conv"]
    assert res is not None


def test_plan_table_keeps_one_line_per_bn_for_names_with_line_breaks(tmp_path):
    rng = np.random.default_rng(2)
    m = _conv_bn(rng, ["y"], opset=17, bn_name="bn\nnext\x1b[31mred\r", conv_name="conv\nx")
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    for args in (["inspect", path], ["fold", path, "--dry-run"]):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        rows = [line for line in r.stdout.splitlines() if "folded" in line and "BN found" not in line]
        assert len(rows) == 1, r.stdout
        assert "\\n" in rows[0] and "\x1b" not in r.stdout and "\r" not in r.stdout


def test_unknown_rank_input_message_names_the_cli_flags(tmp_path):
    rng = np.random.default_rng(3)
    m = _conv_bn(rng, ["y"], opset=17)
    del m.graph.input[:]
    m.graph.input.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    r = run_cli("fold", path, "-o", tmp_path / "o.onnx")
    assert r.returncode == 3
    assert "--input-shape x:" in r.stderr and "or --data" in r.stderr and "data argument" not in r.stderr, r.stderr


def test_output_at_a_data_file_names_the_model_it_belongs_to(tmp_path):
    rng = np.random.default_rng(4)
    m = _conv_bn(rng, ["y"], opset=17)
    path = tmp_path / "m.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    data = tmp_path / "m.onnx.data"
    before = data.read_bytes()
    r = run_cli("fold", path, "-o", data)
    assert r.returncode == 3 and data.read_bytes() == before
    assert f"is a data file of the input model {path};" in r.stderr, r.stderr


def test_float_data_feeds_a_bfloat16_input_as_the_message_says():
    """'floating data may be any float type' held for float16/32/64 inputs but not bfloat16 (numpy
    kind 'V'): float32 data was refused with 'save the data as bfloat16', which numpy cannot save."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from bnfold.data.sources import _dtype_rule, cast_checked
    from bnfold.errors import BadInputError
    from bnfold.records import InputSpec

    bf16 = np.dtype(ml_dtypes.bfloat16)
    spec = InputSpec("x", bf16, (None, 3))
    for src in (np.float32, np.float64, np.float16):
        _dtype_rule("'d.npz'", "x", np.dtype(src), spec)
    out = cast_checked(spec, np.ones((2, 3), np.float32), "in batch 0")
    assert out.dtype == bf16 and out.flags.c_contiguous
    with pytest.raises(BadInputError, match="NaN or Inf"):
        cast_checked(spec, np.array([[np.nan, 1, 1]], np.float32), "in batch 0")
    with pytest.raises(BadInputError, match="overflows the model's bfloat16"):
        cast_checked(spec, np.array([[1e300, 1, 1]], np.float64), "in batch 0")
    with pytest.raises(BadInputError, match="dtype int64"):
        _dtype_rule("'d.npz'", "x", np.dtype(np.int64), spec)
