"""``compile(..., integer_only=False)``: ops the integer path cannot lower stay in float between DequantizeLinear
and QuantizeLinear (float islands), listed in the report; the default refuses them by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.dialect import run_reference
from qcompiler.errors import UnsupportedOpError
from qcompiler.passes.lower import float_islands, float_ops_inside

pytestmark = pytest.mark.tvm
ROWS, WIDTH = 4, 6


def _model() -> onnx.ModelProto:
    """Gemm -> Atan (no integer lowering) -> Gemm."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["a"]),
            helper.make_node("Atan", ["a"], ["b"], name="the_atan"),
            helper.make_node("Gemm", ["b", "w2"], ["y"]),
        ],
        "island",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, WIDTH])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((ROWS, WIDTH)).astype(np.float32)} for _ in range(count)]


def test_the_default_refuses_the_node_by_name() -> None:
    with pytest.raises(UnsupportedOpError, match="the_atan.*Atan"):
        qcompiler.compile(_model(), calibration=_batches(4, 0), recipe="w8a8", progress=False)


def test_integer_only_false_keeps_the_op_in_float_and_reports_it() -> None:
    compiled = qcompiler.compile(
        _model(), calibration=_batches(4, 0), recipe="w8a8", progress=False, integer_only=False
    )
    islands = compiled.report["float_islands"]
    assert [(i["node"], i["op"]) for i in islands] == [("the_atan", "Atan")] and "Atan" in islands[0]["reason"]
    integer = ir.serde.deserialize_model(compiled.integer_model)
    assert float_islands(integer) == islands
    assert float_ops_inside(integer) == []  # only the island and its own Q/DQ compute on floats
    ops = [n.op_type for n in integer.graph]
    assert ops.count("Atan") == 1 and "QGemm" in ops  # the linears are still integer
    session_float = onnx.reference.ReferenceEvaluator(_model())
    for feeds in _batches(3, 5):
        ours = compiled(feeds["x"])
        reference = run_reference(compiled.integer_model, feeds)[0]
        step = float(np.abs(reference).max()) / 127
        assert np.abs(ours - reference).max() <= step * 1.001  # TVM's float atan may round a tie apart
        want = session_float.run(None, feeds)[0]
        cosine = float((ours * want).sum() / np.linalg.norm(ours) / np.linalg.norm(want))
        assert cosine > 0.99


def test_without_islands_the_report_says_none() -> None:
    model = _model()
    model.graph.node[1].op_type = "Tanh"  # on the integer path (a lookup table)
    compiled = qcompiler.compile(model, calibration=_batches(4, 0), recipe="w8a8", progress=False, integer_only=False)
    assert compiled.report["float_islands"] == []
    assert "Tanh" not in [n.op_type for n in compiled.integer_model.graph.node]
