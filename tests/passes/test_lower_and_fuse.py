"""Dyadic lowering and integer fusion: structure, exactness against the QDQ graph, near misses."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.dialect import DOMAIN
from qcompiler.errors import UnsupportedOpError
from qcompiler.passes.fuse import FuseIntegerLinearPass
from qcompiler.passes.lower import LowerQDQToIntegerPass, float_ops_inside
from qcompiler.pipeline import run_model
from qcompiler.testing import assert_within_quantization_step


def _qdq_conv_residual() -> ir.Model:
    """Hand-written QDQ graph: conv -> relu (fused), residual add, global average pool."""
    rng = np.random.default_rng(0)
    sx, sy, sr, sp = np.float32(0.05), np.float32(0.04), np.float32(0.06), np.float32(0.03)
    w = rng.integers(-127, 128, (3, 3, 3, 3)).astype(np.int8)
    sw = rng.uniform(0.001, 0.01, 3).astype(np.float32)
    bias = rng.integers(-200, 200, 3).astype(np.int32)
    z8 = np.array(0, np.int8)
    inits = {
        "sx": sx,
        "sy": sy,
        "sr": sr,
        "sp": sp,
        "z": z8,
        "w": w,
        "sw": sw,
        "zw": np.zeros(3, np.int8),
        "b": bias,
        "sb": (sx * sw).astype(np.float32),
        "zb": np.zeros(3, np.int32),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "z"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "sy", "z"], ["rd"]),
        helper.make_node("Add", ["rd", "xd"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "sr", "z"], ["sq"]),
        helper.make_node("DequantizeLinear", ["sq", "sr", "z"], ["sd"]),
        helper.make_node("GlobalAveragePool", ["sd"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "sp", "z"], ["pq"]),
        helper.make_node("DequantizeLinear", ["pq", "sp", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 1])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def test_lowering_structure_and_step_bound() -> None:
    qdq = _qdq_conv_residual()
    qdq_proto = ir.serde.serialize_model(qdq)
    lowered = LowerQDQToIntegerPass()(qdq).model
    ops = [(n.domain, n.op_type) for n in lowered.graph]
    assert ops == [
        ("", "QuantizeLinear"),
        ("", "ConvInteger"),
        ("", "Add"),
        (DOMAIN, "Requantize"),
        (DOMAIN, "RescaleAdd"),
        ("", "Cast"),
        ("", "ReduceSum"),
        (DOMAIN, "Requantize"),
        ("", "DequantizeLinear"),
    ]
    assert float_ops_inside(lowered) == []
    requant = next(n for n in lowered.graph if n.op_type == "Requantize")
    assert requant.attributes.get_int("lo") == 0  # the ReLU became the clamp
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.uniform(-6, 6, (1, 3, 6, 6)).astype(np.float32)} for _ in range(10)]
    assert_within_quantization_step(qdq_proto, lowered, feeds)


def test_fusion_is_exact_and_complete() -> None:
    lowered = LowerQDQToIntegerPass()(_qdq_conv_residual()).model
    rng = np.random.default_rng(2)
    feeds = {"x": rng.uniform(-6, 6, (1, 3, 6, 6)).astype(np.float32)}
    before = run_model(lowered, feeds)[0]
    result = FuseIntegerLinearPass()(lowered)
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert "QConv" in ops and "ConvInteger" not in ops and ops.count("Requantize") == 1  # the pool's stays
    np.testing.assert_array_equal(run_model(result.model, feeds)[0], before)
    assert not FuseIntegerLinearPass()(result.model).modified  # idempotent


def test_asymmetric_activation_is_rejected_by_name() -> None:
    model = _qdq_conv_residual()
    zero = model.graph.initializers["z"]
    zero.const_value = ir.tensor(np.array(3, np.int8), name="z")
    with pytest.raises(UnsupportedOpError, match="non-zero zero point"):
        LowerQDQToIntegerPass()(model)


def test_float_op_without_qdq_is_rejected() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="lonely_relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(UnsupportedOpError, match="lonely_relu.*not dequantized"):
        LowerQDQToIntegerPass()(model)
