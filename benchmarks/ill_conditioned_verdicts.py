"""Issue 15 point 1: verdicts on correct folds of ill-conditioned layers, with and without the noise floor.

Cases (10 seeds each):
* ``onnxscript``: one Conv(64 -> 256, 3x3) + BN with onnxscript's fuse_batchnorm test parameters
  (weights, gamma, beta, mean ~ N(0,1), var = |N(0,1)|: some channels have a tiny variance, so a
  huge scale), input N(0,1) [1, 64, 8, 8];
* ``maxpool``: MaxPool, then two Conv+BN branches (128 channels each) added;
* ``offset``: Conv2d(3,4,1) with bias 3000 + training-mode BN calibrated on N(0,1) data.

For each: the verdict of ``bnfold.fold`` by default (noise floor) and with ``noise_floor=False``
(the strict rule, the behaviour before), and the folded model's and the frozen model's max
relative error against a float64 evaluation (``onnx.reference`` on a float64 copy), which says
the folds are correct. Run: ``python benchmarks/ill_conditioned_verdicts.py``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bnfold

F = onnx.TensorProto.FLOAT


def _bn(name: str, x: str, y: str, c: int, rng: np.random.Generator, training: bool = False) -> tuple:
    p = {"s": rng.standard_normal(c), "b": rng.standard_normal(c), "m": rng.standard_normal(c),
         "v": np.abs(rng.standard_normal(c))}
    inits = [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in p.items()]
    node = helper.make_node("BatchNormalization", [x, *(f"{name}.{k}" for k in p)], [y], name=name,
                            **({"training_mode": 1} if training else {}))
    return node, inits


def onnxscript_case(seed: int) -> tuple[onnx.ModelProto, dict | None]:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((256, 64, 3, 3)).astype(np.float32), "w")
    bn, inits = _bn("bn", "c", "y", 256, rng)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), bn], "g",
                          [helper.make_tensor_value_info("x", F, [1, 64, 8, 8])],
                          [helper.make_tensor_value_info("y", F, [1, 256, 8, 8])], [w, *inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), None


def maxpool_case(seed: int) -> tuple[onnx.ModelProto, dict | None]:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool")]
    inits = []
    for k in range(2):
        inits.append(numpy_helper.from_array(rng.standard_normal((128, 64, 3, 3)).astype(np.float32), f"w{k}"))
        nodes.append(helper.make_node("Conv", ["p", f"w{k}"], [f"c{k}"], name=f"conv{k}", pads=[1] * 4))
        bn, bi = _bn(f"bn{k}", f"c{k}", f"b{k}", 128, rng)
        nodes.append(bn)
        inits += bi
    nodes.append(helper.make_node("Add", ["b0", "b1"], ["y"], name="add"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 64, 16, 16])],
                          [helper.make_tensor_value_info("y", F, [1, 128, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), None


def offset_case(seed: int) -> tuple[onnx.ModelProto, dict | None]:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.full(4, 3000, np.float32), "cb")
    bn, inits = _bn("bn", "c", "y", 4, rng, training=True)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv"), bn], "g",
                          [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", F, ["N", 4, 8, 8])], [w, b, *inits])
    data = {"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)}
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), data


def _as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == F:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        if v.type.tensor_type.elem_type == F:
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del m.graph.value_info[:]
    return m


def _rel(model: onnx.ModelProto, oracle: onnx.ModelProto, x: np.ndarray) -> float:
    got = ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float64)
    ref = ReferenceEvaluator(oracle).run(None, {"x": x.astype(np.float64)})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def main() -> None:
    for name, make in (("onnxscript", onnxscript_case), ("maxpool", maxpool_case), ("offset", offset_case)):
        default_fail = strict_fail = 0
        worst_folded = worst_frozen = 0.0
        for seed in range(10):
            model, data = make(seed)
            strict = bnfold.fold(model, data=data, verify_config=bnfold.VerifyConfig(noise_floor=False))
            res = bnfold.fold(model, data=data)
            strict_fail += not strict.ok
            default_fail += not res.ok
            frozen_ref = model if data is None else None
            x = (data["x"][:2] if data else np.random.default_rng(seed + 99).standard_normal(
                [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32))
            if frozen_ref is not None:
                oracle = _as_float64(model)
                worst_frozen = max(worst_frozen, _rel(model, oracle, x))
                assert res.model is not None
                worst_folded = max(worst_folded, _rel(res.model, oracle, x))
        line = (f"{name:10s} seeds 10: strict rule (before) FAILED {strict_fail}/10, default (noise floor) FAILED "
                f"{default_fail}/10")
        if worst_frozen:
            line += f"; vs float64: folded {worst_folded:.2e}, unfolded {worst_frozen:.2e} (max rel)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
