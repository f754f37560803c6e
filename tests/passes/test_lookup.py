"""Elementwise functions as lookup tables (passes/lower/lookup.py): every op with ``lowering = "lookup"`` in the
op-traits table lowers to integer-only code that agrees with its QDQ simulation op by op (one step) and runs
bit-exactly on TVM; per-channel constants (PRelu's slopes) get one table row per channel."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.ops import ops_where
from qcompiler.passes.lower.dyadic import float_ops_inside
from qcompiler.testing import assert_bit_exact, assert_lowering_matches, assert_within_quantization_step

LOOKUP_OPS = sorted(ops_where(lambda t: t.lowering == "lookup"))
CHANNELS, SIDE = 3, 5
#: attributes that make each op's table non-trivial
#: constant second inputs: PRelu's slope per channel, Pow's exponent
SECOND_INPUT = {
    "PRelu": np.array([0.1, -0.3, 0.6], np.float32).reshape(CHANNELS, 1, 1),
    "Pow": np.array(3.0, np.float32),
}
ATTRIBUTES = {"LeakyRelu": {"alpha": 0.2}, "Elu": {"alpha": 0.7}, "Celu": {"alpha": 1.3}, "HardSigmoid": {"alpha": 0.3}}


def _conv_block(op: str) -> onnx.ModelProto:
    """Conv -> op -> Conv on [1, C, H, W]; PRelu reads a per-channel slope [C, 1, 1]."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.5,
        "w2": rng.standard_normal((CHANNELS, CHANNELS, 1, 1)).astype(np.float32),
    }
    inputs = ["a"]
    if op in SECOND_INPUT:
        inits["second"] = SECOND_INPUT[op]
        inputs.append("second")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node(op, inputs, ["b"], **ATTRIBUTES.get(op, {})),
        helper.make_node("Conv", ["b", "w2"], ["y"]),
    ]
    shape = [1, CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, CHANNELS, SIDE, SIDE)).astype(np.float32)} for _ in range(count)]


@pytest.mark.tvm
@pytest.mark.parametrize("op", LOOKUP_OPS)
def test_lookup_op_lowers_integer_only_and_bit_exact(op: str) -> None:
    from qcompiler.backends.tvm import build

    qdq, integer, _, shapes = quantize_to_integer(_conv_block(op), calibration=_batches(4, 0), progress=False)
    assert float_ops_inside(integer) == []
    assert op not in {n.op_type for n in integer.graph}
    gathers = [n for n in integer.graph if n.op_type == "Gather"]
    assert len(gathers) == 1
    table = gathers[0].inputs[0].const_value.numpy()
    assert table.size == 256 * (CHANNELS if op == "PRelu" else 1)
    probe = _batches(2, 7)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


def test_a_table_is_the_qdq_graphs_function_level_by_level() -> None:
    """Tanh's table: entry q is round(tanh(q s_x) / s_y), clamped, for every int8 level."""
    qdq, integer, _, _ = quantize_to_integer(_conv_block("Tanh"), calibration=_batches(4, 0), progress=False)
    gather = next(n for n in integer.graph if n.op_type == "Gather")
    table = gather.inputs[0].const_value.numpy().astype(np.int64)
    tanh = next(n for n in qdq.graph if n.op_type == "Tanh")
    s_x = float(tanh.inputs[0].producer().inputs[1].const_value.numpy())
    quant = next(u for u, _ in tanh.outputs[0].uses() if u.op_type == "QuantizeLinear")
    s_y = float(quant.inputs[1].const_value.numpy())
    levels = np.arange(-128, 128)
    want = np.clip(np.round(np.tanh((levels * np.float32(s_x)).astype(np.float32)) / s_y), -128, 127)
    np.testing.assert_array_equal(table, want)


def test_a_non_constant_second_input_is_a_named_refusal() -> None:
    model = _conv_block("PRelu")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "second"))
    model.graph.input.append(helper.make_tensor_value_info("second", TensorProto.FLOAT, [CHANNELS, 1, 1]))
    feeds = [{**b, "second": np.full((CHANNELS, 1, 1), 0.1, np.float32)} for b in _batches(2, 0)]
    with pytest.raises(UnsupportedOpError, match="PRelu.*constants"):
        quantize_to_integer(ir.serde.deserialize_model(model), calibration=feeds, progress=False)


@pytest.mark.tvm
@pytest.mark.parametrize("form", ["Sigmoid", "SiLU", "Gelu"])
def test_tables_recipe_lowers_the_integer_nonlinearities_as_exact_tables(form: str) -> None:
    """w8a8-tables: SiLU (x * Sigmoid(x)), Sigmoid and Gelu become tables, not I-BERT polynomials; the simulation
    (simulate(..., nonlinearities="integer")) follows the recipe, and the code is within one step of it op by op."""
    import qcompiler
    from qcompiler.api import _quantize_to_integer
    from qcompiler.backends.tvm import build
    from qcompiler.config import load_recipe

    model = _conv_block("Sigmoid" if form == "SiLU" else form)
    if form == "SiLU":  # b = a * Sigmoid(a)
        sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
        sigmoid.output[0] = "gate"
        model.graph.node.insert(2, helper.make_node("Mul", ["a", "gate"], ["b"]))
    calibration = _batches(4, 0)
    result = _quantize_to_integer(model, None, calibration, load_recipe("w8a8-tables"), True, False)
    ops = [n.op_type for n in result.model.graph]
    assert "IntSigmoid" not in ops and "IntGelu" not in ops and ops.count("Gather") == 1
    simulation = qcompiler.simulate(
        model, calibration=calibration, recipe="w8a8-tables", nonlinearities="integer", progress=False
    )
    assert not {"IntSigmoid", "IntGelu"} & {n.op_type for n in simulation.graph}  # the recipe's tables, there too
    probe = _batches(2, 7)
    assert_lowering_matches(simulation, result.model, probe)
    assert_bit_exact(lambda proto: build(proto, result.shapes), result.model, probe)


@pytest.mark.tvm
def test_a_table_with_per_channel_output_scales_has_a_row_per_channel() -> None:
    """A Sigmoid read only by a linear layer gets one output scale per channel (folded into the linear's weight);
    with w8a8-tables its table then holds one row per channel."""
    from qcompiler.api import _quantize_to_integer
    from qcompiler.backends.tvm import build
    from qcompiler.config import load_recipe

    rng = np.random.default_rng(5)
    width = 6
    w1 = (rng.standard_normal((width, width)) * np.array([0.2, 0.5, 1, 2, 4, 8])).astype(np.float32)
    w2 = rng.standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("Sigmoid", ["a"], ["b"]),
            helper.make_node("MatMul", ["b", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, width])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    batches = [{"x": rng.standard_normal((4, width)).astype(np.float32)} for _ in range(6)]
    result = _quantize_to_integer(model, None, batches[:4], load_recipe("w8a8-tables"), True, False)
    assert result.qdq is not None
    sigmoid = next(n for n in result.qdq_ir().graph if n.op_type == "Sigmoid")
    quant = next(u for u, _ in sigmoid.outputs[0].uses() if u.op_type == "QuantizeLinear")
    assert quant.inputs[1].const_value.numpy().size == width  # per channel
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value.numpy().size == 256 * width
    assert_lowering_matches(result.qdq_ir(), result.model, batches[4:])
    assert_bit_exact(lambda proto: build(proto, result.shapes), result.model, batches[4:])
