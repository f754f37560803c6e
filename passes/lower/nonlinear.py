"""Lowering of the float nonlinearities of a QDQ graph to the integer ones of the dialect.

``DQ(x) -> Softmax | LayerNormalization | Gelu | Sigmoid -> Q`` becomes ``IntSoftmax | IntLayerNorm | IntGelu |
IntSigmoid`` on the int8 input; the float scales become integer attributes here, once, through
:mod:`qcompiler.dialect.nonlinear`. Each keeps its documented error bound (docs/dialect.md).

:class:`LowerNonlinearitiesPass` lowers these islands alone and leaves the rest of the QDQ graph in float: the
integer-faithful simulation of a recipe (I-BERT's simulation: float linear algebra, integer nonlinearities),
which the integer-only code matches op by op (:func:`qcompiler.testing.compare_lowering`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from qcompiler.dialect import DOMAIN, OPSET_VERSION
from qcompiler.dialect import nonlinear as integer
from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.analysis.silu import silu_sigmoid, silu_sigmoids
from qcompiler.ir.analysis.softmax_groups import softmax_group
from qcompiler.ir.graph import FLOAT_ISLAND, add_initializer, const_array, consumers, node_label
from qcompiler.passes.lower.groups import (
    clamp_bounds,
    dequantized,
    output_scale,
    output_scales,
    quantized_output,
    replace_group_output,
)
from qcompiler.passes.lower.lookup import lower_lookup, lower_silu_lookup


def _emit(graph: ir.Graph, quant: ir.Node, node: ir.Node) -> None:
    graph.insert_after(quant, node)
    replace_group_output(quant, node.outputs[0])


def _rescale(
    graph: ir.Graph, quant: ir.Node, base: str, constants: dict, activation: ir.Node | None = None
) -> tuple[ir.Value, ir.Value, dict]:
    """The output multiplier and shift (one, or one per channel) as initializers; the rest as attributes, the
    output clamp narrowed by a Relu/Clip before ``quant`` (``activation``)."""
    multiplier = add_initializer(graph, f"{base}_multiplier", np.asarray(constants["multiplier"], np.int32))
    shift = add_initializer(graph, f"{base}_shift", np.asarray(constants["shift"], np.int32))
    rest = {k: int(v) for k, v in constants.items() if k not in ("multiplier", "shift")}
    lo, hi = clamp_bounds(activation, quant)
    return multiplier, shift, {**rest, "lo": lo, "hi": hi}


def lower_softmax(graph: ir.Graph, node: ir.Node) -> None:
    """A softmax group (mask Add, Softmax, NaN guard) becomes one ``IntSoftmax(scores, keep)``."""
    group = softmax_group(node)
    x = dequantized(group.scores, "input", node)
    quants = [r for r in consumers(group.output) if r.op_type == "QuantizeLinear"]
    if len(quants) != 1:
        raise UnsupportedOpError(node_label(node), "Softmax", "its output is not quantized by one QuantizeLinear")
    quant = quants[0]
    out_bits = 15 if quant.outputs[0].dtype == ir.DataType.INT16 else 7
    if not np.isclose(output_scale(quant), 2.0**-out_bits):
        raise UnsupportedOpError(
            node_label(node), "Softmax", "its output must be quantized at scale 2^-7 (int8) or 2^-15 (int16)"
        )
    constants = {**integer.softmax_constants(float(x.scale.reshape(()))), "out_bits": out_bits}
    keep = group.keep
    before = []
    if keep is not None and group.keep_inverted:  # masked_fill's mask marks what is dropped
        negation = ir.node("Not", [keep])
        negation.outputs[0].dtype = ir.DataType.BOOL
        before.append(negation)
        keep = negation.outputs[0]
    if group.keep_constant is not None:  # constant masks (a causal mask folded at export)
        constant = add_initializer(graph, f"{quant.outputs[0].name or 'softmax'}_keep", group.keep_constant)
        if keep is None:
            keep = constant
        else:  # a run-time mask too: both must keep an entry
            both = ir.node("And", [keep, constant])
            both.outputs[0].dtype = ir.DataType.BOOL
            before.append(both)
            keep = both.outputs[0]
    inputs = [x.value] if keep is None else [x.value, keep]
    if before:
        graph.insert_before(node, before)
    _emit(graph, quant, ir.node("IntSoftmax", inputs, domain=DOMAIN, attributes=constants))


def lower_layernorm(graph: ir.Graph, node: ir.Node) -> None:
    """LayerNormalization and RMSNormalization (gamma only) become IntLayerNorm (``rms`` for the latter)."""
    x = dequantized(node.inputs[0], "input", node)
    activation, quant = quantized_output(node)
    rms = node.op_type == "RMSNormalization"
    gamma = const_array(node.inputs[1])
    beta = const_array(node.inputs[2]) if not rms and len(node.inputs) > 2 and node.inputs[2] is not None else None
    if gamma is None:
        raise UnsupportedOpError(node_label(node), node.op_type, "its scale must be a constant initializer")
    channels = gamma.size
    beta = np.zeros(channels) if beta is None else beta
    epsilon = node.attributes.get_float("epsilon", 1e-5)
    input_bits = 16 if x.value.dtype == ir.DataType.INT16 else 8
    prescale = None
    try:
        if x.scale.ndim:  # a per-channel input: each channel to one statistics scale first (RMSNorm only)
            if not rms:
                raise ValueError("a per-channel input needs RMSNorm (LayerNorm's mean mixes the channels' scales)")
            prescale, input_scale = integer.layernorm_prescale(x.scale)
        else:
            input_scale = float(x.scale)
        constants = integer.layernorm_constants(
            input_scale,
            output_scales(quant),
            gamma,
            beta,
            epsilon,
            channels,
            input_bits,
            prescaled=prescale is not None,
        )
    except ValueError as exc:
        raise UnsupportedOpError(node_label(node), node.op_type, str(exc)) from exc
    base = quant.outputs[0].name or "norm"
    params = [add_initializer(graph, f"{base}_{k}", np.asarray(constants[k])) for k in ("multiplier", "shift", "bias")]
    if prescale is not None:
        params.append(add_initializer(graph, f"{base}_input_multiplier", prescale))
    lo, hi = clamp_bounds(activation, quant)
    attrs = {
        "epsilon_q": int(constants["epsilon_q"]),
        "frac_bits": int(constants["frac_bits"]),
        "rms": int(rms),
        "lo": lo,
        "hi": hi,
    }
    _emit(graph, quant, ir.node("IntLayerNorm", [x.value, *params], domain=DOMAIN, attributes=attrs))


def lower_gelu(graph: ir.Graph, node: ir.Node) -> None:
    x = dequantized(node.inputs[0], "input", node)
    activation, quant = quantized_output(node)
    constants = integer.gelu_constants(float(x.scale.reshape(())), output_scales(quant))
    multiplier, shift, attrs = _rescale(graph, quant, quant.outputs[0].name or "gelu", constants, activation)
    _emit(graph, quant, ir.node("IntGelu", [x.value, multiplier, shift], domain=DOMAIN, attributes=attrs))


def lower_silu(graph: ir.Graph, node: ir.Node, sigmoid: ir.Node) -> None:
    """``Mul(x, Sigmoid(x))`` (the Sigmoid left in float by the quantizer) becomes ``IntSigmoid(x, silu=1)``."""
    x = dequantized(sigmoid.inputs[0], "input", sigmoid)
    _, quant = quantized_output(node)
    input_bits = 16 if x.value.dtype == ir.DataType.INT16 else 8
    constants = integer.sigmoid_constants(
        float(x.scale.reshape(())), output_scales(quant), silu=True, input_bits=input_bits
    )
    multiplier, shift, attrs = _rescale(graph, quant, quant.outputs[0].name or "silu", constants)
    attrs["silu"] = 1
    _emit(graph, quant, ir.node("IntSigmoid", [x.value, multiplier, shift], domain=DOMAIN, attributes=attrs))


def lower_sigmoid(graph: ir.Graph, node: ir.Node) -> None:
    x = dequantized(node.inputs[0], "input", node)
    activation, quant = quantized_output(node)
    input_bits = 16 if x.value.dtype == ir.DataType.INT16 else 8
    constants = integer.sigmoid_constants(
        float(x.scale.reshape(())), output_scales(quant), silu=False, input_bits=input_bits
    )
    multiplier, shift, attrs = _rescale(graph, quant, quant.outputs[0].name or "sigmoid", constants, activation)
    _emit(graph, quant, ir.node("IntSigmoid", [x.value, multiplier, shift], domain=DOMAIN, attributes=attrs))


NONLINEAR_LOWERINGS: dict[str, Callable[[ir.Graph, ir.Node], None]] = {
    "Softmax": lower_softmax,
    "LayerNormalization": lower_layernorm,
    "RMSNormalization": lower_layernorm,
    "Gelu": lower_gelu,
    "Sigmoid": lower_sigmoid,
}


#: the integer nonlinearities that ``tables=True`` lowers as exact lookup tables instead (passes/lower/lookup.py)
TABLE_NONLINEARITIES = frozenset({"Gelu", "Sigmoid"})


def lower_nonlinearity(graph: ir.Graph, node: ir.Node, silu_gates: set[int], tables: bool = False) -> bool:
    """Lower ``node`` if a nonlinear island starts there: a SiLU's ``Mul``, or a Softmax, LayerNormalization,
    RMSNormalization, Gelu or Sigmoid (not one of ``silu_gates``, the ids of SiLU Sigmoids, lowered with their
    Mul). With ``tables``, SiLU, Sigmoid and Gelu become lookup tables over their input's levels (exactly the QDQ
    graph's ``Q(f(DQ(x)))``; for deep CNNs, where I-BERT's polynomials compound). Returns whether it did: the
    one dispatch both lowering passes use."""
    if node.domain not in ("", "ai.onnx") or FLOAT_ISLAND in node.metadata_props:
        return False
    if node.op_type == "Mul" and (sigmoid := silu_sigmoid(node)) is not None:
        (lower_silu_lookup if tables else lower_silu)(graph, node, sigmoid)
        return True
    if tables and node.op_type in TABLE_NONLINEARITIES and id(node) not in silu_gates:
        lower_lookup(graph, node)
        return True
    if node.op_type in NONLINEAR_LOWERINGS and id(node) not in silu_gates:
        NONLINEAR_LOWERINGS[node.op_type](graph, node)
        return True
    return False


class LowerNonlinearitiesPass(ir.passes.InPlacePass):
    """Lower only the nonlinear islands of a static QDQ graph (softmax groups, LayerNorm and RMSNorm, GELU,
    sigmoid and SiLU) to their integer ops; every other op stays as it is, in float.

    The result is the recipe's float simulation with the integer code's nonlinearities: it runs on the
    reference interpreter (:func:`qcompiler.dialect.run_reference`), and the integer-only code agrees with it
    op by op within one quantization step (the linear algebra's float rounding against the dyadic one).
    """

    preserves_outputs = False  # each nonlinearity moves within its documented bound (docs/dialect.md)

    def __init__(self, tables: bool = False) -> None:
        super().__init__()
        self.tables = tables  # as the lowering's: SiLU, Sigmoid and Gelu as lookup tables

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ShapeInferencePass()(model)
        sigmoids = silu_sigmoids(graph)
        modified = False
        for node in list(graph):
            modified |= lower_nonlinearity(graph, node, sigmoids, self.tables)
        if modified:
            model.opset_imports.setdefault(DOMAIN, OPSET_VERSION)
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)
