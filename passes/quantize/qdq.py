"""Insert QuantizeLinear/DequantizeLinear pairs: static W8A8 in standard QDQ ONNX (runs in onnxruntime).

Weights: symmetric int8 per output channel, ``s_c = max|W_c| / 127``, ``q = clamp(round(W / s_c), -127, 127)``.
Activations: symmetric int8 per tensor from the calibrated threshold, ``s = absmax / 127``, zero point 0;
residual-stream tensors int16 at ``max|x| / 32767`` and norm outputs per channel when the readers allow it
(:mod:`qcompiler.passes.quantize.precision`; linear readers fold the per-channel ratios into their weights).
Bias: int32 at scale ``s_x * s_w``, so the QDQ graph already carries the integer graph's bias rounding.
Shape-only ops (MaxPool, Reshape, ...) and stand-alone ReLU keep their input's scale.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.dialect.dyadic import INT4_ACC_BUDGET, group_scale_bits
from qcompiler.errors import CalibrationError, RecipeError, UnsupportedOpError
from qcompiler.ir.analysis.pooling import average_pool_window
from qcompiler.ir.analysis.silu import silu_sigmoids
from qcompiler.ir.analysis.softmax_groups import is_mask_where, softmax_groups
from qcompiler.ir.graph import (
    FLOAT_ISLAND,
    INPUT_LEVEL_PROP,
    add_initializer,
    const_array,
    consumers,
    is_graph_output,
    node_label,
)
from qcompiler.ir.ops import (
    FUSABLE_ACTIVATIONS,
    FUSING_ANCHORS,
    INHERIT_SCALE_OPS,
    KEEPS_BOUND_OPS,
    OWN_SCALE_OPS,
    SHAPE_READERS,
    traits,
)
from qcompiler.passes.canonicalize.resize import resize_refusal
from qcompiler.passes.quantize import row_exponent
from qcompiler.passes.quantize.formats import FORMATS
from qcompiler.passes.quantize.precision import (
    INT32_MAX,
    hadamard_matmul,
    linear_reader_weights,
    plan_precision,
    wide_activation_bound,
    writes_clamped,
)
from qcompiler.passes.quantize.weights import WeightQuantSpec, gptq, quantize_rtn

logger = logging.getLogger(__name__)

WEIGHT_QMAX = 127
ACT_QMAX = 127
WIDE_QMAX = 32767
#: storage bits -> the largest symmetric level
_QMAX = {8: ACT_QMAX, 16: WIDE_QMAX}
#: per-channel int16 residual scales cover this multiple of each channel's calibrated maximum
CHANNEL_HEADROOM = 4.0

SOFTMAX_OUTPUT_SCALE = np.float32(1.0 / 128.0)
#: scores need ``ln2 / S <= 2^14`` (IntSoftmax's exp polynomial): their scale is at least this (int8 scores of a
#: smaller range too: a logit difference below 4.3e-5 moves no probability by more than that)
WIDE_SCORES_MIN_SCALE = np.float32(np.log(2.0) / 16000.0)
#: IntSoftmax needs its input step below ln2: int8 scores never get a coarser one
SOFTMAX_MAX_INPUT_SCALE = np.float32(np.log(2.0) * 0.999)
#: ops whose output gets its own scale (qcompiler.ir.ops: quantize "own" or "fixed"). Mul: by a positive
#: constant scalar (attention's 1/sqrt(d): a pure rescale), SiLU's x * Sigmoid(x), a product of two activations
#: (SwiGLU) or of an activation and a constant tensor (RoPE's cos and sin tables); Div: by a positive constant
ANCHOR_OPS = OWN_SCALE_OPS
#: ops that only move or select int8 values: their output keeps the input's scale
PASS_THROUGH_OPS = INHERIT_SCALE_OPS
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def computes_on_floats(node: ir.Node) -> bool:
    """False for nodes that only move integers or booleans (mask and index arithmetic) or read only a shape:
    nothing to quantize."""
    if node.op_type in SHAPE_READERS:
        return False
    values = [v for v in (*node.inputs, *node.outputs) if v is not None]
    return any(v.dtype is None or v.dtype in _FLOATS for v in values)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """What the QDQ pass produces. Validated on construction."""

    weight_bits: int = 8
    #: 8: int8 activations; 16 (W8A16): int16 wherever the producer can clamp and every reader takes int16
    #: (qcompiler.passes.quantize.precision), each at the largest level bound its readers' int32 sums allow;
    #: 4 (W4A4): every linear that reads its input per token (``row_exponents``) reads int4 levels, [-7, 7]
    activation_bits: int = 8
    #: 16: tensors only residual adds and norms read are int16 (never GEMM operands); 8: all int8
    residual_bits: int = 16
    #: norm outputs read only by linear layers and adds get one scale per channel (folded into the weights)
    per_channel_norm_outputs: bool = True
    #: how much of a per-channel activation's range the folded weights take on (SmoothQuant's alpha):
    #: ``t_c ~ max|x_c|^a / max|W_c|^(1-a)``; 1 quantizes every channel at its own range
    migration_alpha: float = 1.0
    #: search alpha per tensor on this grid (with ``migration_alpha``): the one minimising the readers' expected
    #: output error from activation plus weight rounding (:func:`migration_error`)
    migration_alpha_grid: tuple[float, ...] = ()
    #: softmax probabilities: 8 (int8 at 2^-7) or 16 (int16 at 2^-15: long rows, where most probabilities are
    #: below 2^-8; the P V product then runs in int32)
    softmax_bits: int = 8
    #: attention scores entering a softmax: 8 (int8) or 16 (int16 from the score product's int32 accumulator:
    #: the integer softmax reads them at up to 2^8 times finer steps, never finer than
    #: :data:`WIDE_SCORES_MIN_SCALE`)
    softmax_input_bits: int = 8
    #: int16 residual-stream tensors read only by residual adds and RMSNorms get one scale per channel (within
    #: 2^10 of the widest channel's: qcompiler.dialect.nonlinear.layernorm_prescale)
    residual_per_channel: bool = False
    #: attention operands (Q, K after RoPE, V, what RoPE reads, SiLU's input): 8 (int8) or 16 (int16; Q and K
    #: clamped so the int32 score accumulator cannot overflow: qcompiler.passes.quantize.precision)
    attention_bits: int = 8
    #: keys and values (the right operand of every attention product: what a KV cache holds): 0 at the
    #: attention operands' width, 8 for int8 keys and values under int16 queries and probabilities (the cache is
    #: then half the size, and ``Q K^T`` needs no clamp: int16 x int8 over the head dimension cannot overflow)
    kv_bits: int = 0
    #: int8 GEMM inputs (read only by bias-free linears) stored as int16 at ``row_exponent_refinement`` times
    #: finer static steps and read per token as int8 codes with a power-of-two step (qcompiler.RowExponent;
    #: passes/quantize/row_exponent.py): an outlier token no longer sets every token's step
    row_exponents: bool = False
    row_exponent_refinement: int = 4
    #: each token's row exponent holds its peak within ``qmax / row_exponent_clip`` levels: below 1, a peak up to
    #: that far beyond ``qmax`` clips into it instead of doubling every element's step
    row_exponent_clip: float = 1.0
    #: ``rtn`` (round to nearest) or ``gptq`` (error compensation through the calibration inputs' Hessian)
    weight_quantizer: str = "rtn"
    #: GPTQ's damping, a fraction of the Hessian's mean diagonal
    gptq_damp: float = 0.01
    #: GPTQ quantizes the rows with the largest Hessian diagonal first
    gptq_act_order: bool = True
    #: int4 weights (``weight_bits = 4``, MatMul/Gemm; convolutions and online Hadamards keep their codes):
    #: input channels per scale group, 0 for one scale per output channel
    group_size: int = 0
    #: int4 weights: per-group clipping ratios searched for the smallest weight error (1 always competes)
    weight_clip_grid: tuple[float, ...] = ()
    #: per-layer weight bits (mixed precision): ``{pattern: bits}`` in order, the first pattern (fnmatch) that
    #: matches one of a linear's names (:func:`layer_names`: its module path from torch.export, its node name,
    #: its weight's name) gives its bits, 4 or 8; the others take ``weight_bits``. A pattern that matches no
    #: linear is an error (a misspelt name would otherwise quantize nothing differently)
    layer_weight_bits: tuple[tuple[str, int], ...] = ()
    #: the 4-bit weights' number format (passes/quantize/formats.py): ``int4`` (a float scale per group, on the
    #: integer grid of ``group_scale_bits``) or ``mxint4`` (OCP MX: one power-of-two scale per block of 32 input
    #: channels, ``group_size = 32``)
    weight_format: str = "int4"

    def __post_init__(self) -> None:
        if self.weight_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"weight_quantizer: must be 'rtn' or 'gptq', got {self.weight_quantizer!r}")
        if not 0.0 <= self.gptq_damp < 1.0:
            raise ValueError(f"gptq_damp: must lie in [0, 1), got {self.gptq_damp}")
        if not 0.0 < self.migration_alpha <= 1.0:
            raise ValueError(f"migration_alpha: must lie in (0, 1], got {self.migration_alpha}")
        object.__setattr__(self, "migration_alpha_grid", tuple(float(a) for a in self.migration_alpha_grid))
        if any(not 0.0 < a <= 1.0 for a in self.migration_alpha_grid):
            raise ValueError(f"migration_alpha_grid: values must lie in (0, 1], got {list(self.migration_alpha_grid)}")
        if self.softmax_bits not in (8, 16):
            raise ValueError(f"softmax_bits: must be 8 or 16, got {self.softmax_bits}")
        if self.softmax_input_bits not in (8, 16):
            raise ValueError(f"softmax_input_bits: must be 8 or 16, got {self.softmax_input_bits}")
        if self.attention_bits not in (8, 16):
            raise ValueError(f"attention_bits: must be 8 or 16, got {self.attention_bits}")
        if self.kv_bits not in (0, 8) or (self.kv_bits == 8 and self.attention_bits != 16):
            raise ValueError(f"kv_bits: 0 (the attention operands' width) or 8 with attention_bits = 16, got "
                             f"{self.kv_bits} with attention_bits = {self.attention_bits}")  # fmt: skip
        if self.residual_bits not in (8, 16):
            raise ValueError(f"residual_bits: must be 8 or 16, got {self.residual_bits}")
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits: the integer path supports 8 and 4, got {self.weight_bits}")
        layers = self.layer_weight_bits
        pairs = layers.items() if isinstance(layers, Mapping) else layers
        try:
            object.__setattr__(self, "layer_weight_bits", tuple((str(p), int(b)) for p, b in pairs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"layer_weight_bits: a table of pattern = bits, got {layers!r}") from exc
        wrong = [(p, b) for p, b in self.layer_weight_bits if b not in (4, 8)]
        if wrong:
            raise ValueError(f"layer_weight_bits: bits must be 4 or 8, got {dict(wrong)}")
        if self.weight_format not in INTEGER_WEIGHT_FORMATS:
            raise ValueError(f"weight_format: the integer path compiles {sorted(INTEGER_WEIGHT_FORMATS)} 4-bit "
                             f"weights, got {self.weight_format!r} (others: [simulate] weight_format)")  # fmt: skip
        block = INTEGER_WEIGHT_FORMATS[self.weight_format]
        if block and (4 not in self.bits_used or self.group_size != block):
            raise ValueError(f"weight_format {self.weight_format!r}: needs 4-bit weights and group_size = {block} "
                             f"(its blocks), got bits {sorted(self.bits_used)}, "
                             f"group_size {self.group_size}")  # fmt: skip
        if self.group_size < 0 or (self.group_size and 4 not in self.bits_used):
            raise ValueError(f"group_size: groups need weight_bits = 4 and a size >= 1 (0: per channel), got "
                             f"{self.group_size} with weight_bits = {self.weight_bits}")  # fmt: skip
        object.__setattr__(self, "weight_clip_grid", tuple(float(r) for r in self.weight_clip_grid))
        if any(not 0.0 < r <= 1.0 for r in self.weight_clip_grid):
            raise ValueError(f"weight_clip_grid: ratios must lie in (0, 1], got {list(self.weight_clip_grid)}")
        if not 0.5 <= self.row_exponent_clip <= 1.0:
            raise ValueError(f"row_exponent_clip: must lie in [0.5, 1], got {self.row_exponent_clip}")
        if not 1 <= self.row_exponent_refinement <= 256:
            raise ValueError(f"row_exponent_refinement: must lie in [1, 256], got {self.row_exponent_refinement}")
        if self.activation_bits not in (4, 8, 16):
            raise ValueError(f"activation_bits: must be 4, 8 or 16 (W8A16: int16 wherever the readers take it), "
                             f"got {self.activation_bits}")  # fmt: skip
        if self.activation_bits == 4 and not self.row_exponents:
            raise ValueError("activation_bits = 4 reads every linear's input per token (row_exponents = true): "
                             "one static int4 step per tensor cannot hold a token's range")  # fmt: skip
        if self.activation_bits == 16 and (self.bits_used != {8} or self.row_exponents):
            raise ValueError("activation_bits = 16 needs 8-bit weights in every layer (weight_bits and "
                             "layer_weight_bits) and row_exponents = false (its int16 "
                             "activations are read whole by int8-weight linears)")  # fmt: skip

    @property
    def bits_used(self) -> set[int]:
        """Every weight width the config can give a layer."""
        return {self.weight_bits, *(bits for _, bits in self.layer_weight_bits)}


#: 4-bit weight formats the integer path compiles (passes/quantize/formats.py) -> the block size they fix (0: any
#: group_size)
INTEGER_WEIGHT_FORMATS = {name: FORMATS[name].block_size or 0 for name in ("int4", "mxint4")}


def int4_weight_spec(config: QuantizeConfig, k: int) -> WeightQuantSpec:
    """How a layer of ``k`` input channels is quantized at 4 bits: symmetric, per group of ``group_size`` (per
    output channel when that is 0 or covers K) with the group scales on :func:`group_scale_bits`' integer grid;
    with ``weight_format = "mxint4"`` each group's scale MX's shared exponent (no clipping search)."""
    group = config.group_size if 0 < config.group_size < k else None
    shared_exponent = config.weight_format == "mxint4"
    return WeightQuantSpec(
        4, group, True, () if shared_exponent else config.weight_clip_grid,
        scale_grid_bits=group_scale_bits(k, group) if group else None, shared_exponent=shared_exponent,
    )  # fmt: skip


def layer_names(node: ir.Node) -> list[str]:
    """The names a linear answers to in ``layer_weight_bits``: its module path (torch.export's
    ``pkg.torch.onnx.name_scopes``, e.g. ``model.layers.0.mlp.down_proj``), its node name and its weight's name
    (an ONNX file's ``/model/layers.0/mlp/down_proj/MatMul`` and ``model.layers.0.mlp.down_proj.weight``)."""
    names = []
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
        names.append(next((p for p in reversed(parts[:-1]) if p), ""))
    names.append(node.name or "")
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        names.append(node.inputs[1].name or "")
    return [n for n in names if n]


def _answers_to(node: ir.Node, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in layer_names(node))


def _check_layer_patterns(graph: ir.Graph, patterns: tuple[tuple[str, int], ...]) -> None:
    """Every ``layer_weight_bits`` pattern matches some linear layer (a weighted Conv, Gemm or MatMul)."""
    if not patterns:
        return
    linears = [n for n in graph if n.op_type in ("Conv", "Gemm", "MatMul") and const_array(n.inputs[1]) is not None]
    unmatched = [p for p, _ in patterns if not any(_answers_to(n, p) for n in linears)]
    if unmatched:
        examples = [layer_names(n)[0] for n in linears[:3] if layer_names(n)]
        raise RecipeError(
            f"quantize.layer_weight_bits: pattern(s) {unmatched} match no linear layer; a layer answers to its "
            f"module path, node name or weight name, e.g. {examples}"
        )


def _narrows(node: ir.Node | None) -> bool:
    """A fused Relu, or a Clip with constant bounds, right after the op it clamps."""
    if node is None or node.op_type not in ("Relu", "Clip"):
        return False
    return node.op_type == "Relu" or all(v is None or const_array(v) is not None for v in node.inputs[1:])


def _clip_range(node: ir.Node) -> tuple[float, float]:
    """The float range a Relu or a constant Clip keeps."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    low = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    high = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return (float("-inf") if low is None else float(low)), (float("inf") if high is None else float(high))


def _rank(value: ir.Value | None) -> int:
    return len(value.shape) if value is not None and value.shape is not None else -1


def quantize_weight_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis``: ``(q in [-127, 127], scales float32)``. A channel below 2^-24 of
    the largest (a dead channel of a trained model, its weights denormal floats) is zero at the largest channel's
    scale: a denormal scale would underflow the bias scale ``S_x S_w`` in float32. An all-zero channel gets 1."""
    others = tuple(i for i in range(weight.ndim) if i != axis)
    # max|w| as max(max w, -min w): exact, and no copy of the weight (a 262 MB lm_head made 1.5 GB of temporaries)
    absmax = np.maximum(weight.max(axis=others), -weight.min(axis=others)).astype(np.float64)
    top = float(absmax.max(initial=0.0))
    negligible = (absmax > 0) & (absmax <= top * 2.0**-24)
    scales = np.where(absmax > 0, np.where(negligible, top, absmax) / WEIGHT_QMAX, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = weight / scales.reshape(shape)
    np.round(q, out=q)
    np.clip(q, -WEIGHT_QMAX, WEIGHT_QMAX, out=q)
    return q.astype(np.int8), scales


def balanced_scales(ranges: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel int8 scales ``t_c = d s_c``, ``s_c = max|x_c|^a / max|W_c|^(1-a)``,
    ``d = max_c(max|x_c| / s_c) / 127`` (every channel's range fits); alpha 1: ``max|x_c| / 127``."""
    if alpha >= 1.0:
        return (ranges / ACT_QMAX).astype(np.float32)
    weights = np.maximum(weight_absmax, float(weight_absmax.max()) / 1024.0 + 1e-30)
    balance = ranges**alpha / weights ** (1.0 - alpha)
    step = float((ranges / balance).max()) / ACT_QMAX
    return (step * balance).astype(np.float32)


def migration_error(scales: np.ndarray, readers: list[np.ndarray], second_moment: np.ndarray) -> float:
    """Expected squared output error per token of the linear ``readers`` (``[C, N]`` weights) of a per-channel
    int8 activation with ``scales`` t_c, its ratios ``t_c / t0`` folded into int8 per-column weights: activation
    rounding ``sum_c t_c^2 / 12 ||W_c||^2`` plus weight rounding ``sum_n sigma_n^2 / 12 sum_c E[x_c^2] (t0/t_c)^2``
    with ``sigma_n = max_c |W_cn| t_c / t0 / 127`` (uniform, independent rounding errors)."""
    t = scales.astype(np.float64)
    ratio = t / t.max()
    total = 0.0
    for w in readers:
        activation = float((t**2 / 12.0) @ (w**2).sum(axis=1))
        sigma = np.abs(w * ratio[:, None]).max(axis=0) / WEIGHT_QMAX
        weight = float((sigma**2 / 12.0).sum() * (second_moment / ratio**2).sum())
        total += activation + weight
    return total


def _is_scalar_rescale(node: ir.Node) -> bool:
    """``x * c`` or ``x / c`` with a positive constant scalar c: one Requantize."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2 or const_array(node.inputs[0]) is not None:
        return False
    scalar = const_array(node.inputs[1])
    return scalar is not None and scalar.size == 1 and float(scalar.reshape(())) > 0


def _folds_input_scales(node: ir.Node, index: int) -> bool:
    """A linear layer reading ``index`` as its activation with a constant 2-D weight it can fold scales into."""
    if node.op_type not in ("Gemm", "MatMul") or index != 0:
        return False
    weight = const_array(node.inputs[1])
    return weight is not None and weight.ndim == 2


def activation_scale(absmax: float) -> np.float32:
    """``absmax / 127``; a tensor that was exactly 0 on all calibration data (e.g. attention output with every
    key masked) gets the unit range, so a following int32 bias at ``S_x S_w`` still fits."""
    return np.float32((absmax if absmax > 0.0 else 1.0) / ACT_QMAX)


class QuantizeQDQPass(ir.passes.InPlacePass):
    """Rewrite a float graph into static W8A8 QDQ form from calibrated activation thresholds.

    Args:
        ranges: activation name -> symmetric threshold (from :func:`qcompiler.calibrate.calibrate`).
        config: bit widths.
        channel_absmax: activation name -> exact ``max |x|`` per channel of the last axis
            (:func:`qcompiler.calibrate.observe`); without it every activation is per-tensor int8.
        hessians: activation name -> ``2 X^T X / N`` (``observe(..., hessians=True)``), needed by
            ``weight_quantizer = "gptq"``.
        float_islands: a node the integer path cannot handle stays in float between DequantizeLinear and
            QuantizeLinear (its outputs quantized at their calibrated ranges), tagged :data:`FLOAT_ISLAND` with the
            reason, instead of an :class:`UnsupportedOpError`.
        cache_inputs: graph inputs that carry a KV cache (a causal LM's past keys and values): each is quantized
            at the scale and width of the new values a Concat appends to it, so the cache the model writes and
            the cache it reads are one integer tensor (no float at the boundary, no requantize).
    """

    preserves_outputs = False  # quantization changes the outputs by design; tests bound the change

    def __init__(
        self,
        ranges: Mapping[str, float],
        config: QuantizeConfig | None = None,
        channel_absmax: Mapping[str, np.ndarray] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
        float_islands: bool = False,
        cache_inputs: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.cache_inputs = frozenset(cache_inputs)
        #: keep nodes the integer path cannot handle in float (tagged FLOAT_ISLAND) instead of refusing them
        self.float_islands = float_islands
        self.ranges = dict(ranges)
        self.config = config or QuantizeConfig()
        self.channel_absmax = dict(channel_absmax) if channel_absmax is not None else None
        self.hessians = dict(hessians or {})
        #: per-channel value name -> the alpha the search chose (``migration_alpha_grid``)
        self.searched_alpha: dict[str, float] = {}

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 13:
            raise ir.passes.PreconditionError("QuantizeQDQPass needs opset >= 13 (per-axis QuantizeLinear)")
        if 4 in self.config.bits_used and model.opset_imports.get("", 0) < 21:
            raise ir.passes.PreconditionError(
                "weight_bits = 4 needs opset >= 21 (INT4 and blocked DequantizeLinear): put "
                '{ pass = "upgrade-opset", opset = 21 } first in the recipe\'s canonicalize list'
            )
        for node in model.graph:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                raise ir.passes.PreconditionError(f"model is already quantized (node {node_label(node)})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups = {id(g.softmax): g for g in softmax_groups(graph)}
        inside_groups = set().union(*(g.ids for g in groups.values())) | {id(n) for n in graph if is_mask_where(n)}
        inside_groups |= silu_sigmoids(graph)  # the Sigmoid of x * Sigmoid(x) stays inside the SiLU group
        self._check_supported(graph, inside_groups)
        _check_layer_patterns(graph, self.config.layer_weight_bits)  # before anything is rewritten
        scale_of: dict[int, Any] = {}  # id(float value or its DQ output) -> scale (float32 scalar or per channel)
        self._scale_of = scale_of
        self._bits_of: dict[int, int] = {}  # id(DQ output) -> 16 for wide tensors
        self._level_of: dict[int, int] = {}  # id(DQ output) -> the largest |level| (storage, or its clamp)
        self._rows: set[int] = set()  # id(DQ output) of int16 GEMM inputs read with row exponents
        self._fold_of: dict[int, np.ndarray] = {}  # id(DQ output read by linear layers) -> t / t0 per channel
        self._tables: dict[int, ir.Value] = {}  # id(constant) -> its dequantized int8 table
        # the float activation every linear reads, by name, before Q/DQ pairs are inserted in front of it
        self._float_input = {
            id(node): node.inputs[0].name for node in graph if node.op_type in ("Gemm", "MatMul") and node.inputs[0]
        }
        if self.config.weight_quantizer == "gptq":
            missing = [
                node_label(node)
                for node in graph
                if node.op_type in ("Gemm", "MatMul")
                and const_array(node.inputs[1]) is not None
                and self._float_input.get(id(node)) not in self.hessians
            ]
            if missing:
                raise CalibrationError(
                    f"weight_quantizer 'gptq': no input Hessian for {missing[:3]}; calibrate with "
                    "observe(..., hessians=True) on the same canonicalized model"
                )
        stats = self.channel_absmax
        plan = plan_precision(
            graph,
            inside_groups,
            wide=stats is not None and self.config.residual_bits == 16,
            per_channel=stats is not None and self.config.per_channel_norm_outputs,
            attention=stats is not None and self.config.attention_bits == 16,
            narrow_kv=self.config.kv_bits == 8,
            silu=silu_sigmoids(graph),
            residual_channels=self.config.residual_per_channel,
            activations=self.config.activation_bits == 16,
            cache_inputs=self.cache_inputs,
        )
        if self.config.activation_bits == 16 and stats is None:
            raise CalibrationError("activation_bits = 16: calibration without per-channel statistics (observe(...) "
                                   "collects them)")  # fmt: skip
        self._plan = plan
        self._wide_scores: set[int] = set()
        if self.config.softmax_input_bits == 16 and stats is not None:
            self._wide_scores = {
                id(g.scores)
                for g in groups.values()
                if g.scores.producer() is not None and g.scores.producer().op_type in ("MatMul", "Mul", "Div")
            }
            plan = dataclasses.replace(plan, wide=frozenset(plan.wide | self._wide_scores))
        # IntSoftmax reads its input at a step below ln2 (qcompiler.dialect.nonlinear.softmax_constants): scores
        # whose int8 step would reach it are stored int16 where their producer can write int16, else clamped
        #: id(int8 scores) -> the step they get, inside IntSoftmax's readable range
        self._score_steps: dict[int, np.float32] = {}
        for g in groups.values():
            if g.scores.name not in self.ranges or id(g.scores) in self._wide_scores:
                continue
            step = activation_scale(self._range(g.scores))
            if step < WIDE_SCORES_MIN_SCALE:  # differences below the finest step change no probability
                self._score_steps[id(g.scores)] = WIDE_SCORES_MIN_SCALE
                continue
            if step < SOFTMAX_MAX_INPUT_SCALE:
                continue
            producer = g.scores.producer()
            if stats is not None and producer is not None and producer.op_type in ("MatMul", "Mul", "Div"):
                logger.info("softmax scores %s: int16 (their int8 step would reach ln2)", g.scores.name)
                self._wide_scores.add(id(g.scores))
                plan = dataclasses.replace(plan, wide=frozenset(plan.wide | {id(g.scores)}))
            else:
                logger.warning(
                    "softmax scores %s: clamped to +-%.1f (their producer %s cannot write int16)",
                    g.scores.name, float(SOFTMAX_MAX_INPUT_SCALE) * ACT_QMAX, producer.op_type if producer else "input",
                )  # fmt: skip
                self._score_steps[id(g.scores)] = SOFTMAX_MAX_INPUT_SCALE
        for value in list(graph.inputs):
            if value.name in self.cache_inputs:
                continue  # quantized where a Concat appends the new values (_quantize_cache)
            if value.dtype == ir.DataType.FLOAT:
                wide = self._wide_activation(graph, value)
                if wide is None:
                    wide = self._quantize_value(graph, value, self._range(value))
                scale_of[id(value)] = wide
        for node in list(graph):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not computes_on_floats(node):
                continue
            if id(node) in inside_groups:
                continue  # masks and NaN guards stay float inside the softmax group
            if FLOAT_ISLAND in node.metadata_props:
                for out in node.outputs:  # float inside; its float outputs quantized at their calibrated ranges
                    if out.dtype in _FLOATS and (out.uses() or is_graph_output(graph, out)):
                        scale_of[id(out)] = self._quantize_value(graph, out, self._range(out))
                continue
            if node.op_type == "Gather" and const_array(node.inputs[0]) is not None:
                self._quantize_table(graph, node, scale_of, index=0)  # an embedding table
            if node.op_type in ("Add", "Sub") or (node.op_type == "Mul" and not _is_scalar_rescale(node)):
                # a constant addend (folded position embeddings) or factor (RoPE's tables): int8 per tensor
                for index, value in enumerate(node.inputs):
                    if const_array(value) is not None:
                        self._quantize_table(graph, node, scale_of, index=index)
            if (
                node.op_type == "MatMul"
                and const_array(node.inputs[0]) is not None
                and const_array(node.inputs[1]) is None
            ):  # a constant on the left (DETR's folded object queries against the encoder's keys): int8 per tensor
                self._quantize_table(graph, node, scale_of, index=0)
            if node.op_type in ("Conv", "Gemm") or (
                node.op_type == "MatMul" and const_array(node.inputs[1]) is not None
            ):
                self._quantize_weights(graph, node, scale_of)
            out = node.outputs[0]
            if node.op_type == "Softmax":
                group_out = groups[id(node)].output
                bits = self.config.softmax_bits
                scale = SOFTMAX_OUTPUT_SCALE if bits == 8 else np.float32(2.0**-15)
                scale_of[id(group_out)] = self._quantize_value(graph, group_out, None, scale, bits=bits)
            elif node.op_type in ANCHOR_OPS:
                fused = consumers(out)
                if (
                    node.op_type in FUSING_ANCHORS
                    and len(fused) == 1
                    and fused[0].op_type in FUSABLE_ACTIVATIONS
                    and not is_graph_output(graph, out)
                ):
                    continue  # the activation's output carries the scale
                if id(out) in plan.wide_per_channel:
                    scale_of[id(out)] = self._quantize_value(graph, out, None, self._wide_channel_scales(out), bits=16)
                elif id(out) in plan.wide:
                    bound = plan.bounds.get(id(out), WIDE_QMAX)
                    scale = self._wide_scale(out, bound)
                    if id(out) in self._wide_scores:
                        scale = max(scale, WIDE_SCORES_MIN_SCALE)
                    scale_of[id(out)] = self._quantize_value(graph, out, None, scale, bits=16, bound=bound)
                elif id(out) in plan.per_channel:
                    scales = self._channel_scales(out, plan.weight_absmax.get(id(out)))
                    scale_of[id(out)] = self._quantize_value(graph, out, None, scales)
                elif id(out) in self._score_steps:
                    scale_of[id(out)] = self._quantize_value(graph, out, None, self._score_steps[id(out)])
                elif (wide := self._wide_activation(graph, out)) is not None:
                    scale_of[id(out)] = wide
                else:
                    scale_of[id(out)] = self._quantize_value(graph, out, self._range(out))
            elif (
                node.op_type in FUSABLE_ACTIVATIONS
                and node.inputs[0] is not None
                and (
                    node.inputs[0].producer() is not None
                    and node.inputs[0].producer().op_type in FUSING_ANCHORS
                    and id(node.inputs[0]) not in scale_of
                )
            ):
                wide = self._wide_activation(graph, out)
                scale_of[id(out)] = wide if wide is not None else self._quantize_value(graph, out, self._range(out))
            elif (
                node.op_type == "Concat"
                and not self._quantize_cache(graph, node, scale_of)  # a cache: on the new values' grid, a move
                and not self._concat_shares_scale(node, scale_of)
            ):
                scale_of[id(out)] = self._quantize_concat(graph, node, scale_of)
            elif node.op_type == "Split":
                source = node.inputs[0]
                if source is None or id(source) not in scale_of:
                    raise UnsupportedOpError(node_label(node), node.op_type, "its input is not quantized")
                for part in node.outputs:  # every part on the input's grid, within its bound (a Split moves values)
                    if part.uses() or is_graph_output(graph, part):
                        scale_of[id(part)] = self._quantize_value(
                            graph, part, None, scale_of[id(source)], bits=self._bits_of.get(id(source), 8),
                            level=self._level_of.get(id(source)),
                        )  # fmt: skip
            else:  # pass-through: same scale as the input
                source = node.inputs[0]
                if source is None or id(source) not in scale_of:
                    raise UnsupportedOpError(node_label(node), node.op_type, "its input is not quantized")
                scale_of[id(out)] = self._quantize_value(
                    graph, out, None, scale_of[id(source)], bits=self._bits_of.get(id(source), 8),
                    inherit_rows=id(source) in self._rows,
                    level=self._level_of.get(id(source)) if node.op_type in KEEPS_BOUND_OPS else None,
                )  # fmt: skip
        return ir.passes.PassResult(model, modified=True)

    # --- helpers -------------------------------------------------------------------------------
    def _quantize_cache(self, graph: ir.Graph, node: ir.Node, scale_of: dict[int, Any]) -> bool:
        """``Concat(past, new)`` of a cache input and the new values: the past quantized at the new values' scale
        and width (one grid: the Concat is then a move, quantized as one); True when ``node`` is such a Concat."""
        caches = [i for i, v in enumerate(node.inputs) if v is not None and v.name in self.cache_inputs]
        if not caches:
            return False
        label = node_label(node)
        if len(caches) != 1 or caches[0] != 0 or len(node.inputs) != 2:
            raise UnsupportedOpError(label, "Concat", "a cache input must be the first of two Concat inputs "
                                     "(past, new), as a KV cache appends the new keys or values")  # fmt: skip
        new = node.inputs[1]
        if new is None or id(new) not in scale_of:
            raise UnsupportedOpError(label, "Concat", "the new values appended to the cache are not quantized")
        past = node.inputs[0]
        assert past is not None
        if id(past) not in scale_of:
            readers = [r for r in consumers(past) if r.op_type not in SHAPE_READERS]
            if len(readers) != 1:
                raise UnsupportedOpError(label, "Concat", f"cache input {past.name!r} has {len(readers)} readers; "
                                         "a cache is read once (besides its shape), by the Concat that appends to "
                                         "it")  # fmt: skip
            level = self._level_of.get(id(new))
            scale_of[id(past)] = self._quantize_value(
                graph, past, None, scale_of[id(new)], bits=self._bits_of.get(id(new), 8), level=level
            )
            if level is not None:  # the cache holds what the step wrote: the lowering's product bounds read it
                quantize = next(n for n in consumers(past) if n.op_type == "QuantizeLinear")
                quantize.metadata_props[INPUT_LEVEL_PROP] = str(level)
        return True

    def _concat_shares_scale(self, node: ir.Node, scale_of: Mapping[int, Any]) -> bool:
        """Every input of the Concat is a quantized activation on one grid (RoPE's halves): a pure move."""
        if any(const_array(v) is not None for v in node.inputs):
            return False  # a constant part is quantized at the output's scale
        first = node.inputs[0]
        if first is None or id(first) not in scale_of:
            return True  # the pass-through branch names the unquantized input
        scale = np.asarray(scale_of[id(first)])
        bits = self._bits_of.get(id(first), 8)
        for value in node.inputs[1:]:
            if value is None or id(value) not in scale_of or self._bits_of.get(id(value), 8) != bits:
                return False
            other = np.asarray(scale_of[id(value)])
            if other.shape != scale.shape or not np.array_equal(other, scale):
                return False
        return True

    def _quantize_concat(self, graph: ir.Graph, node: ir.Node, scale_of: dict[int, Any]) -> np.float32:
        """A Concat of differently scaled inputs (a class token before patch embeddings, partial rotary halves):
        one int8 output scale, the coarsest input's, so every input's calibrated range fits and nothing is
        clipped; constant inputs are quantized at it, the lowering requantizes the other inputs to it
        (``round(q_i s_i / s)``, which the QDQ graph computes too)."""
        label = node_label(node)
        scales = []
        for index, value in enumerate(node.inputs):
            table = const_array(value)
            if table is not None:
                scales.append(max(float(np.abs(table).max()), 1e-8) / ACT_QMAX)
                continue
            if value is None or id(value) not in scale_of:
                raise UnsupportedOpError(label, "Concat", f"its input {index} is not quantized")
            scale = np.asarray(scale_of[id(value)])
            if scale.size > 1 or self._bits_of.get(id(value), 8) != 8:
                raise UnsupportedOpError(
                    label, "Concat", f"input {index} is int16 or quantized per channel and the inputs' scales differ; "
                    "only int8 per-tensor inputs are requantized to one scale",
                )  # fmt: skip
            scales.append(float(scale))
        top = np.float32(max(scales))
        for index, value in enumerate(node.inputs):
            table = const_array(value)
            if table is None:
                continue
            assert value is not None
            codes = np.clip(np.round(table / top), -ACT_QMAX, ACT_QMAX).astype(np.int8)
            name = f"{value.name or 'concat_input'}_at_{node.outputs[0].name or 'concat'}"
            codes_value = add_initializer(graph, f"{name}_quantized", codes)  # a unique name: the DQ's follows it
            deq = ir.node("DequantizeLinear", [
                codes_value,
                add_initializer(graph, f"{name}_scale", np.array(top, np.float32)),
                add_initializer(graph, f"{name}_zero_point", np.array(0, np.int8)),
            ])  # fmt: skip
            deq.outputs[0].name = f"{codes_value.name}_dq"
            deq.outputs[0].dtype = ir.DataType.FLOAT
            graph.insert_before(node, deq)
            node.replace_input_with(index, deq.outputs[0])
            scale_of[id(deq.outputs[0])] = top
        logger.debug("Concat %s: inputs at %s requantized to %s", label, scales, top)
        return self._quantize_value(graph, node.outputs[0], None, top)

    def _check_supported(self, graph: ir.Graph, inside_groups: set[int]) -> None:
        """Refuse the first node the integer path cannot handle by name; with ``float_islands``, tag every such
        node instead (:data:`FLOAT_ISLAND`: kept in float between DequantizeLinear and QuantizeLinear)."""
        for node in graph:
            if not computes_on_floats(node) or id(node) in inside_groups:
                continue
            try:
                self._check_node(node)
            except UnsupportedOpError as refusal:
                if not self.float_islands:
                    raise
                node.metadata_props[FLOAT_ISLAND] = str(refusal)
                logger.warning("float island: %s", refusal)

    def _check_node(self, node: ir.Node) -> None:
        label = node_label(node)
        if node.op_type == "Gather" and const_array(node.inputs[0]) is not None and node.attributes.get_int("axis", 0):
            raise UnsupportedOpError(label, "Gather", "a constant table is read by rows (axis 0) only; fold constants")
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(label, f"{node.domain}::{node.op_type}", "custom ops cannot be quantized")
        if node.op_type == "Resize":  # decompose-resize left it: say why
            raise UnsupportedOpError(label, "Resize", resize_refusal(node))
        if node.op_type not in ANCHOR_OPS | PASS_THROUGH_OPS:
            raise UnsupportedOpError(
                label,
                node.op_type,
                "the W8A8 integer path does not handle this op yet; "
                "supported: " + ", ".join(sorted(ANCHOR_OPS | PASS_THROUGH_OPS)),
            )
        row = traits(node.op_type)
        if row is not None and row.lowering == "lookup" and any(const_array(v) is None for v in node.inputs[1:]):
            raise UnsupportedOpError(label, node.op_type, "its inputs after the first must be constants (a table)")
        if (
            node.op_type == "Div"
            and not _is_scalar_rescale(node)
            and any(const_array(v) is not None for v in node.inputs)
        ):
            raise UnsupportedOpError(
                label, "Div", "only an activation divided by a positive constant scalar, or by another activation"
            )
        if node.op_type == "Mul" and all(const_array(v) is not None for v in node.inputs):
            raise UnsupportedOpError(label, "Mul", "both factors are constants: fold constants first")
        if node.op_type in ("Conv", "Gemm") and const_array(node.inputs[1]) is None:
            raise UnsupportedOpError(label, node.op_type, "the weight (input 1) must be a constant initializer")
        if node.op_type in ("Add", "Sub") and all(const_array(v) is not None for v in node.inputs):
            raise UnsupportedOpError(label, node.op_type, "both operands are constants: fold constants first")
        if node.op_type == "AveragePool":
            average_pool_window(node)  # refuses what the integer pool does not support, by name
        if node.op_type == "Gemm":
            alpha = node.attributes.get("alpha")
            if node.attributes.get_int("transA", 0) or (alpha is not None and alpha.as_float() != 1.0):
                raise UnsupportedOpError(label, "Gemm", "transA=1 or alpha != 1 is not supported")
        if node.op_type in ("Softmax", "LayerNormalization", "RMSNormalization") and node.attributes.get_int(
            "axis", -1
        ) not in (
            -1,
            _rank(node.inputs[0]) - 1,
        ):
            raise UnsupportedOpError(label, node.op_type, "only the last axis is supported")
        if node.op_type in ("LayerNormalization", "RMSNormalization") and (
            const_array(node.inputs[1]) is None or (len(node.inputs) > 2 and const_array(node.inputs[2]) is None)
        ):
            raise UnsupportedOpError(label, node.op_type, "scale and bias must be constant initializers")
        if node.op_type == "MatMul" and (w := const_array(node.inputs[1])) is not None and w.ndim != 2:
            raise UnsupportedOpError(label, "MatMul", f"weight of rank {w.ndim}: only 2-D weights")

    def _range(self, value: ir.Value) -> float:
        if value.name not in self.ranges:
            raise CalibrationError(
                f"calibration: no range for tensor {value.name!r}; calibrate the same (canonicalized) model "
                "that is being quantized"
            )
        return self.ranges[value.name]

    def _wide_activation(self, graph: ir.Graph, value: ir.Value) -> np.float32 | None:
        """W8A16: quantize a planned ``value`` to int16 at the level bound its readers allow and return its scale;
        None (the caller quantizes it to int8) when it is not planned, no bound of 2^7 or more exists, or a bound
        is needed where nothing can clamp (a graph input; a producer whose integer form has no output clamp)."""
        if id(value) not in self._plan.activations:
            return None
        absmax = self._absmax(value)
        if absmax is None:
            return None
        bound = wide_activation_bound(graph, value, absmax, weight_qmax=2 ** (self.config.weight_bits - 1) - 1)
        if bound == 0 or (bound < WIDE_QMAX and not writes_clamped(value.producer())):
            return None
        scale = self._wide_scale(value, bound)
        self._quantize_value(graph, value, None, scale, bits=16, bound=bound)
        return scale

    def _absmax(self, value: ir.Value) -> float | None:
        """The exact calibrated maximum of ``|value|`` (1 for a tensor that stayed zero); None without statistics."""
        assert self.channel_absmax is not None
        stats = self.channel_absmax.get(value.name or "")
        if stats is None:
            return None
        absmax = float(stats.max())
        return absmax if absmax > 0.0 else 1.0

    def _wide_scale(self, value: ir.Value, bound: int = WIDE_QMAX) -> np.float32:
        """int16 scale from the exact maximum (16 bits leave no reason to clip), ``bound`` its largest level."""
        absmax = self._absmax(value)
        if absmax is None:
            raise CalibrationError(f"calibration: no per-channel statistics for tensor {value.name!r}")
        return np.float32(absmax / bound)

    def _wide_channel_scales(self, value: ir.Value) -> np.ndarray:
        """One int16 scale per channel: its calibrated maximum times :data:`CHANNEL_HEADROOM` (a channel's maximum
        over a few calibration windows is a poor bound for new text; two bits of int16 cost less than clipping),
        the finest kept within 1000x of the widest (a prescaled RMSNorm carries 1024, less a margin for float32
        rounding)."""
        assert self.channel_absmax is not None
        stats = self.channel_absmax.get(value.name or "")
        if stats is None or stats.size < 2:
            raise CalibrationError(f"calibration: no per-channel statistics for tensor {value.name!r}")
        top = float(stats.max()) if stats.max() > 0 else 1.0
        return (np.maximum(stats, top / 1000.0) * CHANNEL_HEADROOM / WIDE_QMAX).astype(np.float32)

    def _channel_scales(self, value: ir.Value, weight_absmax: np.ndarray | None) -> np.ndarray:
        """One int8 scale per channel of the last axis: ``max|x_c| / 127`` (alpha 1), or SmoothQuant's balance
        ``t_c = d s_c``, ``s_c = max|x_c|^a / max|W_c|^(1-a)``, ``d = max_c(max|x_c| / s_c) / 127`` when linear
        layers read the value; channels that stayed (near) zero in calibration get 2^-10 of the largest range,
        so their ratio folded into a weight stays representable."""
        assert self.channel_absmax is not None
        stats = self.channel_absmax.get(value.name or "")
        if stats is None or stats.size < 2:
            raise CalibrationError(f"calibration: no per-channel statistics for tensor {value.name!r}")
        top = float(stats.max()) if stats.max() > 0 else 1.0
        ranges = np.maximum(stats, top / 1024.0)
        if weight_absmax is None or weight_absmax.shape != ranges.shape:
            return (ranges / ACT_QMAX).astype(np.float32)
        grid = sorted({self.config.migration_alpha, *self.config.migration_alpha_grid})
        if len(grid) == 1:
            return balanced_scales(ranges, weight_absmax, grid[0])
        readers = [w for w in linear_reader_weights(value) if w.shape[0] == ranges.size]
        h = self.hessians.get(value.name or "")
        # E[x_c^2] from the input Hessian (2 X^T X / N) when calibration collected it, else a range-based guess
        second = np.diag(h) / 2.0 if h is not None and h.shape[0] == ranges.size else (ranges / 3.0) ** 2
        errors = {a: migration_error(balanced_scales(ranges, weight_absmax, a), readers, second) for a in grid}
        best = min(grid, key=lambda a: errors[a])
        self.searched_alpha[value.name or ""] = best
        logger.debug("migration alpha %.2f for %s (errors %s)", best, value.name, errors)
        return balanced_scales(ranges, weight_absmax, best)

    def _quantize_value(
        self,
        graph: ir.Graph,
        value: ir.Value,
        absmax: float | None,
        scale: Any = None,
        bits: int = 8,
        bound: int | None = None,
        inherit_rows: bool = False,
        level: int | None = None,
    ) -> Any:
        """Insert ``Q -> DQ`` after ``value`` and route every reader (and graph output) through it.

        With ``row_exponents``, an int8 GEMM input (read by bias-free linears, perhaps through shape-only ops)
        is stored as int16 at finer steps, and the linears read it through the row-exponent form
        (passes/quantize/row_exponent.py); ``inherit_rows`` marks a shape-only op's output after such a tensor.

        ``bound`` below the storage range: a ``Clip`` to ``[-bound, bound]`` steps goes before the ``Q`` (the
        fused-activation form, which the lowering turns into the producer's output clamp). ``level``: the bound
        its levels already keep without a clamp (a move of a clamped tensor).

        ``scale`` may be one float or one per channel of the last axis; then linear readers (constant weights)
        get their own ``DQ`` at the largest scale ``t0`` and fold ``t / t0`` into their weights.
        """
        if scale is None:
            assert absmax is not None
            scale = activation_scale(absmax)
        scales = np.asarray(scale, dtype=np.float32)
        rows = inherit_rows  # a shape-only op after a row-exponent tensor: same int16 codes
        if not rows and bits == 8 and bound is None and self.config.row_exponents:
            rows = row_exponent.candidate(graph, value, through_shape_ops=True)
            if rows:  # int16 codes at finer steps, read per token as int8 with a power-of-two step
                bits = 16
                scales = (scales.astype(np.float64) / self.config.row_exponent_refinement).astype(np.float32)
        read_rows = rows and row_exponent.candidate(graph, value)  # linears read it here (not a shape op)
        per_channel = scales.size > 1
        storage = {8: (ir.DataType.INT8, np.int8), 16: (ir.DataType.INT16, np.int16)}[bits]
        base = value.name or "act"
        clamped = bound is not None and bound < _QMAX[bits]
        limit = float(np.float32(bound) * np.float32(scales.max())) if clamped else 0.0
        fused = value.producer() if clamped and _narrows(value.producer()) else None
        if fused is not None:  # a fused Relu/Clip already before the Q becomes the one Clip of both ranges (the
            # lowering reads one activation between an op and its QuantizeLinear)
            value = self._clip(graph, fused.inputs[0], base, limit, _clip_range(fused), fused)
        readers = list(value.uses())  # before the Q node below becomes a reader too
        scale_value = add_initializer(graph, f"{base}_scale", scales)
        zero_value = add_initializer(graph, f"{base}_zero_point", np.zeros(scales.shape, dtype=storage[1]))
        axis = {"axis": -1} if per_channel else {}
        source = value
        new_nodes = []
        if clamped and fused is None:  # the bound as a Clip before the Q
            source = self._clip(graph, value, base, limit, (-limit, limit), None)
            new_nodes.append(source.producer())
        quant = ir.node("QuantizeLinear", [source, scale_value, zero_value], attributes=axis)
        quant.outputs[0].name = f"{base}_q"
        quant.outputs[0].dtype = storage[0]
        quant.outputs[0].shape = value.shape
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale_value, zero_value], attributes=axis)
        deq_out = dequant.outputs[0]
        deq_out.dtype = ir.DataType.FLOAT
        deq_out.shape = value.shape
        deq_out.name = f"{base}_dq"
        new_nodes += [quant, dequant]
        linear_readers = [(r, i) for r, i in readers if per_channel and _folds_input_scales(r, i)]
        linear_target = deq_out
        if linear_readers:
            top = np.float32(scales.max())
            top_value = add_initializer(graph, f"{base}_scale_linear", np.array(top, dtype=np.float32))
            top_zero = add_initializer(graph, f"{base}_zero_point_linear", np.array(0, dtype=storage[1]))
            shared = ir.node("DequantizeLinear", [quant.outputs[0], top_value, top_zero])
            shared.outputs[0].dtype = ir.DataType.FLOAT
            shared.outputs[0].shape = value.shape
            shared.outputs[0].name = f"{base}_dq_linear"
            new_nodes.append(shared)
            linear_target = shared.outputs[0]
            self._scale_of[id(shared.outputs[0])] = top
            self._fold_of[id(shared.outputs[0])] = scales.astype(np.float64) / float(top)
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph.node(0), new_nodes)
        else:
            graph.insert_after(producer, new_nodes)
        if rows:
            self._rows.add(id(deq_out))
        if read_rows:  # the linears read the (linear) DQ output per row
            top = np.float32(scales.max())
            qmax = row_exponent.ROW_QMAX_OF_BITS.get(self.config.activation_bits, row_exponent.ROW_QMAX)
            bound = round(qmax / self.config.row_exponent_clip)
            linear_target = row_exponent.insert(graph, linear_target, float(top), qmax=qmax, bound=bound)
            linear_readers = list(readers)
            self._scale_of[id(linear_target)] = top
            if per_channel:
                self._fold_of[id(linear_target)] = scales.astype(np.float64) / float(top)
        for reader, index in readers:
            target = linear_target if (reader, index) in linear_readers else deq_out
            reader.replace_input_with(index, target)
        if is_graph_output(graph, value):
            position = next(i for i, out in enumerate(graph.outputs) if out is value)
            original = value.name
            value.name = f"{original}_float"
            quant.outputs[0].name = f"{original}_q"
            deq_out.name = original
            graph.outputs[position] = deq_out
        self._scale_of[id(deq_out)] = scales if per_channel else np.float32(scales)
        self._bits_of[id(deq_out)] = bits
        storage_max = _QMAX[bits] + 1  # QuantizeLinear writes down to -128 / -32768
        self._level_of[id(deq_out)] = min(storage_max, bound if bound is not None else level or storage_max)
        return self._scale_of[id(deq_out)]

    @staticmethod
    def _clip(
        graph: ir.Graph, x: ir.Value, base: str, limit: float, keep: tuple[float, float], replaces: ir.Node | None
    ) -> ir.Value:
        """``Clip(x)`` to ``[-limit, limit]`` within ``keep``: in place of ``replaces`` (a fused Relu/Clip, whose
        readers and name it takes), or a new node the caller inserts."""
        low = add_initializer(graph, f"{base}_clamp_low", np.array(max(-limit, keep[0]), np.float32))
        high = add_initializer(graph, f"{base}_clamp_high", np.array(min(limit, keep[1]), np.float32))
        clip = ir.node("Clip", [x, low, high])
        out = clip.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, x.shape
        if replaces is None:
            out.name = f"{base}_clamped"
            return out
        clip.name = replaces.name
        graph.insert_after(replaces, clip)
        replaces.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(replaces, safe=True)
        replaces.outputs[0].name = f"{base}_unclamped"
        out.name = base
        return out

    def _quantize_table(self, graph: ir.Graph, node: ir.Node, scale_of: dict[int, np.float32], index: int) -> None:
        """A constant operand (embedding table, constant addend or factor): symmetric int8 per tensor, so every
        looked-up row shares one scale. A constant read by several nodes (RoPE's tables) is quantized once."""
        source = node.inputs[index]
        assert source is not None
        shared = self._tables.get(id(source))
        if shared is not None:
            node.replace_input_with(index, shared)
            return
        table = const_array(source)
        assert table is not None
        scale = np.float32(max(float(np.abs(table).max()), 1e-8) / WEIGHT_QMAX)
        q_table = np.clip(np.round(table / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
        name = node.inputs[index].name or "table"
        q_value = add_initializer(graph, f"{name}_quantized", q_table)
        s_value = add_initializer(graph, f"{name}_scale", np.array(scale, np.float32))
        z_value = add_initializer(graph, f"{name}_zero_point", np.array(0, np.int8))
        deq = ir.node("DequantizeLinear", [q_value, s_value, z_value])
        deq.outputs[0].name = f"{name}_dq"
        deq.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, deq)
        node.replace_input_with(index, deq.outputs[0])
        scale_of[id(deq.outputs[0])] = scale
        self._tables[id(source)] = deq.outputs[0]

    def _hessian(self, node: ir.Node, fold: np.ndarray | None) -> np.ndarray:
        """The layer's input Hessian; it follows a folded per-channel input (the layer reads ``x / r``, so
        ``H -> diag(1/r) H diag(1/r)``)."""
        h = self.hessians[self._float_input[id(node)]]
        if fold is not None:
            inv = 1.0 / fold.astype(np.float64)
            h = h * inv[:, None] * inv[None, :]
        return h

    def _gptq(
        self, node: ir.Node, weight: np.ndarray, axis: int, fold: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric per-output-channel int8 codes by GPTQ."""
        in_out = weight.astype(np.float64) if axis == 1 else weight.astype(np.float64).T
        spec = WeightQuantSpec(8)
        result = gptq(
            in_out, self._hessian(node, fold), spec, damp=self.config.gptq_damp, act_order=self.config.gptq_act_order
        )
        q, scales = result.q, result.scales[0].astype(np.float32)
        return (q if axis == 1 else q.T).astype(np.int8), scales

    def _int4_weight(
        self, graph: ir.Graph, node: ir.Node, weight: np.ndarray, axis: int, fold: np.ndarray | None
    ) -> tuple[ir.Value, np.ndarray]:
        """Symmetric int4 codes per group of input channels (or per output channel), the group scales on the
        integer grid of :func:`qcompiler.dialect.group_scale_bits`: the INT4 ``DequantizeLinear`` (blocked
        along the input axis for groups) and the per-channel unit scale ``s_max / 2^B`` the bias is stored at."""
        in_out = weight.astype(np.float64) if axis == 1 else weight.astype(np.float64).T
        k = in_out.shape[0]
        spec = int4_weight_spec(self.config, k)
        group, bits = spec.group_size, group_scale_bits(k, spec.group_size)
        if self.config.weight_quantizer == "gptq":
            result = gptq(in_out, self._hessian(node, fold), spec, damp=self.config.gptq_damp,
                          act_order=self.config.gptq_act_order)  # fmt: skip
        else:
            result = quantize_rtn(in_out, spec)
        scales = result.scales.astype(np.float32)  # [groups, out]
        unit = (result.scales.max(axis=0) / 2.0**bits).astype(np.float32)
        codes = result.q if axis == 1 else result.q.T
        w_name = node.inputs[1].name or "weight"
        q_value = add_initializer(graph, f"{w_name}_quantized", codes.astype(np.int8), ir.DataType.INT4)
        if group is None:
            dq_scales, attributes = scales[0], {"axis": axis}
        else:  # blocked along the input axis: the scale has the weight's shape with that axis divided
            dq_scales = scales if axis == 1 else np.ascontiguousarray(scales.T)
            attributes = {"axis": 1 - axis, "block_size": group}
        s_value = add_initializer(graph, f"{w_name}_scale", dq_scales)
        z_value = add_initializer(graph, f"{w_name}_zero_point", np.zeros(dq_scales.shape, np.int8), ir.DataType.INT4)
        deq_w = ir.node("DequantizeLinear", [q_value, s_value, z_value], attributes=attributes)
        deq_w.outputs[0].name = f"{w_name}_dq"
        deq_w.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, deq_w)
        node.replace_input_with(1, deq_w.outputs[0])
        return q_value, unit

    @staticmethod
    def _fit_bias(
        node: ir.Node,
        weight: np.ndarray,
        axis: int,
        q_weight: np.ndarray,
        w_scales: np.ndarray,
        input_scale: Any,
        accumulator_bound: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raise the scale of output channels whose int32 bias ``b / (S_x s_c)`` would not fit: channels with
        (nearly) dead weights (max|W_c| ~ 1e-35 after BatchNorm folding) and a live bias. Their weights round to 0
        at any scale, so the larger ``s_c`` loses nothing and the bias keeps its value."""
        bias = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        channels = w_scales.size
        if bias is None or bias.size not in (1, channels):
            return q_weight, w_scales
        limit = float(INT32_MAX - accumulator_bound)
        needed = np.abs(np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)))
        needed = needed / (float(np.max(np.asarray(input_scale, np.float64))) * limit) * (1.0 + 1e-6)
        low = w_scales.astype(np.float64) < needed
        if not low.any():
            return q_weight, w_scales
        logger.info("%s: %d channel(s) with dead weights get the scale their bias needs", node_label(node), low.sum())
        scales = np.where(low, needed, w_scales).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        codes = np.clip(np.round(weight / scales.reshape(shape)), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
        mask = low.reshape(shape) & np.ones(weight.shape, dtype=bool)
        return np.where(mask, codes, q_weight).astype(np.int8), scales

    def _layer_bits(self, node: ir.Node) -> int:
        """The weight bits of ``node``: the first ``layer_weight_bits`` pattern one of its names matches, else
        ``weight_bits``."""
        return next((bits for pattern, bits in self.config.layer_weight_bits if _answers_to(node, pattern)),
                    self.config.weight_bits)  # fmt: skip

    def _quantize_weights(self, graph: ir.Graph, node: ir.Node, scale_of: Mapping[int, np.float32]) -> None:
        source = node.inputs[0]
        assert source is not None
        rows_source = row_exponent.source_of(source)  # a row-exponent read: its DequantizeLinear
        dq_input = rows_source.producer() if rows_source is not None else source.producer()
        if dq_input is None or dq_input.op_type != "DequantizeLinear":
            raise UnsupportedOpError(node_label(node), node.op_type, "its input activation is not quantized")
        input_scale = scale_of[id(source)]
        weight = const_array(node.inputs[1])
        assert weight is not None
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            axis = 0 if node.attributes.get_int("transB", 0) else 1
        else:
            axis = 1
        fold = self._fold_of.get(id(source))
        if fold is not None:  # a per-channel input read at the largest scale: its ratios go into the weight rows
            rows = [1, 1]
            rows[1 - axis] = -1
            weight = weight.astype(np.float64) * fold.reshape(rows)
        hadamard = hadamard_matmul(node) if fold is None else None
        level = self._level_of.get(id(source), ACT_QMAX + 1)  # the largest |x| the input's levels reach
        accumulator_bound = (int(np.prod(weight.shape)) // weight.shape[axis]) * level * 127
        if hadamard is None and self._layer_bits(node) == 4 and node.op_type != "Conv":
            _, w_scales = self._int4_weight(graph, node, weight, axis, fold)
            accumulator_bound = INT4_ACC_BUDGET
        else:
            if hadamard is not None:  # an online Hadamard: its +-1 signs exactly, at the one scale c
                q_weight = np.sign(weight).astype(np.int8)
                w_scales = np.full(weight.shape[axis], hadamard[0], dtype=np.float32)
            elif self.config.weight_quantizer == "gptq" and node.op_type != "Conv":
                q_weight, w_scales = self._gptq(node, weight, axis, fold)
            else:
                q_weight, w_scales = quantize_weight_per_channel(weight, axis)
            if hadamard is None:
                q_weight, w_scales = self._fit_bias(node, weight, axis, q_weight, w_scales, input_scale,
                                                    accumulator_bound)  # fmt: skip
            w_name = node.inputs[1].name or "weight"
            q_value = add_initializer(graph, f"{w_name}_quantized", q_weight)
            s_value = add_initializer(graph, f"{w_name}_scale", w_scales)
            z_value = add_initializer(graph, f"{w_name}_zero_point", np.zeros_like(w_scales, dtype=np.int8))
            deq_w = ir.node("DequantizeLinear", [q_value, s_value, z_value], attributes={"axis": axis})
            shared = len(node.inputs[1].uses()) > 1  # one constant read by several nodes (online Hadamards)
            deq_w.outputs[0].name = f"{q_value.name}_dq" if shared else f"{w_name}_dq"
            deq_w.outputs[0].dtype = ir.DataType.FLOAT
            graph.insert_before(node, deq_w)
            node.replace_input_with(1, deq_w.outputs[0])
        bias_index = 2
        bias = const_array(node.inputs[bias_index]) if len(node.inputs) > bias_index else None
        if bias is None:
            return
        channels = weight.shape[axis]
        bias_vec = (
            np.broadcast_to(bias.astype(np.float64).reshape(-1), (channels,)) if bias.size in (1, channels) else None
        )
        if bias_vec is None:
            raise UnsupportedOpError(node_label(node), node.op_type, f"bias of shape {bias.shape} is not per channel")
        bias_scales = (np.float64(input_scale) * w_scales.astype(np.float64)).astype(np.float32)
        q_bias = np.round(bias_vec / bias_scales.astype(np.float64))
        limit = INT32_MAX - accumulator_bound
        if np.any(np.abs(q_bias) > limit):
            raise UnsupportedOpError(
                node_label(node),
                node.op_type,
                "the bias does not fit int32 at scale S_x*S_w; the input range is too small for this bias",
            )
        b_name = node.inputs[bias_index].name or "bias"
        qb_value = add_initializer(graph, f"{b_name}_quantized", q_bias.astype(np.int32))
        sb_value = add_initializer(graph, f"{b_name}_scale", bias_scales)
        zb_value = add_initializer(graph, f"{b_name}_zero_point", np.zeros(channels, dtype=np.int32))
        deq_b = ir.node("DequantizeLinear", [qb_value, sb_value, zb_value], attributes={"axis": 0})
        deq_b.outputs[0].name = f"{b_name}_dq"
        deq_b.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, deq_b)
        node.replace_input_with(bias_index, deq_b.outputs[0])
