"""Number formats for weights and activations: integers, FP8, and the block formats MX (OCP Microscaling v1.0)
and NV (NVFP4's two-level scales), one row each in :data:`FORMATS`.

A format is an element grid and a rule for the scale the elements are read at:

- **one scale per slice** (a token's row of activations, a weight's output channel): ``s = clip max|x| / max``,
  float32 (``int8``, ``int4``, ``fp8_e4m3``, ``fp8_e5m2``);
- **MX**: one power-of-two scale (E8M0) per block of 32 consecutive elements along the reduction axis,
  ``X = 2^(floor(log2 max|x|) - emax)`` with ``emax`` the exponent of the element's largest power of two; elements
  beyond the largest saturate (``mxint8``, ``mxint4``, ``mxfp8_e4m3``, ``mxfp4``);
- **NV**: one FP8 E4M3 scale per block of 16 under a float32 scale per slice ``g = max|x| / (max 448)``: the
  block's ``E4M3(max|x_b| / (max g)) g`` (``nvfp4``, ``nvint4``).

Elements: integer codes ``q in [-qmax, qmax]`` times ``2^-f`` (MXINT8: int8 at ``2^-6``; MXINT4, by analogy, int4 at
``2^-2``: the OCP spec defines MXINT8 only; symmetric, so negation never overflows), or FP values rounded to
nearest even on ``2^(e - m)`` steps, ``e = max(floor(log2 |v|), emin)`` (subnormals below ``emin``), saturating
at the largest finite value (ONNX's ``Cast`` with ``saturate=1``: tested equal to it).

The integer path compiles ``int8`` and ``int4`` weights and ``mxint4`` (int4 codes with power-of-two group scales:
the grouped int4 GEMM, :func:`qcompiler.passes.quantize.weights.quantize_rtn` with ``shared_exponent``). The
others are float simulations (:class:`~qcompiler.passes.quantize.fake.FakeQuantizePass`) whose weights export as
ONNX QDQ in their own ONNX element type (:func:`export_weight`).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer

E4M3_MAX = 448.0
#: the narrow float element types as numpy dtypes (ml_dtypes: onnx_ir's own dependency)
_ML_DTYPES = {ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E5M2: ml_dtypes.float8_e5m2,
              ir.DataType.FLOAT4E2M1: ml_dtypes.float4_e2m1fn}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NumberFormat:
    """An element grid and its scale rule (the module docstring)."""

    name: str
    #: ``int`` (codes times ``2^-fraction_bits``) or ``fp``
    element: str
    bits: int
    #: int: fraction bits of the element (its codes are ``v 2^f``); fp: stored mantissa bits
    mantissa_bits: int
    #: the largest element magnitude
    max_value: float
    #: fp: the smallest normal exponent
    min_exponent: int = 0
    #: elements sharing one block scale along the reduction axis; None: one scale per slice
    block_size: int | None = None
    #: ``e8m0`` (MX: a power of two) or ``e4m3`` (NV: FP8 under a per-slice float scale); None without blocks
    block_scale: str | None = None
    #: the element type of a QDQ export
    onnx_type: ir.DataType = ir.DataType.INT8

    @property
    def emax(self) -> int:
        """The exponent of the largest power of two an element holds (OCP's ``emax_elem``)."""
        return math.floor(math.log2(self.max_value))

    @property
    def qmax(self) -> int:
        """Integer elements: the largest code."""
        return round(self.max_value * 2.0**self.mantissa_bits)


def _int(
    name: str, bits: int, fraction: int = 0, block_size: int | None = None, block_scale: str | None = None
) -> NumberFormat:
    qmax = 2 ** (bits - 1) - 1
    kind = ir.DataType.INT8 if bits == 8 else ir.DataType.INT4
    return NumberFormat(name, "int", bits, fraction, qmax * 2.0**-fraction, 0, block_size, block_scale, kind)


#: fp element grids: stored mantissa bits, largest finite value, smallest normal exponent, ONNX type
_E4M3 = (3, E4M3_MAX, -6, ir.DataType.FLOAT8E4M3FN)
_E5M2 = (2, 57344.0, -14, ir.DataType.FLOAT8E5M2)
_E2M1 = (1, 6.0, 0, ir.DataType.FLOAT4E2M1)
_MX = (32, "e8m0")
_NV = (16, "e4m3")


def _fp(name: str, bits: int, grid: tuple[int, float, int, ir.DataType], block_size: int | None = None,
        block_scale: str | None = None) -> NumberFormat:  # fmt: skip
    mantissa, top, emin, kind = grid
    return NumberFormat(name, "fp", bits, mantissa, top, emin, block_size, block_scale, kind)


FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    _int("int8", 8),
    _int("int4", 4),
    _fp("fp8_e4m3", 8, _E4M3),
    _fp("fp8_e5m2", 8, _E5M2),
    _int("mxint8", 8, 6, *_MX),
    _int("mxint4", 4, 2, *_MX),
    _fp("mxfp8_e4m3", 8, _E4M3, *_MX),
    _fp("mxfp4", 4, _E2M1, *_MX),
    _fp("nvfp4", 4, _E2M1, *_NV),
    _int("nvint4", 4, 0, *_NV),
)}  # fmt: skip
_E4M3_GRID = FORMATS["fp8_e4m3"]


def number_format(name: str) -> NumberFormat:
    """The row of ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in FORMATS:
        raise ValueError(f"format: unknown number format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def floor_log2(values: np.ndarray) -> np.ndarray:
    """``floor(log2 v)`` exactly for positive finite ``v`` (the binary exponent, from ``frexp``)."""
    return (np.frexp(values)[1] - 1).astype(np.float32)


def shared_exponent_scale(peak: np.ndarray, emax: int) -> np.ndarray:
    """MX's block scale ``X = 2^(floor(log2 peak) - emax)`` (E8M0), 1 where the block is all zeros."""
    peak = np.asarray(peak)
    exponent = floor_log2(np.where(peak > 0, peak, 1)).astype(peak.dtype) - emax
    return np.where(peak > 0, np.exp2(exponent), 1).astype(peak.dtype)


def round_elements(values: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """``values`` (already divided by their scale, float32) rounded onto ``fmt``'s element grid, float32."""
    v = np.asarray(values, dtype=np.float32)
    if fmt.element == "int":
        unit = np.float32(2.0**fmt.mantissa_bits)
        return (np.clip(np.rint(v * unit), -fmt.qmax, fmt.qmax) / unit).astype(np.float32)
    tiny = np.float32(2.0**-126)
    exponent = np.maximum(floor_log2(np.maximum(np.abs(v), tiny)), np.float32(fmt.min_exponent))
    step = np.exp2(exponent - np.float32(fmt.mantissa_bits)).astype(np.float32)
    top = np.float32(fmt.max_value)
    return np.clip(np.rint(v / step) * step, -top, top).astype(np.float32)


def _blocks(x: np.ndarray, fmt: NumberFormat) -> np.ndarray:
    """``x [..., n]`` as ``[..., n / b, b]`` (one slice: ``[..., 1, n]``)."""
    size = fmt.block_size or x.shape[-1]
    if x.shape[-1] % size:
        raise ValueError(f"{fmt.name}: the reduction axis has {x.shape[-1]} elements, not a multiple of the block "
                         f"size {size}; use a format without blocks for this tensor")  # fmt: skip
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def block_scales(x: np.ndarray, fmt: NumberFormat, clip: float = 1.0) -> np.ndarray:
    """The scale of every block of ``x [..., n]`` along its last axis, ``[..., n / b, 1]`` float32 (one slice:
    ``[..., 1, 1]``); 1 where a block is all zeros, 0 where its scale underflows (an NV block below E4M3's
    smallest step of its slice's scale: it reads as zeros). ``clip`` scales the per-slice maximum (slice scales
    only)."""
    blocks = _blocks(np.asarray(x, dtype=np.float32), fmt)
    peak = np.abs(blocks).max(axis=-1, keepdims=True)
    zero = peak == 0
    if fmt.block_scale is None:
        scale = peak * np.float32(clip / fmt.max_value)
    elif fmt.block_scale == "e8m0":
        scale = shared_exponent_scale(peak, fmt.emax)
    else:  # e4m3 block scales under one float scale per slice
        slice_peak = peak.max(axis=-2, keepdims=True)
        outer = np.where(slice_peak > 0, slice_peak * np.float32(1.0 / (fmt.max_value * E4M3_MAX)), 1)
        inner = round_elements(peak * np.float32(1.0 / fmt.max_value) / outer, _E4M3_GRID)
        scale = inner * outer
    return np.where(zero, np.float32(1), scale).astype(np.float32)


def _divisor(scales: np.ndarray) -> np.ndarray:
    """The scales elements are divided by: 1 where a scale is 0 (its elements are then multiplied by 0)."""
    return np.where(scales > 0, scales, np.float32(1)).astype(np.float32)


def quantize(x: np.ndarray, fmt: NumberFormat, axis: int = -1, clip: float = 1.0) -> np.ndarray:
    """``x`` rounded to ``fmt`` with its scales along ``axis`` (the reduction axis: blocks run along it, slices
    across it), dequantized: float32 of ``x``'s shape.

    Raises:
        ValueError: a block format over an axis whose length is not a multiple of the block size.
    """
    moved = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    elements, scales = _encode(moved, fmt, clip)
    return np.moveaxis((elements * scales).reshape(moved.shape), -1, axis)


def _encode(moved: np.ndarray, fmt: NumberFormat, clip: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``moved [..., n]``'s elements on ``fmt``'s grid ``[..., n / b, b]`` and their scales ``[..., n / b, 1]``."""
    scales = block_scales(moved, fmt, clip)
    return round_elements(_blocks(moved, fmt) / _divisor(scales), fmt), scales


def export_weight(graph: ir.Graph, weight: np.ndarray, fmt: NumberFormat, name: str, before: ir.Node) -> ir.Value:
    """``weight [in, out]`` (a linear's, reduction along axis 0) stored in ``fmt``'s ONNX element type with its
    scales, read through one ``DequantizeLinear`` (``axis`` 0 and ``block_size`` for block formats, else per
    output channel) inserted before ``before``: the standard QDQ form other ONNX tools read. Its value equals
    :func:`quantize` ``(weight, fmt, axis=0)`` bit for bit. Returns the ``DequantizeLinear`` output."""
    w = np.asarray(weight, dtype=np.float32)
    blocked, block_scale = _encode(w.T, fmt)  # [out, in / b, b], [out, in / b, 1]
    elements, scales = blocked.reshape(w.T.shape).T, block_scale[..., 0].T  # [in, out], [in / b, out]
    size = fmt.block_size or w.shape[0]
    unit = np.float32(2.0**fmt.mantissa_bits) if fmt.element == "int" else np.float32(1)
    stored = (
        np.rint(elements * unit).astype(np.int8) if fmt.element == "int" else elements.astype(_ML_DTYPES[fmt.onnx_type])
    )
    codes = add_initializer(graph, f"{name}_{fmt.name}", stored, dtype=fmt.onnx_type)
    scale_array = (scales / unit).astype(np.float32)
    scale = add_initializer(graph, f"{name}_{fmt.name}_scale", scale_array if fmt.block_size else scale_array[0])
    attributes: dict[str, int] = {"axis": 0, "block_size": size} if fmt.block_size else {"axis": 1}
    node = ir.node("DequantizeLinear", [codes, scale], attributes=attributes)
    node.outputs[0].name = f"{name}_{fmt.name}_dq"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(w.shape)
    graph.insert_before(before, node)
    return node.outputs[0]


class _Builder:
    """Appends float32 nodes for :func:`fake_quantize_graph`."""

    def __init__(self, graph: ir.Graph, base: str) -> None:
        self.graph, self.base = graph, base
        self.nodes: list[ir.Node] = []

    def const(self, tag: str, value: float | list[int]) -> ir.Value:
        array = np.array(value, dtype=np.int64 if isinstance(value, list) else np.float32)
        return add_initializer(self.graph, f"{self.base}_{tag}", array)

    def op(self, kind: str, *inputs: ir.Value, **attributes: int) -> ir.Value:
        node = ir.node(kind, list(inputs), attributes=attributes)
        node.outputs[0].dtype = {"Shape": ir.DataType.INT64, "Greater": ir.DataType.BOOL,
                                 "LessOrEqual": ir.DataType.BOOL}.get(kind, ir.DataType.FLOAT)  # fmt: skip
        self.nodes.append(node)
        return node.outputs[0]

    def floor_log2(self, positive: ir.Value) -> ir.Value:
        """``floor(log2 v)``: from ``Log``, corrected by one either way where float rounding crossed a power."""
        guess = self.op("Floor", self.op("Mul", self.op("Log", positive), self.const("inv_ln2", 1.0 / math.log(2.0))))
        power = self.op("Pow", self.const("two", 2.0), guess)
        up = self.op("Cast", self.op("LessOrEqual", self.op("Mul", power, self.const("two_", 2.0)), positive),
                     to=ir.DataType.FLOAT)  # fmt: skip
        down = self.op("Cast", self.op("Greater", power, positive), to=ir.DataType.FLOAT)
        return self.op("Sub", self.op("Add", guess, up), down)

    def round_elements(self, v: ir.Value, fmt: NumberFormat) -> ir.Value:
        if fmt.element == "int":
            unit = 2.0**fmt.mantissa_bits
            codes = self.op("Clip", self.op("Round", self.op("Mul", v, self.const("unit", unit))),
                            self.const("lo", -fmt.qmax), self.const("hi", fmt.qmax))  # fmt: skip
            return self.op("Mul", codes, self.const("ulp", 1.0 / unit))
        magnitude = self.op("Max", self.op("Abs", v), self.const("tiny", 2.0**-126))
        exponent = self.op("Max", self.floor_log2(magnitude), self.const("emin", fmt.min_exponent))
        step = self.op("Pow", self.const("base", 2.0), self.op("Sub", exponent, self.const("m", fmt.mantissa_bits)))
        rounded = self.op("Mul", self.op("Round", self.op("Div", v, step)), step)
        return self.op("Clip", rounded, self.const("neg_max", -fmt.max_value), self.const("max", fmt.max_value))


def fake_quantize_graph(
    graph: ir.Graph, x: ir.Value, fmt: NumberFormat, before: ir.Node, clip: float = 1.0, width: int | None = None
) -> ir.Value:
    """Standard ONNX ops, inserted before ``before``, computing :func:`quantize` ``(x, fmt, clip=clip)`` along
    ``x``'s last axis (its scales at run time: per token, per block); returns the float output. ``width``: the
    last axis's length where ``x``'s shape does not say it (a linear's input: its weight's input rows).

    Raises:
        ValueError: the last axis is not a static multiple of the block size.
    """
    last = width if width is not None else (x.shape[-1] if x.shape is not None and len(x.shape) else None)
    size = fmt.block_size or last
    if not isinstance(last, int) or not isinstance(size, int) or last % size:
        raise ValueError(f"{fmt.name}: input {x.name!r} has last axis {last}; blocks of {fmt.block_size} need a "
                         "static multiple of it")  # fmt: skip
    b = _Builder(graph, f"{x.name or 'x'}_{fmt.name}")
    blocks = b.op("Reshape", x, b.const("blocks", [-1, last // size, size]))
    axes = b.const("axes", [-1])
    peak = b.op("ReduceMax", b.op("Abs", blocks), axes, keepdims=1)
    one = b.const("one", 1.0)
    nonzero = b.op("Greater", peak, b.const("zero", 0.0))
    if fmt.block_scale is None:
        scale = b.op("Mul", peak, b.const("ratio", clip / fmt.max_value))
    elif fmt.block_scale == "e8m0":
        exponent = b.op(
            "Sub", b.floor_log2(b.op("Max", peak, b.const("tiny_peak", 2.0**-126))), b.const("emax", fmt.emax)
        )
        scale = b.op("Pow", b.const("two_scale", 2.0), exponent)
    else:
        slice_peak = b.op("ReduceMax", peak, b.const("slice_axes", [-2]), keepdims=1)
        slice_nonzero = b.op("Greater", slice_peak, b.const("zero_slice", 0.0))
        outer = b.op(
            "Where",
            slice_nonzero,
            b.op("Mul", slice_peak, b.const("outer_ratio", 1.0 / (fmt.max_value * E4M3_MAX))),
            one,
        )
        inner = b.round_elements(
            b.op("Div", b.op("Mul", peak, b.const("inner_ratio", 1.0 / fmt.max_value)), outer), _E4M3_GRID
        )
        scale = b.op("Mul", inner, outer)
    scale = b.op("Where", nonzero, scale, one)
    divisor = b.op("Where", b.op("Greater", scale, b.const("zero_scale", 0.0)), scale, one)
    restored = b.op("Mul", b.round_elements(b.op("Div", blocks, divisor), fmt), scale)
    out = b.op("Reshape", restored, b.op("Shape", x))
    out.name, out.shape = f"{x.name or 'x'}_{fmt.name}_fq", x.shape
    graph.insert_before(before, b.nodes)
    return out
