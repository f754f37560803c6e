"""One table of op traits: every fact the passes need about an ONNX op, in one place.

Each row says what an op *is* to the quantizer and the lowering; the passes derive the op sets they need from
the table (:func:`ops_where`) instead of keeping their own lists. Adding an op to the integer path is one row
here plus its three parts: reference semantics (``qcompiler.dialect``), a lowering (``passes/lower``) and a
kernel (``backends/tvm``).

Traits:
    layout: moves values without changing or dropping any (Reshape, Transpose, ...): scales per channel, storage
        width and integer bounds all carry through.
    moves_values: selects, repeats or moves values (layout ops, Slice, Gather, Concat, MaxPool, ...): the output
        lies on the input's quantization grid and lowers to the same op on integers.
    keeps_width: an int16 input gives an int16 output (layout, selections, broadcasts, negation).
    keeps_bound: ``|q|`` of the output is bounded by ``|q|`` of the input (a clamp survives it).
    linear: a product with a constant weight (the anchors of smoothing, rotation and weight quantization).
    fusing_anchor: a Relu/Clip right after it becomes the clamp of its integer epilogue.
    fusable_activation: folds into the epilogue of the anchor before it.
    nonlinearity: an integer nonlinearity of the dialect (I-BERT style) lowers it.
    wide_producer: its integer form can write int16 (a Requantize epilogue with a 16-bit clamp).
    wide_input: its integer form reads an int16 input as it reads int8 (W8A16, ``activation_bits = 16``): a
        constant-weight linear (its int32 sum bounded by the input's clamp), a table over 65,536 levels, an int32
        sum or product, a move. Conditions on the node (a constant weight, a scalar table) live in
        :mod:`qcompiler.passes.quantize.precision`.
    clamps_output: its integer form takes a Relu/Clip between it and its QuantizeLinear as the clamp of its
        output (a fused activation, or the level bound of a W8A16 tensor that a linear reads).
    channel_producer: its integer form can write one scale per channel of the last axis.
    norm: a normalisation over the last axis with a gain (and bias).
    elementwise_nonlinear: an elementwise function that no rotation commutes with.
    positive_homogeneous: ``f(x / s) = f(x) / s`` for every ``s > 0`` (cross-layer equalization passes it).
    reads_shape_only: reads only its input's shape, never its values (Shape, Size): integer index arithmetic
        however the input is stored, nothing to quantize (a symbolic sequence length's reshapes).
    quantize: how the output gets its scale: ``"own"`` (calibrated, its own Q/DQ), ``"inherit"`` (the input's
        scale), ``"fixed"`` (a scale fixed by the op: softmax probabilities) or ``""`` (not on the integer path).
    lowering: the integer lowering's handler (``passes/lower/dyadic.py``'s dispatch table), or ``""``;
        ``"lookup"``: an elementwise function as a table over the input's levels (``passes/lower/lookup.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class OpTraits:
    """What one ONNX op (default domain) is to the quantizer and the lowering."""

    op_type: str
    layout: bool = False
    moves_values: bool = False
    keeps_width: bool = False
    keeps_bound: bool = False
    linear: bool = False
    fusing_anchor: bool = False
    fusable_activation: bool = False
    nonlinearity: bool = False
    wide_producer: bool = False
    wide_input: bool = False
    clamps_output: bool = False
    channel_producer: bool = False
    norm: bool = False
    elementwise_nonlinear: bool = False
    positive_homogeneous: bool = False
    reads_shape_only: bool = False
    quantize: str = ""
    lowering: str = ""

    def __post_init__(self) -> None:
        if self.quantize not in ("", "own", "inherit", "fixed"):
            raise ValueError(f"{self.op_type}: quantize must be '', 'own', 'inherit' or 'fixed', got {self.quantize!r}")
        if self.layout and not (self.moves_values and self.keeps_width and self.keeps_bound):
            raise ValueError(f"{self.op_type}: a layout op also moves values, keeps width and keeps bounds")


def _layout(op_type: str) -> OpTraits:
    return OpTraits(op_type, layout=True, moves_values=True, keeps_width=True, keeps_bound=True, wide_input=True,
                    quantize="inherit", lowering="move")  # fmt: skip


def _nonlinear(op_type: str, **traits: Any) -> OpTraits:
    return OpTraits(op_type, elementwise_nonlinear=True, **traits)


def _lookup(op_type: str, **traits: Any) -> OpTraits:
    """An elementwise function of one quantized input, lowered to a table over the input's levels."""
    return OpTraits(op_type, wide_input=True, clamps_output=True, quantize="own", lowering="lookup", **traits)


# fmt: off
_ROWS: tuple[OpTraits, ...] = (
    # layout: values moved, none changed
    *(_layout(op) for op in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")),
    # the input's shape, not its values: integer index arithmetic
    OpTraits("Shape", reads_shape_only=True),
    OpTraits("Size", reads_shape_only=True),
    # selections and broadcasts: on the input's grid
    OpTraits("Slice", moves_values=True, keeps_width=True, keeps_bound=True, wide_input=True, quantize="inherit",
             lowering="move"),
    OpTraits("Expand", moves_values=True, keeps_width=True, keeps_bound=True, wide_input=True, quantize="inherit",
             lowering="move"),
    OpTraits("Concat", moves_values=True, keeps_width=True, keeps_bound=True, quantize="inherit", lowering="move"),
    OpTraits("Split", moves_values=True, keeps_width=True, keeps_bound=True, wide_input=True, quantize="inherit",
             lowering="split"),
    OpTraits("Gather", moves_values=True, keeps_bound=True, quantize="inherit", lowering="move"),
    OpTraits("GatherND", moves_values=True, keeps_bound=True, quantize="inherit", lowering="move"),
    OpTraits("GatherElements", moves_values=True, keeps_bound=True, quantize="inherit", lowering="move"),
    OpTraits("MaxPool", moves_values=True, keeps_width=True, keeps_bound=True, wide_input=True, quantize="inherit",
             lowering="move"),
    OpTraits("Pad", moves_values=True, wide_input=True, quantize="inherit", lowering="pad"),
    OpTraits("Neg", keeps_width=True, keeps_bound=True, wide_input=True, quantize="inherit", lowering="neg"),
    # activations that become the clamp of the anchor before them
    OpTraits("Relu", fusable_activation=True, elementwise_nonlinear=True, positive_homogeneous=True,
             wide_input=True, quantize="inherit", lowering="move"),
    OpTraits("Clip", fusable_activation=True, wide_input=True, quantize="inherit", lowering="move"),
    # linear anchors: constant weights, int32 accumulators, a requantize epilogue
    *(OpTraits(op, linear=True, fusing_anchor=True, wide_producer=op != "Conv", wide_input=True, clamps_output=True,
               quantize="own", lowering="linear")
      for op in ("Conv", "Gemm", "MatMul")),
    OpTraits("Add", fusing_anchor=True, wide_producer=True, wide_input=True, clamps_output=True, quantize="own",
             lowering="add"),
    OpTraits("Sub", fusing_anchor=True, wide_input=True, clamps_output=True, quantize="own",
             lowering="add"),  # an Add with the second side negated
    OpTraits("GlobalAveragePool", fusing_anchor=True, wide_input=True, clamps_output=True, quantize="own",
             lowering="global_average_pool"),
    OpTraits("AveragePool", fusing_anchor=True, wide_input=True, clamps_output=True, quantize="own",
             lowering="average_pool"),
    # products: by a constant scalar (a pure rescale), of two activations or of an activation and a table
    OpTraits("Mul", wide_producer=True, channel_producer=True, wide_input=True, clamps_output=True, quantize="own",
             lowering="product"),
    # by a constant scalar, or of two activations (IntDiv)
    OpTraits("Div", clamps_output=True, quantize="own", lowering="product"),
    # integer nonlinearities of the dialect
    OpTraits("Softmax", nonlinearity=True, quantize="fixed", lowering="nonlinear"),
    OpTraits("LayerNormalization", nonlinearity=True, norm=True, channel_producer=True, wide_input=True,
             clamps_output=True, quantize="own", lowering="nonlinear"),
    OpTraits("RMSNormalization", nonlinearity=True, norm=True, channel_producer=True, wide_input=True,
             clamps_output=True, quantize="own", lowering="nonlinear"),
    _nonlinear("Gelu", nonlinearity=True, channel_producer=True, clamps_output=True, quantize="own",
               lowering="nonlinear"),
    _nonlinear("Sigmoid", nonlinearity=True, channel_producer=True, wide_input=True, clamps_output=True,
               quantize="own", lowering="nonlinear"),
    # elementwise functions of one quantized input (other inputs constant): a lookup table over the input's
    # levels (passes/lower/lookup.py), exact to the QDQ graph's Q(f(DQ(x)))
    *(_lookup(op, elementwise_nonlinear=True)
      for op in ("Tanh", "Erf", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish")),
    _lookup("LeakyRelu", elementwise_nonlinear=True, positive_homogeneous=True),
    _lookup("PRelu", elementwise_nonlinear=True, positive_homogeneous=True),
    _lookup("Abs"),
    _lookup("Pow"),  # a constant exponent (tanh-GELU's x^3)
    _lookup("Reciprocal"),
    _lookup("Sin"),
    _lookup("Cos"),
    # reductions: the int32 sum, then one Requantize
    OpTraits("ReduceMean", wide_input=True, clamps_output=True, quantize="own", lowering="reduce"),
    OpTraits("ReduceSum", wide_input=True, clamps_output=True, quantize="own", lowering="reduce"),
    OpTraits("ReduceL2", clamps_output=True, quantize="own", lowering="reduce_l2"),  # int64 sum of squares, ISqrt
    _lookup("Exp"),
)
# fmt: on

#: op type -> its traits (default ONNX domain)
OPS: dict[str, OpTraits] = {row.op_type: row for row in _ROWS}
if len(OPS) != len(_ROWS):
    raise AssertionError("qcompiler.ir.ops: an op has two rows")


def traits(op_type: str) -> OpTraits | None:
    """The row of ``op_type``, or None for an op the table does not know."""
    return OPS.get(op_type)


def ops_where(predicate: Callable[[OpTraits], bool]) -> frozenset[str]:
    """The op types whose row satisfies ``predicate`` (``ops_where(lambda t: t.layout)``)."""
    return frozenset(op for op, row in OPS.items() if predicate(row))


LAYOUT_OPS = ops_where(lambda t: t.layout)
MOVES_VALUES_OPS = ops_where(lambda t: t.moves_values)
KEEPS_WIDTH_OPS = ops_where(lambda t: t.keeps_width)
KEEPS_BOUND_OPS = ops_where(lambda t: t.keeps_bound)
LINEAR_OPS = ops_where(lambda t: t.linear)
FUSING_ANCHORS = ops_where(lambda t: t.fusing_anchor)
FUSABLE_ACTIVATIONS = ops_where(lambda t: t.fusable_activation)
NONLINEAR_OPS = ops_where(lambda t: t.nonlinearity)
WIDE_PRODUCERS = ops_where(lambda t: t.wide_producer)
WIDE_INPUT_OPS = ops_where(lambda t: t.wide_input)
CLAMPING_OPS = ops_where(lambda t: t.clamps_output)
CHANNEL_PRODUCERS = ops_where(lambda t: t.channel_producer)
NORM_OPS = ops_where(lambda t: t.norm)
ELEMENTWISE_NONLINEAR = ops_where(lambda t: t.elementwise_nonlinear)
POSITIVE_HOMOGENEOUS = ops_where(lambda t: t.positive_homogeneous)
SHAPE_READERS = ops_where(lambda t: t.reads_shape_only)
#: ops whose output gets its own (or a fixed) scale
OWN_SCALE_OPS = ops_where(lambda t: t.quantize in ("own", "fixed"))
#: ops whose output keeps the input's scale
INHERIT_SCALE_OPS = ops_where(lambda t: t.quantize == "inherit")
#: every op the integer path quantizes
QUANTIZABLE_OPS = OWN_SCALE_OPS | INHERIT_SCALE_OPS
