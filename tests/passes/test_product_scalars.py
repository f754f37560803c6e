"""MoveProductScalarsLeftPass: ``MatMul(a, b * c)`` becomes ``MatMul(a * c, b)``, equal in float within rounding;
a scaled operand that is read elsewhere, or a constant operand, is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.passes.canonicalize.product_scalars import MoveProductScalarsLeftPass


def _attention_scores(left_op: str | None, right_op: str, c_left: float, c_right: float, shared: bool = False):
    """``scores = (q [op] c_left) @ (k [op] c_right)``, with ``[1, 2, 3, 4] x [1, 2, 4, 5]`` operands."""
    nodes, inits = [], []
    left = "q"
    if left_op is not None:
        nodes.append(helper.make_node(left_op, ["q", "cl"], ["qs"]))
        inits.append(numpy_helper.from_array(np.array(c_left, np.float32), "cl"))
        left = "qs"
    nodes.append(helper.make_node(right_op, ["k", "cr"], ["ks"]))
    inits.append(numpy_helper.from_array(np.array(c_right, np.float32), "cr"))
    nodes.append(helper.make_node("MatMul", [left, "ks"], ["scores"]))
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, 3, 5])]
    if shared:
        nodes.append(helper.make_node("Neg", ["ks"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, 2, 4, 5]))
    graph = helper.make_graph(
        nodes, "scores", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 3, 4]),
                          helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, 4, 5])],
        outputs, initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _moved(model: onnx.ModelProto) -> tuple[onnx.ModelProto, ir.Model, bool]:
    graph = ir.serde.deserialize_model(model)
    result = MoveProductScalarsLeftPass()(graph)
    return ir.serde.serialize_model(result.model), result.model, result.modified


@settings(max_examples=25, deadline=None)
@given(
    left_op=st.sampled_from([None, "Mul", "Div"]),
    right_op=st.sampled_from(["Mul", "Div"]),
    c_left=st.floats(0.05, 4.0),
    c_right=st.floats(0.05, 4.0),
    seed=st.integers(0, 1000),
)
def test_the_factor_moves_left_and_the_scores_stay(left_op, right_op, c_left, c_right, seed):
    model = _attention_scores(left_op, right_op, c_left, c_right)
    rng = np.random.default_rng(seed)
    feeds = {
        "q": rng.normal(size=(1, 2, 3, 4)).astype(np.float32),
        "k": rng.normal(size=(1, 2, 4, 5)).astype(np.float32),
    }
    moved, graph, modified = _moved(model)
    assert modified
    product = next(n for n in graph.graph if n.op_type == "MatMul")
    assert product.inputs[1].name == "k"  # the right operand read as it is
    assert sum(n.op_type in ("Mul", "Div") for n in graph.graph) == 1  # one scalar, on the left
    onnx.checker.check_model(moved)
    np.testing.assert_allclose(_run(moved, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_scaled_operand_read_elsewhere_stays():
    model = _attention_scores("Mul", "Mul", 0.5, 0.5, shared=True)
    _, graph, modified = _moved(model)
    assert not modified
    product = next(n for n in graph.graph if n.op_type == "MatMul")
    assert product.inputs[1].name == "ks"
