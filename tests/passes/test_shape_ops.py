"""Concat of differently scaled inputs and Split (a fused QKV projection): quantized, lowered to integers,
within one step of their QDQ simulation op by op, and TVM bit-exact with the reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.errors import UnsupportedOpError
from qcompiler.testing import assert_bit_exact, assert_lowering_matches, assert_within_quantization_step

ROWS, WIDTH = 5, 6


def _model(nodes, inits, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((ROWS, WIDTH)).astype(np.float32)} for _ in range(count)]


def concat_model(with_constant: bool) -> onnx.ModelProto:
    """Two projections of x at ranges 10x apart (and a constant row block, a class token's kind), concatenated."""
    rng = np.random.default_rng(1)
    inits = {
        "wa": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
        "wb": (10.0 * rng.standard_normal((WIDTH, WIDTH))).astype(np.float32),
        "token": rng.standard_normal((1, WIDTH)).astype(np.float32) * 3.0,
    }
    nodes = [helper.make_node("Gemm", ["x", "wa"], ["a"]), helper.make_node("Gemm", ["x", "wb"], ["b"])]
    parts = ["token", "a", "b"] if with_constant else ["a", "b"]
    nodes.append(helper.make_node("Concat", parts, ["y"], axis=0))
    return _model(nodes, inits, [ROWS * 2 + (1 if with_constant else 0), WIDTH])


def split_model() -> onnx.ModelProto:
    """A fused QKV projection split in three, each part read by its own projection, summed."""
    rng = np.random.default_rng(2)
    inits = {
        "wqkv": rng.standard_normal((WIDTH, 3 * WIDTH)).astype(np.float32),
        "sizes": np.array([WIDTH, WIDTH, WIDTH], np.int64),
        **{f"w{i}": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) for i in range(3)},
    }
    nodes = [
        helper.make_node("Gemm", ["x", "wqkv"], ["qkv"]),
        helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=1),
        *(helper.make_node("Gemm", [part, f"w{i}"], [f"p{i}"]) for i, part in enumerate("qkv")),
        helper.make_node("Add", ["p0", "p1"], ["s"]),
        helper.make_node("Add", ["s", "p2"], ["y"]),
    ]
    return _model(nodes, inits, [ROWS, WIDTH])


def _check(model: onnx.ModelProto):
    from qcompiler.backends.tvm import build

    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_batches(4, 0), progress=False)
    probe = _batches(2, 9)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    return qdq, integer


@pytest.mark.tvm
@pytest.mark.parametrize("with_constant", [False, True])
def test_concat_of_differently_scaled_inputs_requantizes_to_the_coarsest(with_constant: bool) -> None:
    _, integer = _check(concat_model(with_constant))
    concat = next(n for n in integer.graph if n.op_type == "Concat")
    producers = [v.producer() for v in concat.inputs]
    # the finer projection's int8 output is requantized; the coarser one (its scale is the output's) is not
    requantized = [
        p for p in producers if p is not None and p.op_type == "Requantize" and p.inputs[0].dtype.name == "INT8"
    ]
    assert len(requantized) == 1
    assert (None in producers) == with_constant


@pytest.mark.tvm
def test_split_of_a_fused_projection_lowers_on_integers() -> None:
    _, integer = _check(split_model())
    split = next(n for n in integer.graph if n.op_type == "Split")
    assert split.inputs[0].dtype.name == "INT8" and all(o.dtype.name == "INT8" for o in split.outputs)


def test_concat_of_per_channel_and_per_tensor_inputs_is_a_named_refusal() -> None:
    """Requantizing to one grid covers int8 per-tensor inputs; a per-channel input with another scale is refused by
    name (never clipped silently)."""
    from qcompiler.passes.quantize.qdq import QuantizeQDQPass

    pass_ = QuantizeQDQPass({})
    pass_._bits_of = {}
    node = helper.make_node("Concat", ["a", "b"], ["y"], axis=0)
    import onnx_ir as ir

    graph = ir.Graph([ir.Value(name="a"), ir.Value(name="b")], [], nodes=[ir.from_proto(node)])
    concat = graph.node(0)
    a, b = graph.inputs
    concat.replace_input_with(0, a)
    concat.replace_input_with(1, b)
    with pytest.raises(UnsupportedOpError, match="per channel"):
        pass_._quantize_concat(graph, concat, {id(a): np.float32(0.1), id(b): np.array([0.1, 0.2], np.float32)})


def _image_block(node: onnx.NodeProto, inits: dict, out_shape: list[int]) -> onnx.ModelProto:
    """Conv -> ``node`` (reading "a", writing "b") -> Relu on [1, 3, 5, 5]."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((3, 3, 3, 3)).astype(np.float32) * 0.5, **inits}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]), node, helper.make_node("Relu", ["b"], ["y"])],
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _image_batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)} for _ in range(count)]


REDUCTIONS = [
    ("ReduceMean", [2, 3], 1, [1, 3, 1, 1]),  # squeeze-excitation's pooled vector
    ("ReduceMean", [1], 0, [1, 5, 5]),
    ("ReduceMean", [-1], 1, [1, 3, 5, 1]),
    ("ReduceSum", [1, 3], 0, [1, 5]),
]


@pytest.mark.tvm
@pytest.mark.parametrize(("op", "axes", "keepdims", "out_shape"), REDUCTIONS)
def test_reductions_over_any_axes_lower_to_an_integer_sum(op: str, axes, keepdims: int, out_shape) -> None:
    from qcompiler.backends.tvm import build

    node = helper.make_node(op, ["a", "axes"], ["b"], keepdims=keepdims)
    model = _image_block(node, {"axes": np.array(axes, np.int64)}, out_shape)
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_image_batches(4, 0), progress=False)
    sums = [n for n in integer.graph if n.op_type == "ReduceSum"]
    assert op == "ReduceSum" or op not in {n.op_type for n in integer.graph}
    assert len(sums) == 1 and sums[0].inputs[0].dtype.name == "INT32"  # the sum of the widened integer input
    probe = _image_batches(2, 8)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


@pytest.mark.tvm
@pytest.mark.parametrize(("mode", "value"), [("constant", 0.0), ("constant", 0.37), ("reflect", None), ("edge", None)])
def test_pad_lowers_on_integers_with_its_value_on_the_grid(mode: str, value: float | None) -> None:
    from qcompiler.backends.tvm import build

    inputs = ["a", "pads"] + (["value"] if value is not None else [])
    inits: dict = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}
    if value is not None:
        inits["value"] = np.array(value, np.float32)
    model = _image_block(helper.make_node("Pad", inputs, ["b"], mode=mode), inits, [1, 3, 8, 8])
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_image_batches(4, 0), progress=False)
    pad = next(n for n in integer.graph if n.op_type == "Pad")
    assert pad.inputs[0].dtype.name == "INT8"
    probe = _image_batches(2, 8)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


@pytest.mark.tvm
@pytest.mark.parametrize(
    ("op", "indices", "attributes", "out_shape"),
    [
        ("Gather", np.array([2, 0], np.int64), {"axis": 1}, [1, 2, 5, 5]),  # a selection along channels
        ("GatherND", np.array([[0, 1], [0, 2]], np.int64), {}, [2, 5, 5]),
        ("GatherElements", np.zeros((1, 3, 5, 2), np.int64), {"axis": 3}, [1, 3, 5, 2]),
    ],
)
def test_selections_of_activations_move_integers(op: str, indices, attributes: dict, out_shape) -> None:
    from qcompiler.backends.tvm import build

    model = _image_block(helper.make_node(op, ["a", "indices"], ["b"], **attributes), {"indices": indices}, out_shape)
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_image_batches(4, 0), progress=False)
    node = next(n for n in integer.graph if n.op_type == op)
    assert node.inputs[0].dtype.name == "INT8"
    probe = _image_batches(2, 8)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


@pytest.mark.tvm
def test_matmul_with_a_constant_on_the_left_lowers_on_integers() -> None:
    """DETR's folded object queries against the encoder's keys: MatMul(constant, activation), the constant an
    int8 table per tensor, the product an integer MatMul of two int8 operands."""
    rng = np.random.default_rng(5)
    inits = {
        "w": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32),
        "queries": (2.0 * rng.standard_normal((3, ROWS))).astype(np.float32),
    }
    nodes = [helper.make_node("Gemm", ["x", "w"], ["k"]), helper.make_node("MatMul", ["queries", "k"], ["y"])]
    _, integer = _check(_model(nodes, inits, [3, WIDTH]))
    matmul = next(n for n in integer.graph if n.op_type == "MatMulInteger")
    assert [v.dtype.name for v in matmul.inputs] == ["INT8", "INT8"]
    assert matmul.inputs[0].const_value is not None  # the queries, stored as int8
