"""AveragePool (borders, both count_include_pad forms, strides, padding), the token mixer ``pool(x) - x`` and
InstanceNormalization (canonicalized to LayerNormalization): quantized, lowered to integers, within one step of
their simulation op by op, and TVM bit-exact with the reference. What the integer pool does not support is a named
refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.errors import UnsupportedOpError
from qcompiler.testing import assert_bit_exact, assert_lowering_matches, assert_within_quantization_step

SIDE = 6


def _model(nodes: list[onnx.NodeProto], inits: dict, out_shape: list[int]) -> onnx.ModelProto:
    """A Conv writing "a" [1, 3, SIDE, SIDE] from x, then ``nodes`` ending in "y"."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.5, **inits}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]), *nodes],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, SIDE, SIDE)).astype(np.float32)} for _ in range(count)]


def _check(model: onnx.ModelProto):
    from qcompiler.backends.tvm import build

    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_batches(4, 0), progress=False)
    probe = _batches(2, 9)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    return qdq, integer


#: attributes, output [H, W], whether the windows' divisors vary with the position
POOLS = {
    # poolformer's token mixer: every border window averages fewer values
    "3x3-pad1-exclude-pad": ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}, [6, 6], True),
    "3x3-pad1-include-pad": ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, [6, 6], False),
    "3x3-stride2-exclude-pad": (
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 0}, [3, 3], True,
    ),
    "2x3-asymmetric-pads": ({"kernel_shape": [2, 3], "pads": [0, 2, 1, 0]}, [6, 6], True),
    "2x2-stride2-no-pad": ({"kernel_shape": [2, 2], "strides": [2, 2]}, [3, 3], False),
    "3x3-same-upper-stride2": ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, [3, 3], True),
}  # fmt: skip


@pytest.mark.tvm
@pytest.mark.parametrize(("attributes", "out_side", "per_position"), POOLS.values(), ids=POOLS.keys())
def test_average_pool_lowers_to_an_integer_window_sum(
    attributes: dict, out_side: list[int], per_position: bool
) -> None:
    pool = helper.make_node("AveragePool", ["a"], ["p"], **attributes)
    _, integer = _check(_model([pool, helper.make_node("Relu", ["p"], ["y"])], {}, [1, 3, *out_side]))
    ops = [n.op_type for n in integer.graph]
    assert "AveragePool" not in ops and "Relu" not in ops  # the ReLU is the pool's clamp
    sums = [n for n in integer.graph if n.op_type in ("ConvInteger", "QConv")]
    assert len(sums) == 2 and all(n.inputs[0].dtype.name == "INT8" for n in sums)  # the block's Conv and the pool
    # per-position divisors: a Mul by L / n before the Requantize; one divisor: the sum fuses into one QConv
    assert ("Mul" in ops) == per_position and ops.count("QConv") == 1 + (not per_position)


@pytest.mark.tvm
def test_token_mixer_pool_minus_input_lowers_to_a_rescaled_difference() -> None:
    """PoolFormer's ``AveragePool(x) - x``: a RescaleAdd whose second multiplier is negative."""
    nodes = [
        helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("Sub", ["p", "a"], ["y"]),
    ]
    _, integer = _check(_model(nodes, {}, [1, 3, SIDE, SIDE]))
    difference = next(n for n in integer.graph if n.op_type == "RescaleAdd")
    multiplier_a, multiplier_b = (int(v.const_value.numpy()) for v in difference.inputs[2:4])
    assert multiplier_a > 0 > multiplier_b


@pytest.mark.tvm
def test_subtraction_of_a_constant_lowers_to_a_rescaled_difference() -> None:
    nodes = [helper.make_node("Sub", ["a", "c"], ["y"])]
    _check(_model(nodes, {"c": np.array([[[0.5]], [[-1.0]], [[2.0]]], np.float32)}, [1, 3, SIDE, SIDE]))


@pytest.mark.tvm
def test_instance_norm_lowers_as_an_integer_layer_norm() -> None:
    inits = {"s": np.array([1.5, 0.5, -1.0], np.float32), "b": np.array([0.25, 0.0, -0.5], np.float32)}
    nodes = [helper.make_node("InstanceNormalization", ["a", "s", "b"], ["y"], epsilon=1e-5)]
    qdq, integer = _check(_model(nodes, inits, [1, 3, SIDE, SIDE]))
    assert "InstanceNormalization" not in {n.op_type for n in qdq.graph}
    assert [n.op_type for n in integer.graph].count("IntLayerNorm") == 1


@pytest.mark.tvm
def test_group_norm_with_one_group_as_torch_exports_it() -> None:
    """``Reshape [N, 1, C*H*W] -> InstanceNormalization -> Reshape back -> Mul gamma -> Add beta``."""
    inits = {
        "flat": np.array([1, 1, -1], np.int64),
        "back": np.array([1, 3, SIDE, SIDE], np.int64),
        "one": np.ones(1, np.float32),
        "zero": np.zeros(1, np.float32),
        "gamma": np.array([1.5, 0.5, 1.0], np.float32).reshape(3, 1, 1),
        "beta": np.array([0.25, 0.0, -0.5], np.float32).reshape(3, 1, 1),
    }
    nodes = [
        helper.make_node("Reshape", ["a", "flat"], ["f"]),
        helper.make_node("InstanceNormalization", ["f", "one", "zero"], ["n"], epsilon=1e-5),
        helper.make_node("Reshape", ["n", "back"], ["r"]),
        helper.make_node("Mul", ["r", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["y"]),
    ]
    _, integer = _check(_model(nodes, inits, [1, 3, SIDE, SIDE]))
    assert [n.op_type for n in integer.graph].count("IntLayerNorm") == 1


REFUSED_POOLS = {
    "ceil-mode": ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, [1, 3, 3, 3], "ceil_mode"),
    "dilations": ({"kernel_shape": [2, 2], "dilations": [2, 2]}, [1, 3, 4, 4], "dilated"),
}


@pytest.mark.parametrize(("attributes", "out_shape", "message"), REFUSED_POOLS.values(), ids=REFUSED_POOLS.keys())
def test_an_unsupported_pool_attribute_is_a_named_refusal(attributes: dict, out_shape, message: str) -> None:
    pool = helper.make_node("AveragePool", ["a"], ["y"], name="the_pool", **attributes)
    with pytest.raises(UnsupportedOpError, match=rf"'the_pool' \(op AveragePool\): .*{message}"):
        quantize_to_integer(_model([pool], {}, out_shape), calibration=_batches(2, 0), progress=False)


def test_a_one_dimensional_pool_is_a_named_refusal() -> None:
    graph = helper.make_graph(
        [helper.make_node("AveragePool", ["x"], ["y"], name="pool1d", kernel_shape=[3])],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 3, 8)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(UnsupportedOpError, match=r"'pool1d' \(op AveragePool\): .*4-D input"):
        quantize_to_integer(model, calibration=batches, progress=False)
