"""Which activations get more than one int8 scale: wide (int16) residual tensors and per-channel norm outputs.

Transformers carry a few huge channels in the residual stream (BERT's outlier dimensions, Llama's massive
activations). One int8 scale per tensor then leaves the other channels a handful of levels. Two integer-only
remedies, chosen from the graph alone:

- **Wide tensors.** A tensor that only residual adds, norms and elementwise activation products read (the
  residual stream: a residual sum, an output projection that writes into it; SwiGLU's gate and up halves) is
  never a GEMM operand, so it can be int16 at no cost to the W8A8 kernels: ``RescaleAdd``, ``IntLayerNorm`` and
  the int32 product take int16; so does an online Hadamard (a MatMul by ``c (S (x) h)``: exact adds in
  int32), which makes the rotation see its input at 16 bits before its output goes back to int8.
- **Per-channel norm and activation outputs.** A LayerNorm, RMSNorm, GELU, sigmoid or product (SwiGLU) output
  read only by
  constant-weight linear layers, residual adds and graph outputs gets one scale per channel of its last axis
  (the integer op's output rescale takes one multiplier per channel at no cost). Linear layers fold the ratios
  into their weight rows before the weights are quantized (``W'[c, :] = W[c, :] t_c / t_0``) and read the
  int8 values at the single scale ``t_0``: the run-time GEMM stays per-tensor (REFERENCES.md section 1:
  RepQuant, OutlierTune). Residual adds take one multiplier per channel.

Only shape ops that keep the last axis pass either property through to their readers.

With ``attention`` (recipe key ``attention_bits = 16``) a third class is int16: **attention operands**, the tensors
read only by attention's activation x activation products (Q, K after RoPE, V), by RoPE itself (the q and k
projections' outputs: an int32 product with the int8 cos/sin tables) or by SiLU (its input). Their int8 rounding
is what is left of W8A8's loss on Llama-family models once the norm outputs are balanced (docs/results.md).
The score product ``Q K^T`` then multiplies two int16 tensors: each is clamped to
``|q| <= floor(sqrt((2^31 - 1) / d))`` (d the head dimension: 5792 for d = 64, about 13.5 bits) so the int32
accumulator cannot overflow; the clamp is a ``Clip`` before the ``QuantizeLinear`` (the fused-activation form
the lowering already reads), so the QDQ graph and the integer code agree. ``P V`` needs no clamp: a row of int16
probabilities sums to at most ``2^15 (1 + T 2^-16)``, so ``|P V| < 2^31`` for int16 V and T < 65,000 tokens.
With ``narrow_kv`` (recipe key ``kv_bits = 8``) the right operands of the products (K and V: what a KV cache
holds) stay int8: the cache is half the size, and the int16 queries need no clamp (``127 * 32767 * d < 2^31``
for d up to 516).

With ``activations`` (recipe key ``activation_bits = 16``, W8A16) every other activation is int16 too where its
producer can clamp its output and every reader takes int16 (the ``wide_input`` column of
:mod:`qcompiler.ir.ops`): constant-weight linears, tables over the input's levels, sums, products and moves.
Mobile CNNs (depthwise convolutions, hard-swish, squeeze-excitation) lose several points of accuracy to int8
activations that no range choice recovers (PP-LCNet's text orientation: 95.2 % float, 89.5 % W8A8, 96.8 %
W8A16). A linear reading an int16 tensor sums ``K`` products of up to ``127 B`` (``B`` the tensor's level bound)
plus its bias in int32: :func:`wide_activation_bound` picks the largest ``B <= 32767`` for which that sum cannot
overflow, and the bound is the producer's output clamp (a ``Clip`` before the ``QuantizeLinear``), so the int32
arithmetic stays exact for every input, not only for the calibrated ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Set

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.hadamard import hadamard_structure
from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.analysis.pooling import average_pool_window
from qcompiler.ir.graph import const_array, consumers, is_graph_output, node_label
from qcompiler.ir.ops import (
    CHANNEL_PRODUCERS,
    CLAMPING_OPS,
    FUSABLE_ACTIVATIONS,
    FUSING_ANCHORS,
    KEEPS_WIDTH_OPS,
    LAYOUT_OPS,
    OWN_SCALE_OPS,
    SHAPE_READERS,
    WIDE_INPUT_OPS,
    WIDE_PRODUCERS,
    ops_where,
    traits,
)

#: ops that move values without changing them; their output inherits the input's precision
_PASS_THROUGH = LAYOUT_OPS
#: also pass storage width through (not per-channel scales): selections, broadcasts, negation, RoPE's halves
_WIDTH_PASS_THROUGH = KEEPS_WIDTH_OPS
INT32_MAX = int(np.iinfo(np.int32).max)
INT16_MAX = int(np.iinfo(np.int16).max)
_WIDE_PRODUCERS = WIDE_PRODUCERS
#: W8A16: ops whose output is the input's int16 levels moved (its readers decide for it); Concat only of one root
_WIDE_ACTIVATION_THROUGH = ops_where(lambda t: t.quantize == "inherit" and t.wide_input) | {"Concat"}
_PER_CHANNEL_PRODUCERS = CHANNEL_PRODUCERS


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """``id(value)`` sets: values stored as int16, values quantized per channel of the last axis."""

    wide: Set[int]
    per_channel: Set[int]
    #: for per-channel values: max |W[c, :]| per input channel over every linear layer reading them
    weight_absmax: Mapping[int, np.ndarray] = dataclasses.field(default_factory=dict)
    #: for wide values that must stay below a bound (the score product's operands): the largest integer level
    bounds: Mapping[int, int] = dataclasses.field(default_factory=dict)
    #: wide residual-stream values with one int16 scale per channel of the last axis
    wide_per_channel: Set[int] = frozenset()
    #: W8A16 (``activations``): activations stored int16 because every reader takes int16; their level bound
    #: comes from the calibrated range and the readers' weights (:func:`wide_activation_bound`)
    activations: Set[int] = frozenset()


def _keeps_last_axis(node: ir.Node) -> bool:
    source, out = node.inputs[0], node.outputs[0]
    if source is None or source.shape is None or out.shape is None or len(source.shape) == 0 or len(out.shape) == 0:
        return False
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == len(perm) - 1
    last_in, last_out = source.shape[-1], out.shape[-1]
    return isinstance(last_in, int) and last_in == last_out


def _readers_all(
    graph: ir.Graph,
    value: ir.Value,
    accept: Callable[[ir.Node, int], bool],
    excluded: Set[int],
    any_shape: bool = False,
    through: Set[str] = _PASS_THROUGH,
    root: ir.Value | None = None,
    caches: Set[int] = frozenset(),
) -> bool:
    """Every reader of ``value`` (looking through last-axis-keeping shape ops, or through every op of ``through``
    with ``any_shape``: storage width survives a head merge, per-channel scales do not) satisfies ``accept``.
    ``caches``: ``id`` of KV-cache inputs, which a Concat may join to the value (they take its precision)."""
    readers = list(value.uses())
    if not readers and not is_graph_output(graph, value):
        return False
    root = value if root is None else root
    for node, index in readers:
        if id(node) in excluded:
            return False
        if node.op_type in SHAPE_READERS:
            continue  # reads the shape alone: any precision serves it
        if node.op_type in through and (index == 0 or node.op_type == "Concat"):
            if node.op_type == "Concat" and not all(
                id(v) in caches or _derived_from(v, root, through) for v in node.inputs
            ):
                return False  # every part must share the value's precision
            if not (any_shape or _keeps_last_axis(node)) or not all(
                _readers_all(graph, out, accept, excluded, any_shape, through, root, caches) for out in node.outputs
            ):  # every part of a Split
                return False
        elif not accept(node, index):
            return False
    return True


def _derived_from(value: ir.Value | None, root: ir.Value, through: Set[str]) -> bool:
    """``value`` is ``root`` or computed from it by ``through`` ops alone (RoPE's rotate-half parts)."""
    for _ in range(16):
        if value is None:
            return False
        if value is root:
            return True
        producer = value.producer()
        if producer is None or producer.op_type not in through or producer.op_type == "Concat":
            return False
        value = producer.inputs[0]
    return False


def hadamard_matmul(node: ir.Node) -> tuple[float, np.ndarray] | None:
    """``(c, h)`` for a MatMul by a constant ``c (S (x) h)`` (an online Hadamard: the integer ``Hadamard`` op),
    else None."""
    if node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    weight = const_array(node.inputs[1])
    if weight is None or const_array(node.inputs[0]) is not None:
        return None
    return hadamard_structure(weight)


def _reads_through_hadamard(node: ir.Node, index: int) -> bool:
    """An online Hadamard reads its input exactly in int32 (``|y| <= n max|x|``), so int16 costs nothing."""
    return index == 0 and hadamard_matmul(node) is not None


def _is_residual_add(node: ir.Node, index: int) -> bool:
    return node.op_type == "Add" and any(const_array(v) is None for v in node.inputs)


def _is_activation_product(node: ir.Node, index: int) -> bool:
    """An elementwise product of two activations (SwiGLU's gate times up): computed in int32, so int16 factors
    (|a b| < 2^30) cost nothing."""
    return node.op_type == "Mul" and all(const_array(v) is None for v in node.inputs)


def _reads_wide(node: ir.Node, index: int) -> bool:
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        return index == 0
    return _is_residual_add(node, index) or _is_activation_product(node, index) or _reads_through_hadamard(node, index)


def is_attention_product(node: ir.Node) -> bool:
    """A MatMul of two computed tensors (attention's ``Q K^T`` and ``P V``)."""
    return node.op_type == "MatMul" and all(v is not None and const_array(v) is None for v in node.inputs)


def _reads_attention_operand(node: ir.Node, index: int, narrow_kv: bool = False) -> bool:
    """int16 costs nothing here: an int32 product with a constant (RoPE's tables) or a scalar rescale, or an
    attention product (bounded as the module docstring says); with ``narrow_kv`` only its left operand (Q, P):
    the right one (K, V: what a KV cache holds) stays int8."""
    if node.op_type in ("Mul", "Div"):
        return any(const_array(v) is not None for v in node.inputs)
    return is_attention_product(node) and (index == 0 or not narrow_kv)


def _reads_per_channel(node: ir.Node, index: int) -> bool:
    if _is_residual_add(node, index):
        return True
    if node.op_type in ("Gemm", "MatMul") and index == 0:
        weight = const_array(node.inputs[1])
        return weight is not None and weight.ndim == 2 and hadamard_matmul(node) is None
    return False


def _linear_readers(value: ir.Value) -> list[ir.Node]:
    found = []
    for node, index in value.uses():
        if node.op_type in _PASS_THROUGH and index == 0:
            found.extend(_linear_readers(node.outputs[0]))
        elif _reads_per_channel(node, index) and node.op_type in ("Gemm", "MatMul"):
            found.append(node)
    return found


def linear_weight_absmax(value: ir.Value) -> np.ndarray | None:
    """``max |W[c, :]|`` per input channel c over every constant-weight linear layer reading ``value``."""
    rows = []
    for node in _linear_readers(value):
        weight = const_array(node.inputs[1])
        assert weight is not None
        in_axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
        rows.append(np.abs(weight.astype(np.float64)).max(axis=1 - in_axis))
    return np.max(rows, axis=0) if rows else None


def linear_reader_weights(value: ir.Value) -> list[np.ndarray]:
    """The ``[C, N]`` weight (float64, input channels first) of every constant-weight linear layer reading
    ``value``."""
    weights = []
    for node in _linear_readers(value):
        weight = const_array(node.inputs[1])
        assert weight is not None
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        weights.append((weight.T if transposed else weight).astype(np.float64))
    return weights


def _product_operands(product: ir.Node, caches: Set[int] = frozenset()) -> list[list[ir.Value]]:
    """For each input of an attention product, the tensors it is read from through width pass-through ops (but
    the KV-cache inputs ``caches``: they hold what the new values were)."""
    found: list[list[ir.Value]] = []
    for value in product.inputs:
        roots: list[ir.Value] = []
        stack = [value]
        while stack:
            current = stack.pop()
            producer = current.producer() if current is not None else None
            if producer is not None and producer.op_type in _WIDTH_PASS_THROUGH:
                stack.extend(producer.inputs if producer.op_type == "Concat" else producer.inputs[:1])
            elif current is not None and id(current) not in caches:
                roots.append(current)
        found.append(roots)
    return found


def _score_bounds(graph: ir.Graph, wide_ids: Set[int], caches: Set[int] = frozenset()) -> dict[int, int]:
    """The clamp of every wide operand of an attention product whose other operand is wide too (``Q K^T``):
    ``|a| |b| d <= 2^31 - 1`` with equal bounds, ``d`` the contracted length."""
    bounds: dict[int, int] = {}
    for node in graph:
        if not is_attention_product(node):
            continue
        operands = _product_operands(node, caches)
        if not all(roots and all(id(r) in wide_ids for r in roots) for roots in operands):
            continue
        shape = node.inputs[0].shape
        depth = shape[-1] if shape is not None and len(shape) else None
        if not isinstance(depth, int):
            raise UnsupportedOpError(node_label(node), "MatMul", "int16 attention operands need a static head "
                                     "dimension (the contracted axis); set attention_bits = 8")  # fmt: skip
        bound = min(math.isqrt(INT32_MAX // depth), INT16_MAX)
        for roots in operands:
            for root in roots:
                bounds[id(root)] = min(bounds.get(id(root), bound), bound)
    return bounds


def _constant_weight_input(node: ir.Node, index: int) -> bool:
    """``node`` reads input ``index`` against a constant: a linear's weight, or a constant left operand."""
    if node.op_type in ("Conv", "Gemm", "MatMul") and index == 0:
        return len(node.inputs) > 1 and const_array(node.inputs[1]) is not None
    return node.op_type == "MatMul" and index == 1 and const_array(node.inputs[0]) is not None


def _reads_wide_activation(node: ir.Node, index: int) -> bool:
    """W8A16: ``node`` reads an int16 input ``index`` exactly (the ``wide_input`` column, and the node's own
    conditions: a constant weight for a linear, a scalar table for a lookup)."""
    if node.op_type not in WIDE_INPUT_OPS:
        return False
    row = traits(node.op_type)
    if row is not None and row.linear:
        return _constant_weight_input(node, index)
    if row is not None and row.lowering == "lookup":  # one table row per constant element: a scalar only
        others = [const_array(v) for i, v in enumerate(node.inputs) if i != index and v is not None]
        return index == 0 and all(c is not None and c.size <= 1 for c in others)
    if row is not None and row.lowering == "nonlinear":  # LayerNorm, RMSNorm: the data input
        return index == 0
    return True


def writes_clamped(node: ir.Node | None) -> bool:
    """Its integer form can take a level bound as its output clamp (a Relu/Clip after a clamping producer too)."""
    if node is None:
        return False
    if node.op_type in FUSABLE_ACTIVATIONS:
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        return producer is not None and producer.op_type in FUSING_ANCHORS
    return node.op_type in CLAMPING_OPS


def _wide_activation_values(graph: ir.Graph, excluded: Set[int], taken: Set[int], silu: Set[int]) -> set[int]:
    """W8A16: every activation quantized at a scale of its own (graph inputs, outputs of ops with their own
    scale or of an activation fused after one) whose readers all take int16, other than those another rule
    already placed (``taken``). A SiLU's Sigmoid (``silu``, inside ``excluded``) reads int16: its table, or
    IntSigmoid's 16-bit form. The level bound is chosen at quantization (:func:`wide_activation_bound`); a
    producer that cannot clamp (:func:`writes_clamped`) keeps the value int8 when a bound is needed."""
    found: set[int] = set()
    candidates = [v for v in graph.inputs if v.dtype == ir.DataType.FLOAT]
    for node in graph:
        if id(node) in excluded or not node.outputs or node.op_type == "Softmax":
            continue
        if node.op_type not in OWN_SCALE_OPS and not writes_clamped(node):
            continue
        out = node.outputs[0]
        readers = consumers(out)
        if len(readers) == 1 and readers[0].op_type in FUSABLE_ACTIVATIONS and node.op_type in FUSING_ANCHORS:
            continue  # the fused activation carries the output
        candidates.append(out)
    for value in candidates:
        if id(value) in taken:
            continue
        through = _WIDE_ACTIVATION_THROUGH
        if _readers_all(graph, value, _reads_wide_activation, excluded - silu, any_shape=True, through=through):
            found.add(id(value))
    return found


def _sum_readers(graph: ir.Graph, value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The readers of ``value`` and of width-keeping moves of it (the ops whose int32 sums it enters)."""
    found: list[tuple[ir.Node, int]] = []

    def collect(node: ir.Node, index: int) -> bool:
        found.append((node, index))
        return True

    _readers_all(graph, value, collect, frozenset(), any_shape=True, through=_WIDE_ACTIVATION_THROUGH)
    return found


def _reduced_count(node: ir.Node) -> int | None:
    """How many input elements one output element of a pool or reduction sums (None: unknown)."""
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    dims = list(shape) if shape is not None else None
    if node.op_type == "GlobalAveragePool":
        spatial = dims[2:] if dims is not None else None
        return math.prod(spatial) if spatial and all(isinstance(d, int) for d in spatial) else None
    if node.op_type == "AveragePool":  # each window sum times L / n, L the divisors' least common multiple
        try:
            return int(np.lcm.reduce(np.unique(average_pool_window(node).counts)))
        except UnsupportedOpError:
            return None
    if node.op_type in ("ReduceMean", "ReduceSum"):
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        picked = range(len(dims)) if axes is None else [int(a) % len(dims) for a in axes.reshape(-1)]
        return math.prod(int(dims[a]) for a in picked)
    return 1


def wide_activation_bound(graph: ir.Graph, value: ir.Value, absmax: float, weight_qmax: int = 127) -> int:
    """The largest level bound ``B <= 32767`` of an int16 W8A16 ``value`` (scale ``absmax / B``) for which every
    int32 sum its readers form is exact: a linear's ``B * (weight_qmax * K + max_n |bias_n| / (absmax s_w,n))``
    (``K`` its reduction length, ``s_w,n = max|W_n| / weight_qmax`` the per-channel weight step), a pool's or
    reduction's ``B * count``. 32767 means no clamp: the int16 storage, whose ``-32768`` the sums also allow.
    0 when no bound of at least 2^7 exists (the value stays int8)."""
    bound = INT16_MAX + 1  # |x| of unclamped int16 storage
    for node, index in _sum_readers(graph, value):
        if node.op_type in ("Conv", "Gemm", "MatMul") and _constant_weight_input(node, index):
            weight = const_array(node.inputs[1 - index]) if node.op_type == "MatMul" else const_array(node.inputs[1])
            assert weight is not None
            w = weight.astype(np.float64)
            if node.op_type == "Conv":
                rows = w.reshape(w.shape[0], -1)
            elif node.op_type == "Gemm":
                rows = w if node.attributes.get_int("transB", 0) else w.T
            elif index == 0:
                rows = np.moveaxis(w, -1, -2).reshape(-1, w.shape[-2])
            else:  # a constant left operand [.., M, K]: one int8 scale for the whole table
                rows = w.reshape(-1, w.shape[-1])
            depth = rows.shape[1]
            peak = np.abs(rows).max(axis=1)
            top = float(peak.max(initial=0.0))
            # as qdq.quantize_weight_per_channel: a dead channel (below 2^-24 of the largest) gets the largest's
            # step, an all-zero one the step 1
            step = np.where(peak > 0, np.where(peak <= top * 2.0**-24, top, peak) / weight_qmax, 1.0)
            bias = const_array(node.inputs[2]) if node.op_type != "MatMul" and len(node.inputs) > 2 else None
            bias_levels = 0.0
            if bias is not None and absmax > 0:
                b = np.abs(np.broadcast_to(bias.astype(np.float64).reshape(-1), (rows.shape[0],)))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(step > 0, b / (absmax * np.where(step > 0, step, 1.0)), 0.0)
                bias_levels = float(ratio.max(initial=0.0))
            bound = min(bound, int((INT32_MAX - 1) // (weight_qmax * depth + bias_levels + 1)))  # +1: rounding
        else:
            count = _reduced_count(node)
            if count is None:
                return 0
            bound = min(bound, INT32_MAX // max(count, 1))
    if bound > INT16_MAX:
        return INT16_MAX  # the storage holds it: no clamp
    return bound if bound >= 128 else 0


def plan_precision(
    graph: ir.Graph,
    excluded: Set[int],
    *,
    wide: bool,
    per_channel: bool,
    attention: bool = False,
    silu: Set[int] = frozenset(),
    residual_channels: bool = False,
    activations: bool = False,
    cache_inputs: Set[str] = frozenset(),
    narrow_kv: bool = False,
) -> PrecisionPlan:
    """Decide, from the graph alone, which anchor outputs are wide and which are per-channel.

    Args:
        graph: the float graph, before QDQ insertion.
        excluded: ``id(node)`` of nodes that must keep per-tensor int8 inputs (softmax groups).
        wide: enable int16 residual tensors.
        per_channel: enable per-channel norm outputs.
        attention: enable int16 attention operands (the module docstring).
        silu: ``id`` of the Sigmoids of SiLU groups (in ``excluded``): with ``attention`` their input may be wide.
        residual_channels: wide residual-stream values (written by a residual add or a linear layer, read only by
            residual adds and RMSNorms) get one int16 scale per channel (the massive activations of Llama-family
            models would otherwise set one coarse step for every channel).
        activations: W8A16, every other activation int16 where its readers take it (the module docstring).
        cache_inputs: names of KV-cache inputs: the Concat that appends new keys or values to one is looked through
            (the cache is stored at the new values' precision: int16 attention operands make an int16 cache).
        narrow_kv: with ``attention``, the right operands of attention products (keys and values) stay int8
            (recipe key ``kv_bits = 8``): an int8 cache, and no clamp on the score product's int16 queries.
    """
    caches = frozenset(id(v) for v in graph.inputs if v.name in cache_inputs)
    wide_ids: set[int] = set()
    channel_ids: set[int] = set()
    weight_absmax: dict[int, np.ndarray] = {}
    stream_channels: set[int] = set()

    def reads_operand(node: ir.Node, index: int) -> bool:
        # residual adds and norms only when residuals are wide; SiLU's product and Sigmoid always
        stream = _reads_wide(node, index) if wide else _is_activation_product(node, index)
        return stream or _reads_attention_operand(node, index, narrow_kv) or id(node) in silu

    for node in graph:
        if id(node) in excluded or not node.outputs:
            continue
        out = node.outputs[0]
        if len(consumers(out)) == 1 and consumers(out)[0].op_type in ("Relu", "Clip"):
            continue  # a fused activation carries the output
        hadamard_only = wide and _readers_all(graph, out, _reads_through_hadamard, excluded, any_shape=True)
        operand = (
            attention
            and node.op_type in _WIDE_PRODUCERS
            and not is_attention_product(node)  # the scores' width is softmax_input_bits' business
            and _readers_all(
                graph, out, reads_operand, excluded - silu, any_shape=True, through=_WIDTH_PASS_THROUGH, caches=caches
            )
        )
        if operand:
            wide_ids.add(id(out))
        elif (
            wide
            and node.op_type in _WIDE_PRODUCERS
            and (hadamard_only or _readers_all(graph, out, _reads_wide, excluded))
        ):
            if node.op_type in ("Gemm", "MatMul") and const_array(node.inputs[1]) is None and not hadamard_only:
                continue  # attention's activation x activation products stay int8 (unless a Hadamard reads them)
            wide_ids.add(id(out))
        elif (
            per_channel
            and node.op_type in _PER_CHANNEL_PRODUCERS
            and _readers_all(graph, out, _reads_per_channel, excluded)
        ):
            channel_ids.add(id(out))
            weights = linear_weight_absmax(out)
            if weights is not None:
                weight_absmax[id(out)] = weights
    if residual_channels:
        stream_channels = {
            id(node.outputs[0])
            for node in graph
            if node.outputs
            and id(node.outputs[0]) in wide_ids
            and _writes_stream(node)
            and _readers_all(graph, node.outputs[0], _reads_stream, excluded)
        }
    bounds = _score_bounds(graph, wide_ids, caches) if attention else {}
    # W8A16 before per-channel int8: 2^15 levels per tensor beat 2^7 per channel (and need no weight folds)
    wide_activations = _wide_activation_values(graph, excluded, wide_ids, silu) if activations else set()
    channel_ids -= wide_activations
    weight_absmax = {k: v for k, v in weight_absmax.items() if k in channel_ids}
    return PrecisionPlan(
        frozenset(wide_ids),
        frozenset(channel_ids),
        weight_absmax,
        bounds,
        frozenset(stream_channels),
        frozenset(wide_activations),
    )


def _writes_stream(node: ir.Node) -> bool:
    """A residual add, or a linear layer with a constant weight (an output projection; not a convolution, whose
    channels are not the last axis)."""
    if node.op_type == "Add":
        return all(const_array(v) is None for v in node.inputs)
    return node.op_type in ("Gemm", "MatMul") and const_array(node.inputs[1]) is not None


def _reads_stream(node: ir.Node, index: int) -> bool:
    """Readers that take one scale per channel: residual adds (a multiplier per channel) and RMSNorm (each channel
    to one statistics scale first: qcompiler.dialect.nonlinear.layernorm_prescale)."""
    return _is_residual_add(node, index) or (node.op_type == "RMSNormalization" and index == 0)
