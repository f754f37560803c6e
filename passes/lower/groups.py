"""QDQ node groups: reading the int8 input behind a DequantizeLinear, finding the QuantizeLinear that ends a
group, and replacing that group's quantized output by an integer op's output."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.graph import const_array, consumers, node_label
from qcompiler.ir.ops import FUSABLE_ACTIVATIONS

ACTIVATIONS = FUSABLE_ACTIVATIONS  # fused into the epilogue of the op before them


@dataclasses.dataclass
class Quantized:
    """An int8 (or int16) tensor and the float scale it stands for."""

    value: ir.Value
    scale: np.ndarray  # float64, scalar or per channel


def dequantized(value: ir.Value | None, what: str, node: ir.Node) -> Quantized:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        raise UnsupportedOpError(node_label(node), node.op_type, f"its {what} is not dequantized (no QDQ around it)")
    scale = const_array(producer.inputs[1])
    zero = const_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
    if scale is None:
        raise UnsupportedOpError(node_label(node), node.op_type, f"the scale of its {what} is not constant")
    if zero is not None and np.any(zero != 0):
        raise UnsupportedOpError(
            node_label(node),
            node.op_type,
            f"its {what} has a non-zero zero point: only symmetric quantization",
        )
    source = producer.inputs[0]
    assert source is not None
    return Quantized(source, scale.astype(np.float64))


def quantized_output(node: ir.Node) -> tuple[ir.Node | None, ir.Node]:
    """The fused activation (or None) and the QuantizeLinear that ends this node's group."""
    out = node.outputs[0]
    readers = consumers(out)
    activation = None
    if len(readers) == 1 and readers[0].op_type in ACTIVATIONS and node.op_type not in ACTIVATIONS:
        activation = readers[0]
        readers = consumers(activation.outputs[0])
    quants = [r for r in readers if r.op_type == "QuantizeLinear"]
    if len(quants) != 1:
        raise UnsupportedOpError(node_label(node), node.op_type, "its output is not quantized by one QuantizeLinear")
    return activation, quants[0]


def output_scales(quant: ir.Node) -> np.ndarray:
    """The scale of a group's QuantizeLinear: a float64 scalar, or one per channel of the last axis."""
    scale = const_array(quant.inputs[1])
    assert scale is not None
    return scale.astype(np.float64).reshape(()) if scale.size == 1 else scale.astype(np.float64).reshape(-1)


def output_scale(quant: ir.Node) -> float:
    """The single scale of a group's QuantizeLinear (ops whose integer form has one output scale)."""
    scales = output_scales(quant)
    if scales.ndim:
        producer = quant.inputs[0].producer() if quant.inputs[0] is not None else None
        label = node_label(producer) if producer is not None else node_label(quant)
        op = producer.op_type if producer is not None else "QuantizeLinear"
        raise UnsupportedOpError(label, op, "its output is quantized per channel; its integer form has one scale")
    return float(scales)


def output_bounds(quant: ir.Node) -> tuple[int, int]:
    """The clamp of a group's integer output: the range of its QuantizeLinear's type (int8 or int16)."""
    dtype = quant.outputs[0].dtype
    if dtype == ir.DataType.INT16:
        return -32768, 32767
    if dtype in (ir.DataType.INT8, None):
        return -128, 127
    raise UnsupportedOpError(node_label(quant), "QuantizeLinear", f"output type {dtype}: only int8 and int16")


def clamp_bounds(activation: ir.Node | None, quant: ir.Node) -> tuple[int, int]:
    """The output clamp of a group: its storage range (int8 or int16), narrowed by a fused ReLU or Clip."""
    lo, hi = output_bounds(quant)
    if activation is None:
        return lo, hi
    if activation.op_type == "Relu":
        return 0, hi
    out_scale = output_scale(quant)
    low = const_array(activation.inputs[1]) if len(activation.inputs) > 1 else None
    high = const_array(activation.inputs[2]) if len(activation.inputs) > 2 else None
    clip_lo = lo if low is None else int(np.clip(np.round(float(low) / out_scale), lo, hi))
    clip_hi = hi if high is None else int(np.clip(np.round(float(high) / out_scale), lo, hi))
    return clip_lo, clip_hi


def replace_group_output(quant: ir.Node, new_value: ir.Value) -> None:
    """Give ``new_value`` the name and readers of ``quant``'s int8 output (graph outputs included)."""
    old = quant.outputs[0]
    name = old.name
    old.name = f"{name}_lowered_away"
    new_value.name = name
    new_value.dtype = old.dtype if old.dtype is not None else ir.DataType.INT8
    new_value.shape = old.shape
    old.replace_all_uses_with(new_value, replace_graph_outputs=True)
