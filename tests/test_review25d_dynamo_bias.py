"""review25d: the dynamo exporter (optimize=False) writes a bias-free Conv's bias as
Expand(CastLike(Constant 0, x), shape); that bias is a constant, so the BN after it folds."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex


def _graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("CastLike", ["zero", "relu"], ["zc"]),
        helper.make_node("Shape", ["w"], ["shp"], start=0, end=1),
        helper.make_node("Expand", ["zc", "shp"], ["bias"]),
        helper.make_node("Conv", ["relu", "w", "bias"], ["y"], group=4, pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "g", [x], [y], [w])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_expand_castlike_zero_bias_is_constant() -> None:
    m = _graph()
    c = Constants(GraphIndex(m.graph, 18))
    v = c.value("bias")
    assert v is not None and v.dtype == np.float32 and v.shape == (4,) and not v.any()
