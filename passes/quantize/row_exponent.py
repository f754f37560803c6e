"""Per-token power-of-two exponents on int8 GEMM inputs (``row_exponents``): the QDQ form and how to find it.

A static per-tensor (or per-channel) int8 scale must cover every token, so one token's outlier (the attention
sink's massive activation, or text beyond the calibration maximum, clipped) sets the step every token gets. With
row exponents the GEMM input is stored as int16 codes ``z`` at ``refinement`` times finer static steps, and each
token row is read as int8 codes ``y = round_shift(z, e)`` with ``e`` the smallest exponent for which the row fits
``[-127, 127]`` (``qcompiler.RowExponent``). The GEMM stays int8 x int8; its requantize shifts each row by
``c - e`` (``QGemm``'s ``row_exponent`` input). A typical token keeps ``e = 0`` and the finer step; an outlier
token gets a coarser one, alone. Exact integer arithmetic throughout.

In the QDQ graph (float, any ONNX runtime) the same arithmetic is written with standard ops between the
``DequantizeLinear`` the linears read (scale ``u``: the largest per-channel scale when ratios fold into the
weights) and the linears; each node carries the metadata key :data:`TAG`, which is how the lowering finds it:

    z = Round(x / u); M = ReduceMax(|z|); e = sum_j [M > q 2^j]; y = Floor(z / 2^e + 1/2); out = y 2^e u

``Floor(z / 2^e + 1/2)`` is the dialect's ``round_shift`` (ties toward +inf) exactly, so the integer code and
the QDQ graph agree bit for bit on this step. ``q`` is 127, or 7 for 4-bit activations (``activation_bits = 4``:
W4A4's linears read int4 levels, ``y`` then clipped to ``[-7, 7]``, which only a row beyond ``7 2^9`` needs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.dyadic import ROW_EXPONENT_MAX
from qcompiler.ir.graph import add_initializer, const_array, is_graph_output
from qcompiler.ir.ops import LAYOUT_OPS
from qcompiler.passes.quantize.precision import hadamard_matmul

TAG = "qcompiler.row_exponent"
ROW_QMAX = 127
#: ``activation_bits`` -> the largest code a linear reads per token
ROW_QMAX_OF_BITS = {8: 127, 4: 7}


def reads_as_bias_free_linear(node: ir.Node, index: int) -> bool:
    """``node`` reads input ``index`` as the activation of a constant 2-D weight without a bias (a bias would have
    to follow each row's exponent), and is not an online Hadamard (exact on int16 already)."""
    if node.op_type not in ("MatMul", "Gemm") or index != 0 or len(node.inputs) < 2:
        return False
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or hadamard_matmul(node) is not None:
        return False
    if node.op_type == "Gemm" and (len(node.inputs) > 2 and node.inputs[2] is not None):
        return False
    return not (node.op_type == "Gemm" and node.attributes.get_int("transA", 0))


#: ops that only move elements, through which a GEMM input keeps its rows (heads merged before o_proj)
SHAPE_OPS = LAYOUT_OPS


def candidate(graph: ir.Graph, value: ir.Value, through_shape_ops: bool = False) -> bool:
    """Every reader of ``value`` is a bias-free linear (:func:`reads_as_bias_free_linear`), or with
    ``through_shape_ops`` a shape-only op whose output is such a candidate in turn; and ``value`` is computed,
    not a graph output: a GEMM input row exponents can serve."""
    uses = list(value.uses())
    if not uses or is_graph_output(graph, value) or value.producer() is None:
        return False
    for node, index in uses:
        if reads_as_bias_free_linear(node, index):
            continue
        if not (through_shape_ops and node.op_type in SHAPE_OPS and index == 0):
            return False
        if not candidate(graph, node.outputs[0], through_shape_ops=True):
            return False
    return True


def insert(
    graph: ir.Graph,
    source: ir.Value,
    scale: float,
    before: ir.Node | None = None,
    qmax: int = ROW_QMAX,
    bound: int = 0,
) -> ir.Value:
    """The row-exponent read of ``source`` (a DequantizeLinear output at the scalar ``scale``) at codes up to
    ``qmax``, each row's exponent the smallest that holds its peak within ``bound`` (0: ``qmax``; above it, the
    peak clips), inserted after ``source``'s producer; returns its float output."""
    base = source.name or "x"
    bound = bound or qmax
    u = add_initializer(graph, f"{base}_row_scale", np.array(scale, np.float32))
    bounds = (bound * 2.0 ** np.arange(ROW_EXPONENT_MAX)).astype(np.float32)
    nodes: list[ir.Node] = []

    def op(kind: str, inputs: list[ir.Value], role: str, **attributes) -> ir.Value:
        node = ir.node(kind, inputs, attributes=attributes)
        node.metadata_props[TAG] = role
        node.outputs[0].dtype = ir.DataType.BOOL if kind == "Greater" else ir.DataType.FLOAT
        node.outputs[0].name = f"{base}_row_{role}"
        nodes.append(node)
        return node.outputs[0]

    def const(tag: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}_row_{tag}", array)

    codes = op("Round", [op("Div", [source, u], "codes_div")], "codes")
    axes = const("axes", np.array([-1], np.int64))
    peak = op("ReduceMax", [op("Abs", [codes], "abs"), axes], "peak", keepdims=1)
    over = op("Greater", [peak, const("bounds", bounds)], "over")
    exponent = op("ReduceSum", [op("Cast", [over], "over_float", to=ir.DataType.FLOAT), axes], "exponent", keepdims=1)
    step = op("Pow", [const("two", np.array(2.0, np.float32)), exponent], "step")
    half = const("half", np.array(0.5, np.float32))
    shifted = op("Floor", [op("Add", [op("Div", [codes, step], "divide"), half], "half_up")], "shifted")
    if qmax < ROW_QMAX or bound > qmax:  # saturate past qmax 2^9, or a clipped peak (RowExponent's clamp)
        lo, hi = const("lo", np.array(-qmax, np.float32)), const("hi", np.array(qmax, np.float32))
        shifted = op("Clip", [shifted, lo, hi], "saturate")
    out = op("Mul", [op("Mul", [shifted, step], "restore"), u], "output")
    out.shape = source.shape
    producer = source.producer()
    if before is not None:
        graph.insert_before(before, nodes)
    elif producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(graph.node(0), nodes)
    return out


def source_of(value: ir.Value | None) -> ir.Value | None:
    """The DequantizeLinear output a row-exponent read (:func:`insert`) starts from, when ``value`` is its output;
    else None."""
    node = value.producer() if value is not None else None
    if node is None or node.metadata_props.get(TAG) != "output":
        return None
    current = node
    for _ in range(32):  # back along input 0 to the first node of the read
        if current.metadata_props.get(TAG) == "codes_div":
            return current.inputs[0]
        nxt = current.inputs[0].producer() if current.inputs[0] is not None else None
        if nxt is None or TAG not in nxt.metadata_props:
            return None
        current = nxt
    return None


def levels_of(value: ir.Value) -> tuple[int, int]:
    """``(qmax, bound)`` of the row-exponent read whose output is ``value``: its saturating Clip's top (127
    without one) and its first exponent bound."""
    pending, seen = [value.producer()], set()
    qmax, bound = ROW_QMAX, 0
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen or TAG not in node.metadata_props:
            continue
        seen.add(id(node))
        role = node.metadata_props[TAG]
        if role == "over" and (bounds := const_array(node.inputs[1])) is not None:
            bound = int(np.asarray(bounds).ravel()[0])
        if role == "saturate" and (top := const_array(node.inputs[2])) is not None:
            qmax = int(top)
        pending.extend(v.producer() for v in node.inputs if v is not None)
    return qmax, bound or qmax


def nodes_of(graph: ir.Graph) -> set[int]:
    """ids of every node of every row-exponent read in ``graph`` (lowered with the linears reading them)."""
    return {id(node) for node in graph if TAG in node.metadata_props}
