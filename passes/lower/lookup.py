"""Elementwise functions of one quantized input as lookup tables: ``y = T[x]``, integer-only at run time.

An int8 (or int16) input takes 256 (65,536) levels, so any elementwise ``f`` with constant other inputs (Tanh,
Erf, HardSwish, LeakyRelu, PRelu's per-channel slopes, ...) is exactly a table built once at compile time:

    T[c, q] = clamp(round_half_even(f(q s_x[c]) / s_y), lo, hi)

``f`` is evaluated by ``onnx.reference`` on the node itself, so the table is the QDQ graph's
``Q(f(DQ(x)))`` level by level (the simulation and the integer code differ only where float32 rounding of
``f`` lands on a rounding tie: at most one step). ``c`` runs over the broadcast shape ``B`` of the other inputs
and the input's per-channel scales; the lowered graph is standard ONNX:

    Gather(T_flat, Cast(x, int32) * |B| + (-lo |B| + arange(|B|).reshape(B)))

(a per-tensor table needs only ``Cast(x) - lo``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.reference import ReferenceEvaluator

from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.graph import add_initializer, const_array, node_label
from qcompiler.passes.lower.groups import (
    clamp_bounds,
    dequantized,
    output_bounds,
    output_scales,
    quantized_output,
    replace_group_output,
)

_STORAGE = {ir.DataType.INT8: (-128, 127), ir.DataType.INT16: (-32768, 32767)}
_NUMPY = {ir.DataType.INT8: np.int8, ir.DataType.INT16: np.int16}


def _evaluate(node: ir.Node, x: np.ndarray, others: list[np.ndarray | None]) -> np.ndarray:
    """``node``'s function on ``x`` (float32) with its constant other inputs, by the ONNX reference."""
    names = ["x", *(f"c{i}" for i in range(len(others)))]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))]
    initializers = [onnx.numpy_helper.from_array(c, f"c{i}") for i, c in enumerate(others) if c is not None]
    used = [n if i == 0 or others[i - 1] is not None else "" for i, n in enumerate(names)]
    proto_node = ir.serde.serialize_node(node)
    del proto_node.input[:]
    proto_node.input.extend(used)
    del proto_node.output[:]
    proto_node.output.append("y")
    graph = helper.make_graph(
        [proto_node], "f", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    outputs = cast(list, ReferenceEvaluator(model).run(None, {"x": x}))  # one array per output name
    return np.asarray(outputs[0], dtype=np.float64)


def node_function(node: ir.Node) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> node(x, *constant other inputs)`` by the ONNX reference (UnsupportedOpError: a non-constant input)."""
    label = node_label(node)
    others: list[np.ndarray | None] = []
    for index, value in enumerate(node.inputs[1:], start=1):
        if value is None:
            others.append(None)
            continue
        constant = const_array(value)
        if constant is None:
            raise UnsupportedOpError(label, node.op_type, f"input {index} must be a constant for a lookup table")
        others.append(constant)
    return lambda x: _evaluate(node, x, others)


def silu_function(x: np.ndarray) -> np.ndarray:
    """``x * Sigmoid(x)`` as the QDQ graph computes it: a float32 Sigmoid, then a float32 product."""
    x32 = x.astype(np.float32)
    sigmoid = (1.0 / (1.0 + np.exp(-x32.astype(np.float64)))).astype(np.float32)
    return (x32 * sigmoid).astype(np.float64)


def lookup_table(
    function: Callable[[np.ndarray], np.ndarray],
    input_scale: np.ndarray,
    rank: int,
    input_type: ir.DataType,
    quant: ir.Node,
    label: str,
    op_type: str,
    bounds: tuple[int, int] | None = None,
) -> tuple[np.ndarray, int]:
    """The table ``T[q, *B]`` of ``function`` (input ``rank``, int8/int16 ``input_type`` at ``input_scale``, scalar
    or one per channel of the last axis) for the output ``quant`` (codes clamped to ``bounds``, else to its storage
    range); and the levels' offset ``-lo``."""
    lo, hi = _STORAGE[input_type]
    levels = np.arange(lo, hi + 1, dtype=np.float64).reshape([-1] + [1] * rank)
    scale = np.asarray(input_scale, np.float64)
    if scale.ndim:
        scale = scale.reshape([1] * rank + [-1])
    x = (levels * scale).astype(np.float32)  # DQ as ONNX computes it: float32 level times float32 scale
    y = function(x)
    if y.shape[0] != levels.shape[0] or y.ndim != rank + 1:
        raise UnsupportedOpError(label, op_type, f"not elementwise in its first input (result {y.shape})")
    out_scale = output_scales(quant)
    if out_scale.ndim:  # one output scale per channel of the last axis: one table row per channel
        out_scale = out_scale.reshape([1] * rank + [-1])
    out_lo, out_hi = output_bounds(quant) if bounds is None else bounds
    codes = np.clip(np.round(np.nan_to_num(y / out_scale, nan=0.0, posinf=out_hi, neginf=out_lo)), out_lo,
                    out_hi)  # fmt: skip
    return codes, -lo


def lower_lookup(graph: ir.Graph, node: ir.Node) -> None:
    """``Q(f(DQ(x)))`` -> ``Gather(T, index(x))``: see the module docstring."""
    lower_lookup_of(graph, node, node, node_function(node))


def lower_silu_lookup(graph: ir.Graph, mul: ir.Node, sigmoid: ir.Node) -> None:
    """SiLU's ``Mul(x, Sigmoid(x))`` as one table of ``x * sigmoid(x)`` over x's levels."""
    lower_lookup_of(graph, mul, sigmoid, silu_function)


def lower_lookup_of(
    graph: ir.Graph, node: ir.Node, reader: ir.Node, function: Callable[[np.ndarray], np.ndarray]
) -> None:
    """``node``'s quantized output as ``function`` of ``reader``'s first (quantized) input, by table."""
    x = dequantized(reader.inputs[0], "input", reader)
    label = node_label(node)
    if x.value.dtype not in _STORAGE or x.value.shape is None:
        raise UnsupportedOpError(label, node.op_type, "a lookup table needs an int8 or int16 input of known rank")
    activation, quant = quantized_output(node)  # a Clip after the function: a W8A16 output's level bound
    rank = len(x.value.shape)
    bounds = clamp_bounds(activation, quant)
    codes, offset = lookup_table(function, x.scale, rank, x.value.dtype, quant, label, node.op_type, bounds)
    out_type = quant.outputs[0].dtype if quant.outputs[0].dtype in _NUMPY else ir.DataType.INT8
    broadcast = codes.shape[1:]
    width = int(np.prod(broadcast, dtype=np.int64))
    base = quant.outputs[0].name or "lookup"
    table = add_initializer(graph, f"{base}_table", codes.reshape(-1).astype(_NUMPY[out_type]))
    cast = ir.node("Cast", [x.value], attributes={"to": ir.DataType.INT32})
    new_nodes = [cast]
    index = cast.outputs[0]
    if width > 1:
        stride = add_initializer(graph, f"{base}_stride", np.array(width, np.int32))
        scaled = ir.node("Mul", [index, stride])
        new_nodes.append(scaled)
        index = scaled.outputs[0]
    offsets = (offset * width + np.arange(width, dtype=np.int64).reshape(broadcast)).astype(np.int32)
    shifted = ir.node("Add", [index, add_initializer(graph, f"{base}_offsets", offsets)])
    gather = ir.node("Gather", [table, shifted.outputs[0]], attributes={"axis": 0})
    new_nodes += [shifted, gather]
    for produced in new_nodes[:-1]:
        produced.outputs[0].dtype = ir.DataType.INT32
    graph.insert_after(quant, new_nodes)
    replace_group_output(quant, gather.outputs[0])
