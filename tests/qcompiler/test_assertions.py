"""The testing assertions themselves: a tolerance that lets a wrong graph through, or fails a right one, makes every
property test that uses it meaningless."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.testing import assert_within_quantization_step

STEP = 0.00010515192843740806  # an int16 output step a generated CNN drew


def _dequantize(offset: int) -> onnx.ModelProto:
    """x (int16) + offset, dequantized at STEP: two such graphs differ by their offsets' difference in steps."""
    nodes = [
        helper.make_node("Add", ["x", "offset"], ["shifted"]),
        helper.make_node("DequantizeLinear", ["shifted", "scale", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.INT16, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [
            numpy_helper.from_array(np.array(offset, np.int16), "offset"),
            numpy_helper.from_array(np.array(STEP, np.float32), "scale"),
            numpy_helper.from_array(np.array(0, np.int16), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


FAR_FROM_ZERO = [{"x": np.array([12840, -30000, 0, 32000], np.int16)}]


def test_one_step_apart_far_from_zero_passes() -> None:
    """One int16 step at 12841 steps from zero: float32 dequantization adds ~1e-3 step of rounding, not an error."""
    worst = assert_within_quantization_step(_dequantize(1), _dequantize(0), FAR_FROM_ZERO)
    assert worst == pytest.approx(1.0, abs=5e-3)


def test_two_steps_apart_fails() -> None:
    with pytest.raises(AssertionError, match="steps from the QDQ graph"):
        assert_within_quantization_step(_dequantize(2), _dequantize(0), FAR_FROM_ZERO)
