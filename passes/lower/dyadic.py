"""Dyadic integer rewriting (HAWQ-V3): every rescale of a QDQ graph becomes ``x * b >> c``.

``DQ(x) -> Conv/Gemm/MatMul(DQ(W), DQ(b)) [-> Relu/Clip] -> Q``  becomes
``ConvInteger/MatMulInteger(x, W) + b -> qcompiler.Requantize(M = S_x * S_w / S_y)``;
a MatMul by a Hadamard matrix ``c (S (x) h)`` (an online Hadamard) becomes ``qcompiler.Hadamard(x, h) ->
Requantize(M = S_x c / S_y)``; residual ``Add`` becomes ``qcompiler.RescaleAdd``; ``GlobalAveragePool``
becomes ``Cast, ReduceSum, Requantize(M = S_x / (S_y * H * W))``; shape-only ops run on int8 unchanged.
Float scales are turned into (b, c) exactly once, here, by :func:`qcompiler.dialect.quantize_multipliers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qcompiler.dialect import DOMAIN, OPSET_VERSION, quantize_multiplier, quantize_multiplier_pair, quantize_multipliers
from qcompiler.dialect.dyadic import ROW_EXPONENT_MAX, group_scale_bits
from qcompiler.dialect.hadamard import MAX_ORDER_INT16, hadamard_structure
from qcompiler.dialect.int4 import pack_int4
from qcompiler.dialect.reference import INT_DIV_MAX_SHIFT
from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.analysis.pooling import average_pool_window
from qcompiler.ir.analysis.silu import silu_sigmoids
from qcompiler.ir.analysis.softmax_groups import is_mask_where, softmax_groups
from qcompiler.ir.graph import (
    FLOAT_ISLAND,
    INPUT_LEVEL_PROP,
    add_initializer,
    const_array,
    consumers,
    dim_upper_bound,
    node_label,
)
from qcompiler.ir.ops import CLAMPING_OPS, KEEPS_BOUND_OPS, LINEAR_OPS, SHAPE_READERS, traits
from qcompiler.passes.lower.groups import (
    ACTIVATIONS as _ACTIVATIONS,
)
from qcompiler.passes.lower.groups import (
    Quantized,
    clamp_bounds,
    dequantized,
    output_bounds,
    output_scale,
    output_scales,
    quantized_output,
    replace_group_output,
)
from qcompiler.passes.lower.lookup import lower_lookup
from qcompiler.passes.lower.nonlinear import lower_nonlinearity
from qcompiler.passes.quantize import row_exponent
from qcompiler.passes.quantize.qdq import computes_on_floats

logger = logging.getLogger(__name__)

_LINEAR = LINEAR_OPS
_INTEGER_TYPES = frozenset(
    {
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.INT4,
        ir.DataType.UINT4,
        ir.DataType.BOOL,
    }
)


def _is_activation(value: ir.Value | None) -> bool:
    """True when ``value`` is a dequantized run-time tensor rather than a dequantized weight."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return False
    return const_array(producer.inputs[0]) is None


def _is_scalar(value: ir.Value | None) -> bool:
    constant = const_array(value)
    return constant is not None and constant.size == 1


_LEVEL_PASS_THROUGH = KEEPS_BOUND_OPS


def integer_bound(value: ir.Value) -> int:
    """The largest ``|q|`` an integer tensor can hold: its storage range, or the clamp of what wrote it (a lowered
    op's ``lo``/``hi``; in QDQ form, a fused Clip or ReLU before its QuantizeLinear), looking back through ops
    that only move or negate levels (symmetric clamps survive a Neg)."""
    storage = 32767 if value.dtype == ir.DataType.INT16 else 127
    producer = value.producer()
    if producer is None:
        return storage
    if producer.domain == DOMAIN and "lo" in producer.attributes and "hi" in producer.attributes:
        lo, hi = producer.attributes.get_int("lo"), producer.attributes.get_int("hi")
        return min(storage, max(abs(lo), abs(hi)))
    sources: list[ir.Value | None] = []
    if producer.op_type == "QuantizeLinear" and producer.inputs[0] is not None:
        before = producer.inputs[0].producer()
        if before is not None and before.op_type in _ACTIVATIONS:
            lo, hi = clamp_bounds(before, producer)
            return max(abs(lo), abs(hi))
        if before is None and INPUT_LEVEL_PROP in producer.metadata_props:  # a KV cache input (qdq.py)
            return min(storage, int(producer.metadata_props[INPUT_LEVEL_PROP]))
        if before is None or before.op_type not in _LEVEL_PASS_THROUGH:
            return storage
        dequantized_inputs = before.inputs if before.op_type == "Concat" else before.inputs[:1]
        for source in dequantized_inputs:
            dq = source.producer() if source is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                return storage
            sources.append(dq.inputs[0])
    elif producer.op_type in _LEVEL_PASS_THROUGH:  # a shape op already lowered onto integers
        sources = list(producer.inputs if producer.op_type == "Concat" else producer.inputs[:1])
    if not sources or any(s is None or s.dtype not in (ir.DataType.INT8, ir.DataType.INT16) for s in sources):
        return storage
    return min(storage, max(integer_bound(s) for s in sources if s is not None))


def _softmax_rows(value: ir.Value) -> ir.Node | None:
    """The softmax whose probabilities ``value`` carries (through Q/DQ and shape ops), else None."""
    for _ in range(32):
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type in ("Softmax", "IntSoftmax"):
            return producer
        if producer.op_type not in _LEVEL_PASS_THROUGH | {"QuantizeLinear", "DequantizeLinear", "Where"}:
            return None
        source = producer.inputs[0] if producer.op_type != "Where" else producer.inputs[2]
        if source is None:
            return None
        value = source
    return None


def _check_product_bound(node: ir.Node, a: ir.Value, b: ir.Value) -> None:
    """An int32 MatMul of int16 operands is exact while ``max|a| max|b| K < 2^31``; for probabilities (a softmax
    row sums to at most ``2^15 (1 + T 2^-16)`` at 2^-15, or ``2^7 (1 + T 2^-8)`` at 2^-7) ``max|b| sum|a|``."""
    sides = ((a.shape, -1), (b.shape, -2))  # the contracted length, read from whichever operand's shape has it
    bounds = [dim_upper_bound(node.graph, s[i]) for s, i in sides if s is not None and len(s) >= -i]
    depth = min((d for d in bounds if d is not None), default=None)
    if depth is None:
        raise UnsupportedOpError(node_label(node), "MatMul", "an int16 activation product needs a static (or "
                                 "bounded symbolic) contracted length to prove it cannot overflow int32")  # fmt: skip
    top_b = integer_bound(b)
    if _softmax_rows(a) is not None:
        unit = 1 << 15 if a.dtype == ir.DataType.INT16 else 1 << 7
        worst = unit * (1.0 + depth / (2.0 * unit)) * top_b
    else:
        worst = float(integer_bound(a)) * top_b * depth
    if worst >= 2.0**31:
        raise UnsupportedOpError(
            node_label(node),
            "MatMul",
            f"int16 operands (up to {integer_bound(a)} and {top_b}, {depth} terms) can overflow the int32 "
            "accumulator: quantize one operand to int8, or use attention_bits = 16, which clamps Q and K",
        )


def _share_row_exponents(graph: ir.Graph) -> bool:
    """One ``RowExponent`` per int16 source: the linears that read one value (q, k and v; gate and up) each got
    their own, the same integers, which a decode step then computed (and allocated) three and two times. The
    others' readers take the first one's outputs (first in graph order: it precedes every reader of the later
    ones); the unused ones go with the pass's clean-up."""
    first: dict[tuple[int, int, int], ir.Node] = {}
    shared = False
    for node in graph:
        if node.op_type != "RowExponent" or node.domain != DOMAIN or node.inputs[0] is None:
            continue
        levels = (node.attributes.get_int("qmax", 127), node.attributes.get_int("bound", 0))
        kept = first.setdefault((id(node.inputs[0]), *levels), node)
        if kept is not node:
            for old, new in zip(node.outputs, kept.outputs, strict=True):
                old.replace_all_uses_with(new)
            shared = True
    return shared


def _conv_pads(node: ir.Node, x: ir.Value, kernel: tuple[int, int]) -> list[int]:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", "VALID"):
        pads = node.attributes.get_ints("pads", None)
        return list(pads) if pads and auto_pad == "NOTSET" else [0, 0, 0, 0]
    if x.shape is None or not all(isinstance(d, int) for d in x.shape[2:]):
        raise UnsupportedOpError(node_label(node), node.op_type, "auto_pad SAME needs static spatial input dims")
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dilations = list(node.attributes.get_ints("dilations", [1, 1]))
    begin, end = [], []
    for axis in range(2):
        size = int(x.shape[2 + axis])
        out = -(-size // strides[axis])
        total = max(0, (out - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _integer_bias(node: ir.Node, expected_scale: np.ndarray, channels: int, scale_name: str) -> np.ndarray:
    """The linear's int32 bias per output channel (zeros without one), checked to be stored at the accumulator
    scale ``expected_scale`` (named ``scale_name`` in the error)."""
    if len(node.inputs) <= 2 or node.inputs[2] is None:
        return np.zeros(channels, dtype=np.int32)
    b = dequantized(node.inputs[2], "bias", node)
    bias_q = const_array(b.value)
    if bias_q is None or bias_q.dtype != np.int32:
        raise UnsupportedOpError(node_label(node), node.op_type, "its bias is not a constant int32 tensor")
    if not np.allclose(b.scale.reshape(-1), expected_scale, rtol=1e-6):
        raise UnsupportedOpError(node_label(node), node.op_type, f"its bias scale is not {scale_name}")
    return np.broadcast_to(bias_q.reshape(-1), (channels,)).astype(np.int32)


def _check_row_shifts(shift: np.ndarray, label: str, op: str) -> None:
    """Row exponents lower each row's shift by up to ROW_EXPONENT_MAX; it must stay at least 1."""
    if int(np.min(shift)) - ROW_EXPONENT_MAX < 1:
        raise UnsupportedOpError(
            label, op, f"its rescale needs a shift of at least {ROW_EXPONENT_MAX + 1} for row exponents"
        )


def _reduction(node: ir.Node) -> tuple[Quantized, list[int], int]:
    """A reduction's integer input (one scale), its axes (sorted, non-negative; all axes when none are given) and
    the number of elements each output reduces."""
    x = dequantized(node.inputs[0], "input", node)
    label = node_label(node)
    if x.scale.ndim:
        raise UnsupportedOpError(label, node.op_type, "its input is quantized per channel; a reduction needs one scale")
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise UnsupportedOpError(label, node.op_type, "needs a static input shape")
    axes = reduce_axes(node)
    if axes is None:
        raise UnsupportedOpError(label, node.op_type, "its axes must be constant")
    rank = len(shape)
    axes = list(range(rank)) if not axes else sorted(a % rank for a in axes)
    return x, axes, int(np.prod([int(shape[a]) for a in axes], dtype=np.int64))


class LowerQDQToIntegerPass(ir.passes.InPlacePass):
    """Rewrite a static symmetric QDQ graph to integer-only ops between the input Q and the output DQ."""

    preserves_outputs = False  # changes outputs by at most one quantization step (tested)

    def __init__(self, tables: bool = False) -> None:
        super().__init__()
        #: SiLU, Sigmoid and Gelu as exact lookup tables instead of I-BERT's integer polynomials (deep CNNs)
        self.tables = tables
        #: the ``lowering`` column of qcompiler.ir.ops -> its handler (nonlinearities: lower_nonlinearity)
        self._handlers: dict[str, Callable[[ir.Graph, ir.Node], None]] = {
            "linear": self._lower_linear,
            "add": self._lower_add,
            "product": self._lower_product_or_scalar,
            "neg": self._lower_neg,
            "global_average_pool": self._lower_global_average_pool,
            "average_pool": self._lower_average_pool,
            "move": self._lower_shape_only,
            "split": self._lower_split,
            "lookup": lower_lookup,
            "reduce": self._lower_reduce,
            "reduce_l2": self._lower_reduce_l2,
            "pad": self._lower_pad,
        }

    def _lower_product_or_scalar(self, graph: ir.Graph, node: ir.Node) -> None:
        """``x * c`` or ``x / c`` by a constant scalar: one Requantize; ``Mul`` of two operands: a product."""
        if _is_activation(node.inputs[0]) and _is_scalar(node.inputs[1]):
            self._lower_scalar(graph, node)
        elif node.op_type == "Mul":
            self._lower_product(graph, node)
        elif all(_is_activation(v) for v in node.inputs):
            self._lower_division(graph, node)
        else:
            raise UnsupportedOpError(
                node_label(node), node.op_type, "only a division by a constant scalar or of two activations"
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ShapeInferencePass()(model)  # pads for SAME convolutions and pool sizes need static shapes
        model.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
        modified = False
        groups = softmax_groups(graph)
        inside_groups = set().union(*(g.ids for g in groups)) | {id(n) for n in graph if is_mask_where(n)}
        inside_groups |= silu_sigmoids(graph)  # lowered with their Mul
        inside_groups |= row_exponent.nodes_of(graph)  # lowered with the linears reading them
        for node in list(graph):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
                continue
            if not computes_on_floats(node):
                continue  # index and mask arithmetic is integer already
            if id(node) in inside_groups:
                continue  # absorbed by the IntSoftmax of its group (removed below once unused)
            if FLOAT_ISLAND in node.metadata_props:
                continue  # kept in float between its DequantizeLinear and QuantizeLinear (integer_only=False)
            if lower_nonlinearity(graph, node, inside_groups, self.tables):  # softmax, norms, GELU, sigmoid, SiLU
                modified = True
                continue
            if node.op_type in _ACTIVATIONS:
                producer = node.inputs[0].producer() if node.inputs[0] is not None else None
                if producer is not None and producer.op_type in CLAMPING_OPS:
                    continue  # its producer's output clamp (a fused activation, an operand's level bound)
            row = traits(node.op_type)
            handler = self._handlers.get(row.lowering) if row is not None else None
            if handler is None:
                raise UnsupportedOpError(node_label(node), node.op_type, "no integer lowering for this op")
            handler(graph, node)
            modified = True
        for node in graph:  # a shape read from a dequantized value: the same shape as its integer codes
            source = node.inputs[0] if node.op_type in SHAPE_READERS and node.inputs else None
            producer = source.producer() if source is not None else None
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None:
                node.replace_input_with(0, producer.inputs[0])
                modified = True
        modified |= _share_row_exponents(graph)
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        offenders = float_ops_inside(model)
        if offenders:
            raise ir.passes.PostconditionError(
                "float ops remain between input quantization and output dequantization: " + ", ".join(offenders[:5])
            )

    # --- one lowering per op family ------------------------------------------------------------------
    def _lower_activation_matmul(self, graph: ir.Graph, node: ir.Node) -> None:
        """``DQ(a) @ DQ(b) -> Q`` (attention's QK^T and PV): MatMulInteger then Requantize(S_a S_b / S_y)."""
        a = dequantized(node.inputs[0], "first input", node)
        b = dequantized(node.inputs[1], "second input", node)
        activation, quant = quantized_output(node)
        out_scale = output_scale(quant)
        lo, hi = clamp_bounds(activation, quant)
        real = float(a.scale.reshape(()) * b.scale.reshape(())) / out_scale
        if a.value.dtype == ir.DataType.INT8 and b.value.dtype == ir.DataType.INT8:
            product = ir.node("MatMulInteger", [a.value, b.value])
            product.outputs[0].dtype = ir.DataType.INT32
            self._requantize_after(graph, quant, product.outputs[0], real, lo=lo, hi=hi, producers=[product])
            return
        # int16 operands: an int32 MatMul, exact only while every sum stays below 2^31 (checked here)
        _check_product_bound(node, a.value, b.value)
        widened = []
        for operand in (a, b):
            cast = ir.node("Cast", [operand.value], attributes={"to": ir.DataType.INT32})
            cast.outputs[0].dtype = ir.DataType.INT32
            widened.append(cast)
        product = ir.node("MatMul", [widened[0].outputs[0], widened[1].outputs[0]])
        product.outputs[0].dtype = ir.DataType.INT32
        self._requantize_after(graph, quant, product.outputs[0], real, lo=lo, hi=hi, producers=[*widened, product])

    def _lower_scalar(self, graph: ir.Graph, node: ir.Node) -> None:
        """``DQ(x) * c`` or ``DQ(x) / c`` for a positive constant c: one Requantize of the int8 input."""
        x = dequantized(node.inputs[0], "input", node)
        constant = const_array(node.inputs[1])
        assert constant is not None
        c = float(constant.reshape(()))
        activation, quant = quantized_output(node)
        factor = c if node.op_type == "Mul" else 1.0 / c
        lo, hi = clamp_bounds(activation, quant)
        real = float(x.scale.reshape(())) * factor / output_scale(quant)
        self._requantize_after(graph, quant, x.value, real, lo=lo, hi=hi)

    def _lower_product(self, graph: ir.Graph, node: ir.Node) -> None:
        """``DQ(a) * DQ(b) -> Q`` (SwiGLU's gate times up, RoPE's x times a cos/sin table): the int32 product,
        then one Requantize (``S_a S_b / S_y``, per channel of the last axis for a per-channel output)."""
        a = dequantized(node.inputs[0], "first input", node)
        b = dequantized(node.inputs[1], "second input", node)
        if a.scale.ndim or b.scale.ndim:
            raise UnsupportedOpError(node_label(node), "Mul", "per-channel factors are not supported")
        activation, quant = quantized_output(node)
        lo, hi = clamp_bounds(activation, quant)
        widened = []
        for operand in (a, b):
            cast = ir.node("Cast", [operand.value], attributes={"to": ir.DataType.INT32})
            cast.outputs[0].dtype = ir.DataType.INT32
            widened.append(cast)
        product = ir.node("Mul", [widened[0].outputs[0], widened[1].outputs[0]])
        product.outputs[0].dtype = ir.DataType.INT32
        reals = float(a.scale) * float(b.scale) / output_scales(quant)
        self._requantize_after(
            graph, quant, product.outputs[0], reals, axis=-1, lo=lo, hi=hi, producers=[*widened, product]
        )

    def _lower_division(self, graph: ir.Graph, node: ir.Node) -> None:
        """``DQ(a) / DQ(b) -> Q``: one IntDiv, ``b_m 2^-c = S_a / (S_b S_y)`` with the shift at most
        INT_DIV_MAX_SHIFT (a finer rescale keeps fewer multiplier bits)."""
        a = dequantized(node.inputs[0], "dividend", node)
        b = dequantized(node.inputs[1], "divisor", node)
        label = node_label(node)
        if a.scale.ndim or b.scale.ndim:
            raise UnsupportedOpError(label, "Div", "per-channel operands are not supported")
        activation, quant = quantized_output(node)
        if activation is not None:
            raise UnsupportedOpError(label, "Div", f"a fused {activation.op_type} after a division is not supported")
        real = float(a.scale) / (float(b.scale) * output_scale(quant))
        multiplier, shift = quantize_multiplier(real) if real < 2.0**30 else (0, 0)
        if shift < 1:
            raise UnsupportedOpError(label, "Div", f"the rescale {real:.3g} is too large for IntDiv's multiplier")
        if shift > INT_DIV_MAX_SHIFT:  # keep the quotient's denominator in int64; fewer multiplier bits
            multiplier, shift = round(real * 2.0**INT_DIV_MAX_SHIFT), INT_DIV_MAX_SHIFT
        lo, hi = output_bounds(quant)
        base = quant.outputs[0].name or "quotient"
        divide = ir.node(
            "IntDiv",
            [
                a.value,
                b.value,
                add_initializer(graph, f"{base}_multiplier", np.array(multiplier, np.int32)),
                add_initializer(graph, f"{base}_shift", np.array(shift, np.int32)),
            ],
            attributes={"lo": lo, "hi": hi},
            domain=DOMAIN,
        )
        graph.insert_after(quant, divide)
        replace_group_output(quant, divide.outputs[0])

    def _lower_reduce_l2(self, graph: ir.Graph, node: ir.Node) -> None:
        """``ReduceL2`` over any axes: ``ISqrt(4^f sum(x^2))`` in int64 (``f`` the fraction bits the sum's bound
        leaves below 2^31), then one Requantize (``S_x / (2^f S_y)``)."""
        x, axes, count = _reduction(node)
        level = 32768 if x.value.dtype == ir.DataType.INT16 else 128
        bound = count * level * level  # the largest sum of squares
        frac = max(0, (61 - bound.bit_length()) // 2)  # 4^f bound < 2^62 and sqrt(4^f bound) < 2^31
        activation, quant = quantized_output(node)
        lo, hi = clamp_bounds(activation, quant)
        base = quant.outputs[0].name or "norm"
        steps = [
            ir.node("Cast", [x.value], attributes={"to": ir.DataType.INT64}),
        ]
        steps.append(ir.node("Mul", [steps[-1].outputs[0], steps[-1].outputs[0]]))
        axes_value = add_initializer(graph, f"{base}_axes", np.array(axes, dtype=np.int64))
        keepdims = node.attributes.get_int("keepdims", 1)
        steps.append(ir.node("ReduceSum", [steps[-1].outputs[0], axes_value], attributes={"keepdims": keepdims}))
        scale_up = add_initializer(graph, f"{base}_fraction", np.array(1 << (2 * frac), dtype=np.int64))
        steps.append(ir.node("Mul", [steps[-1].outputs[0], scale_up]))
        steps.append(ir.node("ISqrt", [steps[-1].outputs[0]], domain=DOMAIN))
        for step in steps:
            step.outputs[0].dtype = ir.DataType.INT64
        narrow = ir.node("Cast", [steps[-1].outputs[0]], attributes={"to": ir.DataType.INT32})
        narrow.outputs[0].dtype = ir.DataType.INT32
        real = float(x.scale.reshape(())) / (2.0**frac * output_scale(quant))
        self._requantize_after(graph, quant, narrow.outputs[0], real, lo=lo, hi=hi, producers=[*steps, narrow])

    def _lower_neg(self, graph: ir.Graph, node: ir.Node) -> None:
        """``-x`` on int8 (RoPE's rotate-half): widened first, so -(-128) saturates to 127 as the QDQ graph's
        QuantizeLinear does, instead of wrapping."""
        x = dequantized(node.inputs[0], "input", node)
        quants = [r for r in consumers(node.outputs[0]) if r.op_type == "QuantizeLinear"]
        if len(quants) != 1 or not np.allclose(output_scales(quants[0]), x.scale, rtol=1e-6):
            raise UnsupportedOpError(node_label(node), "Neg", "its output must be quantized at its input's scale")
        lo, hi = output_bounds(quants[0])
        widen = ir.node("Cast", [x.value], attributes={"to": ir.DataType.INT32})
        widen.outputs[0].dtype = ir.DataType.INT32
        negate = ir.node("Neg", [widen.outputs[0]])
        negate.outputs[0].dtype = ir.DataType.INT32
        # an identity Requantize (b 2^-c = 1) is the clamp back to the storage type
        self._requantize_after(graph, quants[0], negate.outputs[0], 1.0, lo=lo, hi=hi, producers=[widen, negate])

    def _requantize_after(
        self,
        graph: ir.Graph,
        quant: ir.Node,
        value: ir.Value,
        reals: np.ndarray | float,
        *,
        axis: int = -1,
        lo: int = -128,
        hi: int = 127,
        producers: list[ir.Node] | tuple[ir.Node, ...] = (),
        row_exponent: ir.Value | None = None,
    ) -> None:
        """Insert ``producers`` then ``Requantize(value)`` with the rescale ``reals`` (scalar or per channel
        along ``axis``; each row's shift less its ``row_exponent``, when given), and make its output the group's
        quantized output."""
        multiplier, shift = quantize_multipliers(np.asarray(reals, dtype=np.float64))
        base = quant.outputs[0].name or "y"
        if row_exponent is not None:
            producer = quant.inputs[0].producer() if quant.inputs[0] is not None else None
            _check_row_shifts(shift, node_label(producer) if producer is not None else node_label(quant), "Requantize")
        inputs = [value, add_initializer(graph, f"{base}_multiplier", multiplier),
                  add_initializer(graph, f"{base}_shift", shift)]  # fmt: skip
        if row_exponent is not None:
            inputs.append(row_exponent)
        requant = ir.node("Requantize", inputs, domain=DOMAIN, attributes={"axis": axis, "lo": lo, "hi": hi})
        graph.insert_after(quant, [*producers, requant])
        replace_group_output(quant, requant.outputs[0])

    def _lower_linear(self, graph: ir.Graph, node: ir.Node) -> None:
        if node.op_type == "MatMul" and _is_activation(node.inputs[1]):
            self._lower_activation_matmul(graph, node)
            return
        rows = row_exponent.source_of(node.inputs[0])
        x = dequantized(rows if rows is not None else node.inputs[0], "input", node)
        w = dequantized(node.inputs[1], "weight", node)
        if rows is not None and (w.value.dtype not in (ir.DataType.INT8, ir.DataType.INT4) or node.op_type == "Conv"):
            raise UnsupportedOpError(
                node_label(node), node.op_type, "a row-exponent input needs an int8 or int4 MatMul/Gemm weight"
            )
        exponent_nodes: list[ir.Node] = []
        exponent = None
        if rows is not None:  # int16 codes read per token as int8 with a power-of-two step 2^e
            if x.value.dtype != ir.DataType.INT16 or (node.op_type == "Gemm" and len(node.inputs) > 2):
                raise UnsupportedOpError(
                    node_label(node), node.op_type, "a row-exponent input must be int16 and the linear bias-free"
                )
            base = (quantized_output(node)[1].outputs[0].name or "y") + "_rows"
            qmax, bound = row_exponent.levels_of(node.inputs[0])
            attributes = {"qmax": qmax} if qmax != row_exponent.ROW_QMAX else {}
            if bound != qmax:
                attributes["bound"] = bound
            split = ir.node("RowExponent", [x.value], attributes=attributes, domain=DOMAIN, num_outputs=2)
            split.outputs[0].dtype, split.outputs[1].dtype = ir.DataType.INT8, ir.DataType.INT8
            split.outputs[0].name, split.outputs[1].name = base, f"{base}_exponent"
            exponent_nodes, exponent = [split], split.outputs[1]
            x = Quantized(split.outputs[0], x.scale)
        if w.value.dtype == ir.DataType.INT4 and node.op_type in ("MatMul", "Gemm"):
            self._lower_int4_linear(graph, node, x, w, exponent_nodes, exponent)
            return
        weight = const_array(w.value)
        if weight is None or weight.dtype != np.int8:
            raise UnsupportedOpError(node_label(node), node.op_type, "its weight is not a constant int8 tensor")
        if node.op_type == "MatMul" and self._lower_hadamard(graph, node, x, w.scale, weight):
            return
        activation, quant = quantized_output(node)
        # one output scale, or one per channel of the last axis (a per-channel residual stream written here)
        out_scale = output_scale(quant) if node.op_type == "Conv" else output_scales(quant)
        lo, hi = clamp_bounds(activation, quant)
        if node.op_type == "Conv":
            channels, axis = weight.shape[0], 1
        elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            weight = np.ascontiguousarray(weight.T)
            channels, axis = weight.shape[1], -1
        else:
            channels, axis = weight.shape[1], -1
        w_scale = np.broadcast_to(w.scale.reshape(-1), (channels,))
        bias = _integer_bias(node, x.scale.reshape(()) * w_scale, channels, "S_x * S_w")
        base = quant.outputs[0].name or "y"
        w_value = add_initializer(graph, f"{base}_weight", weight)
        if node.op_type == "Conv":
            if weight.ndim != 4:
                raise UnsupportedOpError(node_label(node), "Conv", "only 2-D convolutions (canonicalize turns 1-D "
                                         "ones into 2-D; 3-D ones have no integer kernel)")  # fmt: skip
            kernel = (weight.shape[2], weight.shape[3])
            attrs = {
                "pads": _conv_pads(node, node.inputs[0], kernel),
                "strides": list(node.attributes.get_ints("strides", [1, 1])),
                "dilations": list(node.attributes.get_ints("dilations", [1, 1])),
                "group": node.attributes.get_int("group", 1),
            }
            product = ir.node("ConvInteger", [x.value, w_value], attributes=attrs)
            bias_shape: tuple[int, ...] = (1, channels, 1, 1)
        else:
            product = ir.node("MatMulInteger", [x.value, w_value])
            bias_shape = (channels,)
        product.outputs[0].dtype = ir.DataType.INT32
        bias_value = add_initializer(graph, f"{base}_bias", bias.reshape(bias_shape))
        biased = ir.node("Add", [product.outputs[0], bias_value])
        biased.outputs[0].dtype = ir.DataType.INT32
        reals = float(x.scale.reshape(())) * w_scale / out_scale
        self._requantize_after(
            graph, quant, biased.outputs[0], reals, axis=axis, lo=lo, hi=hi,
            producers=[*exponent_nodes, product, biased], row_exponent=exponent,
        )  # fmt: skip

    def _lower_int4_linear(
        self, graph: ir.Graph, node: ir.Node, x, w, exponent_nodes: list[ir.Node], exponent: ir.Value | None
    ) -> None:
        """``DQ(x) @ DQ(int4 codes, group scales) -> Q``: one ``QGemmInt4`` with its epilogue. The group scales
        ``s[n, g]`` must be ``s_max[n] b / 2^B`` with integers ``b`` (the QDQ pass's grid): the kernel multiplies
        each group's int32 sum by ``b`` and the accumulator scale is ``S_x s_max / 2^B``."""
        label = node_label(node)
        dq = node.inputs[1].producer()
        assert dq is not None
        codes = const_array(w.value)
        assert codes is not None
        codes = codes.astype(np.int8)
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        codes_nk = codes if transposed else codes.T  # [N, K]
        n, k = codes_nk.shape
        block = dq.attributes.get_int("block_size", 0)
        scale = np.asarray(w.scale, dtype=np.float64)
        if block:
            scale_ng = scale if transposed else scale.T
        else:
            scale_ng = np.broadcast_to(scale.reshape(-1), (n,)).reshape(n, 1)
        group = block if block else k
        bits = group_scale_bits(k, group if block else None)
        top = scale_ng.max(axis=1)
        steps = np.round(scale_ng / top[:, None] * 2.0**bits)
        if np.any(steps < 1) or not np.allclose(steps * top[:, None] / 2.0**bits, scale_ng, rtol=1e-6, atol=0):
            raise UnsupportedOpError(
                label, node.op_type,
                f"its int4 group scales are not multiples of 1/2^{bits} of each row's largest; quantize with "
                "qcompiler's QDQ pass (it snaps them to that grid)",
            )  # fmt: skip
        unit = top / 2.0**bits
        bias = _integer_bias(node, float(np.asarray(x.scale).reshape(())) * unit, n, "S_x * s_max / 2^B")
        bias = bias.astype(np.int64)
        sizes = np.minimum(group, k - np.arange(steps.shape[1]) * group)
        worst = (steps * sizes * 128 * np.abs(codes_nk).max(axis=1, keepdims=True)).sum(axis=1) + np.abs(bias)
        if worst.max() > np.iinfo(np.int32).max:
            raise UnsupportedOpError(label, node.op_type, "its int4 accumulator bound exceeds int32")
        padded = np.zeros((n, k + k % 2), dtype=np.int8)
        padded[:, :k] = codes_nk
        activation, quant = quantized_output(node)
        lo, hi = clamp_bounds(activation, quant)
        reals = float(np.asarray(x.scale).reshape(())) * unit / output_scales(quant)  # one, or one per channel
        multiplier, shift = quantize_multipliers(reals)
        base = quant.outputs[0].name or "y"
        if exponent is not None:
            _check_row_shifts(shift, label, node.op_type)
        gemm = ir.node(
            "QGemmInt4",
            [x.value,
             add_initializer(graph, f"{base}_weight_int4", pack_int4(padded)),
             add_initializer(graph, f"{base}_group_scale", steps.astype(np.int16)),
             add_initializer(graph, f"{base}_bias", bias.astype(np.int32)),
             add_initializer(graph, f"{base}_multiplier", multiplier),
             add_initializer(graph, f"{base}_shift", shift),
             *([exponent] if exponent is not None else [])],
            domain=DOMAIN, attributes={"group_size": group, "lo": lo, "hi": hi},
        )  # fmt: skip
        graph.insert_after(quant, [*exponent_nodes, gemm])
        replace_group_output(quant, gemm.outputs[0])

    def _lower_hadamard(self, graph: ir.Graph, node: ir.Node, x, w_scale: np.ndarray, weight: np.ndarray) -> bool:
        """``DQ(x) @ DQ(+-1 signs at one scale c) -> Q``: ``Hadamard(x, h)`` (exact int32 adds), then one
        Requantize. False (nothing changed) when the weight is not a per-tensor ``S (x) h``."""
        scales = np.asarray(w_scale, dtype=np.float64).reshape(-1)
        if np.asarray(x.scale).size != 1 or not np.allclose(scales, scales[0], rtol=1e-6):
            return False
        structure = hadamard_structure(weight)
        if structure is None:
            return False
        unit, block = structure
        n = weight.shape[0]
        if x.value.dtype == ir.DataType.INT16 and n > MAX_ORDER_INT16:
            raise UnsupportedOpError(node_label(node), "MatMul", f"an int16 Hadamard of order {n} overflows int32")
        activation, quant = quantized_output(node)
        lo, hi = clamp_bounds(activation, quant)
        base = quant.outputs[0].name or "y"
        transform = ir.node(
            "Hadamard", [x.value, add_initializer(graph, f"{base}_hadamard_block", block)], domain=DOMAIN
        )
        transform.outputs[0].dtype = ir.DataType.INT32
        real = float(np.asarray(x.scale).reshape(())) * scales[0] * unit / output_scale(quant)
        self._requantize_after(graph, quant, transform.outputs[0], real, lo=lo, hi=hi, producers=[transform])
        return True

    def _lower_add(self, graph: ir.Graph, node: ir.Node) -> None:
        """``a + b`` (and ``a - b``: the second multiplier negated) as one ``RescaleAdd``."""
        a = dequantized(node.inputs[0], "first input", node)
        b = dequantized(node.inputs[1], "second input", node)
        activation, quant = quantized_output(node)
        out_scale = output_scales(quant)  # one, or one per channel (a per-channel residual stream)
        lo, hi = clamp_bounds(activation, quant)
        # per-channel input or output scales give one multiplier per channel of the last axis
        mult_a, mult_b, shift = quantize_multiplier_pair(a.scale / out_scale, b.scale / out_scale)
        if node.op_type == "Sub":
            mult_b = -mult_b
        base = quant.outputs[0].name or "sum"
        inputs = [
            a.value,
            b.value,
            add_initializer(graph, f"{base}_multiplier_a", np.asarray(mult_a, dtype=np.int32)),
            add_initializer(graph, f"{base}_multiplier_b", np.asarray(mult_b, dtype=np.int32)),
            add_initializer(graph, f"{base}_shift", np.array(shift, dtype=np.int32)),
        ]
        add = ir.node("RescaleAdd", inputs, domain=DOMAIN, attributes={"lo": lo, "hi": hi})
        graph.insert_after(quant, add)
        replace_group_output(quant, add.outputs[0])

    def _lower_global_average_pool(self, graph: ir.Graph, node: ir.Node) -> None:
        x = dequantized(node.inputs[0], "input", node)
        activation, quant = quantized_output(node)
        out_scale = output_scale(quant)
        shape = node.inputs[0].shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            raise UnsupportedOpError(node_label(node), node.op_type, "needs a 4-D input with static H and W")
        count = int(shape[2]) * int(shape[3])
        real = float(x.scale.reshape(())) / (out_scale * count)
        self._requantized_sum(graph, x, activation, quant, [2, 3], keepdims=1, real=real, axis=1)

    def _lower_average_pool(self, graph: ir.Graph, node: ir.Node) -> None:
        """A 2-D AveragePool: the window sums in int32 (``ConvInteger`` by a depthwise kernel of ones, zero padding),
        then one Requantize by ``s_x / (s_y n)``. Where the divisor ``n`` varies with the position (borders with
        ``count_include_pad=0``), each sum is first multiplied by the integer ``L / n``, ``L`` the least common
        multiple of the divisors, and the Requantize divides by ``L``: exact until that one rounding."""
        label = node_label(node)
        window = average_pool_window(node)
        x = dequantized(node.inputs[0], "input", node)
        if x.scale.ndim or x.value.dtype not in (ir.DataType.INT8, ir.DataType.INT16):
            raise UnsupportedOpError(label, "AveragePool", "its input must be int8 or int16 with one scale (the "
                                     "window sum is a convolution by ones)")  # fmt: skip
        activation, quant = quantized_output(node)
        lo, hi = clamp_bounds(activation, quant)
        base = quant.outputs[0].name or "pool"
        ones = np.ones((window.channels, 1, *window.kernel), np.int8)
        attrs = {"pads": list(window.pads), "strides": list(window.strides), "dilations": [1, 1],
                 "group": window.channels}  # fmt: skip
        total = ir.node("ConvInteger", [x.value, add_initializer(graph, f"{base}_window", ones)], attributes=attrs)
        total.outputs[0].dtype = ir.DataType.INT32
        counts = np.unique(window.counts)
        divisor = int(np.lcm.reduce(counts))
        if (integer_bound(x.value) + 1) * divisor >= 2**31:  # |sum L / n| <= max|x| L must fit int32
            raise UnsupportedOpError(label, "AveragePool", f"its windows' sizes {counts.tolist()} have a least "
                                     "common multiple too large for int32; use count_include_pad=1")  # fmt: skip
        if counts.size == 1:  # one divisor: a zero bias makes it the fused QConv's pattern (one kernel)
            zero = add_initializer(graph, f"{base}_bias", np.zeros((1, window.channels, 1, 1), np.int32))
            summed = ir.node("Add", [total.outputs[0], zero])
        else:
            factors = (divisor // window.counts).astype(np.int32).reshape(1, 1, *window.counts.shape)
            summed = ir.node("Mul", [total.outputs[0], add_initializer(graph, f"{base}_count_factor", factors)])
        summed.outputs[0].dtype = ir.DataType.INT32
        real = float(x.scale.reshape(())) / (output_scale(quant) * divisor)
        self._requantize_after(graph, quant, summed.outputs[0], real, axis=1, lo=lo, hi=hi, producers=[total, summed])

    def _requantized_sum(
        self,
        graph: ir.Graph,
        x: Quantized,
        activation: ir.Node | None,
        quant: ir.Node,
        axes: list[int],
        keepdims: int,
        real: float,
        axis: int = -1,
    ) -> None:
        """``Requantize(ReduceSum(Cast(x, int32), axes), real)`` as the group's output (pools and reductions)."""
        lo, hi = clamp_bounds(activation, quant)
        base = quant.outputs[0].name or "sum"
        widen = ir.node("Cast", [x.value], attributes={"to": ir.DataType.INT32})
        widen.outputs[0].dtype = ir.DataType.INT32
        axes_value = add_initializer(graph, f"{base}_axes", np.array(axes, dtype=np.int64))
        total = ir.node("ReduceSum", [widen.outputs[0], axes_value], attributes={"keepdims": keepdims})
        total.outputs[0].dtype = ir.DataType.INT32
        self._requantize_after(graph, quant, total.outputs[0], real, axis=axis, lo=lo, hi=hi, producers=[widen, total])

    def _lower_reduce(self, graph: ir.Graph, node: ir.Node) -> None:
        """``ReduceMean`` / ``ReduceSum`` over any axes: the int32 sum of the integer input, then one Requantize
        (``s_x / (n s_y)`` for a mean of ``n`` elements, ``s_x / s_y`` for a sum)."""
        x, axes, count = _reduction(node)
        activation, quant = quantized_output(node)
        divisor = count if node.op_type == "ReduceMean" else 1
        real = float(x.scale.reshape(())) / (output_scale(quant) * divisor)
        self._requantized_sum(graph, x, activation, quant, axes, node.attributes.get_int("keepdims", 1), real)

    def _lower_pad(self, graph: ir.Graph, node: ir.Node) -> None:
        """Pad on the integer input (constant, reflect, edge): a constant pad value becomes its level on the input's
        grid, ``clamp(round(v / s))``, which is what the QDQ graph's QuantizeLinear makes of it."""
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = const_array(node.inputs[3])
            if axes is None:
                raise UnsupportedOpError(node_label(node), "Pad", "its axes must be constant")
        value = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if value is not None:
            x = dequantized(node.inputs[0], "input", node)
            lo, hi = (-32768, 32767) if x.value.dtype == ir.DataType.INT16 else (-128, 127)
            level = np.clip(np.round(float(value.reshape(())) / float(x.scale.reshape(-1)[0])), lo, hi)
            dtype = np.int16 if x.value.dtype == ir.DataType.INT16 else np.int8
            name = f"{node.outputs[0].name or 'pad'}_level"
            node.replace_input_with(2, add_initializer(graph, name, np.array(level, dtype)))
        self._lower_shape_only(graph, node)

    def _lower_shape_only(self, graph: ir.Graph, node: ir.Node) -> None:
        x = dequantized(node.inputs[0], "input", node)
        quants = [r for r in consumers(node.outputs[0]) if r.op_type == "QuantizeLinear"]
        if len(quants) != 1:
            raise UnsupportedOpError(node_label(node), node.op_type, "its output is not quantized")
        quant = quants[0]
        out_scales = output_scales(quant)
        concat = node.op_type == "Concat"  # inputs at other scales are requantized to the output's
        if not concat and (out_scales.shape != x.scale.shape or not np.allclose(out_scales, x.scale, rtol=1e-6)):
            raise UnsupportedOpError(
                node_label(node), node.op_type, "input and output scales differ for a shape-only op"
            )
        if len(node.outputs) > 1 and node.outputs[1].uses():
            raise UnsupportedOpError(node_label(node), node.op_type, "its second output is used")
        inputs: list[ir.Value | None] = [x.value, *node.inputs[1:]]
        if node.op_type == "Concat":
            inputs = [self._at_scale(graph, node, i, out_scales, quant) for i in range(len(node.inputs))]
        if node.op_type == "Clip":
            bounds = []
            out_scale = output_scale(quant)
            for i, fallback in ((1, -128), (2, 127)):
                c = const_array(node.inputs[i]) if len(node.inputs) > i else None
                level = fallback if c is None else int(np.clip(np.round(float(c) / out_scale), -128, 127))
                bounds.append(add_initializer(graph, f"{quant.outputs[0].name}_clip{i}", np.array(level, np.int8)))
            inputs = [x.value, *bounds]
        attrs = dict(node.attributes.items())
        integer = ir.node(node.op_type, inputs, attributes=attrs)
        graph.insert_after(quant, integer)
        replace_group_output(quant, integer.outputs[0])

    def _at_scale(self, graph: ir.Graph, node: ir.Node, index: int, scales: np.ndarray, quant: ir.Node) -> ir.Value:
        """Input ``index`` of ``node`` on the integer grid of ``scales``: as it is, or requantized to it
        (``round(q s_i / s)``; a constant input is already quantized at ``s``)."""
        part = dequantized(node.inputs[index], f"input {index}", node)
        if part.scale.shape == scales.shape and np.allclose(part.scale, scales, rtol=1e-6):
            return part.value
        if scales.ndim or part.scale.ndim or part.value.dtype != ir.DataType.INT8:
            reason = f"input {index} is on another grid (per channel or int16) than the output: only int8 inputs"
            raise UnsupportedOpError(node_label(node), node.op_type, reason)
        multiplier, shift = quantize_multipliers(np.asarray(float(part.scale) / float(scales), dtype=np.float64))
        base = f"{quant.outputs[0].name or 'y'}_input{index}"
        requant = ir.node(
            "Requantize",
            [part.value, add_initializer(graph, f"{base}_multiplier", multiplier),
             add_initializer(graph, f"{base}_shift", shift)],
            domain=DOMAIN,
            attributes={"axis": -1, "lo": -128, "hi": 127},
        )  # fmt: skip
        requant.outputs[0].name = f"{base}_requantized"
        requant.outputs[0].dtype = ir.DataType.INT8
        requant.outputs[0].shape = part.value.shape
        graph.insert_before(node, requant)
        return requant.outputs[0]

    def _lower_split(self, graph: ir.Graph, node: ir.Node) -> None:
        """Split on the integer input: every used part keeps the input's grid (QKV of a fused projection)."""
        x = dequantized(node.inputs[0], "input", node)
        integer = ir.node(node.op_type, [x.value, *node.inputs[1:]], attributes=dict(node.attributes.items()),
                          num_outputs=len(node.outputs))  # fmt: skip
        quants = []
        for index, part in enumerate(node.outputs):
            readers = [r for r in consumers(part) if r.op_type == "QuantizeLinear"]
            if not part.uses():
                continue
            if len(readers) != 1 or not np.allclose(output_scales(readers[0]), x.scale, rtol=1e-6):
                reason = f"output {index} is not quantized at the input's scale"
                raise UnsupportedOpError(node_label(node), "Split", reason)
            quants.append((index, readers[0]))
        if not quants:
            return
        graph.insert_before(node, integer)
        for index, quant in quants:
            replace_group_output(quant, integer.outputs[index])


def reduce_axes(node: ir.Node) -> list[int] | None:
    """A Reduce* node's axes (attribute before opset 18, constant input after); [] for all; None if not constant."""
    attribute = node.attributes.get("axes")
    if attribute is not None:
        return [int(a) for a in attribute.as_ints()]
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return []
    axes = const_array(node.inputs[1])
    return None if axes is None else [int(a) for a in axes.reshape(-1)]


def float_islands(model: ir.Model) -> list[dict[str, str]]:
    """The nodes kept in float on purpose (``integer_only=False``): node, op and why the integer path refused it."""
    return [
        {"node": node_label(node), "op": node.op_type, "reason": node.metadata_props[FLOAT_ISLAND]}
        for node in model.graph
        if FLOAT_ISLAND in node.metadata_props
    ]


def _island_boundary(node: ir.Node) -> bool:
    """A float island, a DequantizeLinear read only by islands, or a QuantizeLinear of an island's output."""
    if FLOAT_ISLAND in node.metadata_props:
        return True
    if node.op_type == "DequantizeLinear":
        readers = consumers(node.outputs[0])
        return bool(readers) and all(FLOAT_ISLAND in r.metadata_props for r in readers)
    if node.op_type == "QuantizeLinear" and node.inputs[0] is not None:
        producer = node.inputs[0].producer()
        return producer is not None and FLOAT_ISLAND in producer.metadata_props
    return False


def float_ops_inside(model: ir.Model) -> list[str]:
    """Nodes computing on floats other than the input QuantizeLinear, the output DequantizeLinear and the declared
    float islands with their own QuantizeLinear and DequantizeLinear (:func:`float_islands`)."""
    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    offenders = []
    for node in graph:
        if _island_boundary(node):
            continue
        if node.op_type == "QuantizeLinear" and node.inputs[0] is not None and node.inputs[0].producer() is None:
            continue
        if node.op_type == "DequantizeLinear" and id(node.outputs[0]) in outputs:
            continue
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        computes_on_floats = any(v.dtype is not None and v.dtype not in _INTEGER_TYPES for v in values)
        untyped_result = any(v.dtype is None for v in node.outputs)
        if computes_on_floats or untyped_result:
            offenders.append(node_label(node))
    return offenders
