"""Float simulation of weight-and-activation quantization (W4A8, W4A4, ...), for comparing recipes by accuracy.

The integer path (:mod:`qcompiler.passes.quantize.qdq`) quantizes activations statically per tensor; the
low-bit recipes of the literature (QuaRot, SpinQuant) quantize them dynamically per token, which no
integer-only graph can express without a run-time max. This pass keeps the graph float and runnable by any
ONNX runtime:

- every linear layer with a constant weight (MatMul, Gemm) gets its weight replaced by the dequantized
  result of RTN or GPTQ (:mod:`qcompiler.passes.quantize.weights`: bits, group size, symmetry, clipping);
- its activation input is fake-quantized per token: ``s = clip_ratio * max|x| / qmax`` over the last axis,
  ``x -> clamp(round(x / s), -qmax, qmax) s`` (symmetric), as a small subgraph of standard ops.

With ``weight_format`` / ``activation_format`` (:mod:`qcompiler.passes.quantize.formats`: FP8, MX and NV block
formats, integers) the weights are rounded to that format along their input axis and the activations along
their last axis, with the format's own scales (per token, or per block of 32 or 16); ``export_weights`` stores
the weights in the format's ONNX element type behind a ``DequantizeLinear`` (the QDQ export: FP8 and INT8 run
on onnxruntime, FLOAT4E2M1 on ``onnx.reference``), else as the float values they dequantize to.

Online Hadamard MatMuls (``c (S (x) h)``: exact in the integer path) are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompiler.errors import CalibrationError
from qcompiler.ir.graph import add_initializer, node_label
from qcompiler.ir.regions import Linear, as_linear
from qcompiler.passes.quantize.formats import export_weight, fake_quantize_graph, number_format, quantize
from qcompiler.passes.quantize.precision import hadamard_matmul
from qcompiler.passes.quantize.weights import WeightQuantSpec, gptq, quantize_rtn
from qcompiler.passes.transform.weights import set_input_constant

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FakeQuantConfig:
    """Weights (``weight``) and per-token activations (``activation_bits``; None keeps them float)."""

    weight: WeightQuantSpec = dataclasses.field(default_factory=lambda: WeightQuantSpec(4, group_size=128))
    weight_quantizer: str = "rtn"
    activation_bits: int | None = 8
    activation_clip: float = 1.0
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    #: a number format of :data:`~qcompiler.passes.quantize.formats.FORMATS` for the weights (replaces ``weight``:
    #: round to nearest in that format) and for the activations (replaces ``activation_bits``)
    weight_format: str | None = None
    activation_format: str | None = None
    #: with ``weight_format``: weights stored in the format's ONNX type behind a DequantizeLinear
    export_weights: bool = False

    def __post_init__(self) -> None:
        for key in ("weight_format", "activation_format"):
            name = getattr(self, key)
            if name is not None:
                try:
                    number_format(name)
                except ValueError as error:
                    raise ValueError(f"{key}: {error}") from None
        if self.weight_format is not None and self.weight_quantizer != "rtn":
            raise ValueError(f"weight_format {self.weight_format!r}: rounds to nearest; weight_quantizer must be "
                             f"'rtn', got {self.weight_quantizer!r}")  # fmt: skip
        if self.export_weights and self.weight_format is None:
            raise ValueError("export_weights: needs a weight_format (the ONNX element type the weights are stored in)")
        if self.weight_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"weight_quantizer: must be 'rtn' or 'gptq', got {self.weight_quantizer!r}")
        if self.activation_bits is not None and not 2 <= self.activation_bits <= 16:
            raise ValueError(f"activation_bits: must lie in [2, 16] or be None, got {self.activation_bits}")
        if not 0.0 < self.activation_clip <= 1.0:
            raise ValueError(f"activation_clip: must lie in (0, 1], got {self.activation_clip}")


class FakeQuantizePass(ir.passes.InPlacePass):
    """Replace weights by their quantized values and fake-quantize linear inputs per token (float graph).

    Args:
        config: bits and quantizers.
        hessians: activation name -> ``2 X^T X / N`` (:func:`qcompiler.calibrate.observe` with
            ``hessians=True`` on this same graph), required by ``weight_quantizer = "gptq"`` and by the weight
            spec's ``clip_objective = "output"``.
    """

    preserves_outputs = False

    def __init__(self, config: FakeQuantConfig | None = None, hessians: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        self.config = config or FakeQuantConfig()
        self.hessians = dict(hessians or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears: list[Linear] = []
        for node in graph:
            linear = as_linear(node)
            if linear is not None and hadamard_matmul(node) is None:
                linears.append(linear)
        if self.config.weight_quantizer == "gptq" or self.config.weight.clip_objective == "output":
            missing = [lin.label for lin in linears if lin.node.inputs[0].name not in self.hessians]
            if missing:
                raise CalibrationError(
                    f"weight_quantizer {self.config.weight_quantizer!r} (clip_objective "
                    f"{self.config.weight.clip_objective!r}): no input Hessian for {missing[:3]}; calibrate this "
                    "graph with observe(..., hessians=True)"
                )
        quantized_inputs: dict[int, ir.Value] = {}
        activation_format = self.config.activation_format
        for linear in linears:
            width = linear.in_features  # before the weight may become a DequantizeLinear's output
            self._quantize_weight(graph, linear)
            bits = self.config.activation_bits
            source = linear.node.inputs[0]
            if (bits is None and activation_format is None) or source is None:
                continue
            if id(source) not in quantized_inputs:
                if activation_format is not None:
                    fmt = number_format(activation_format)
                    clip = self.config.activation_clip
                    quantized_inputs[id(source)] = fake_quantize_graph(
                        graph, source, fmt, linear.node, clip, width=width
                    )
                else:
                    assert bits is not None
                    quantized_inputs[id(source)] = self._fake_quantize_tokens(graph, source, linear.node, bits)
            linear.node.replace_input_with(0, quantized_inputs[id(source)])
        return ir.passes.PassResult(model, modified=bool(linears))

    def _quantize_weight(self, graph: ir.Graph, linear: Linear) -> None:
        weight = linear.weight.astype(np.float64)
        in_out = weight if linear.in_axis == 0 else weight.T
        if self.config.weight_format is not None:
            self._format_weight(graph, linear, in_out)
            return
        spec = self.config.weight
        if self.config.weight_quantizer == "gptq":
            name = linear.node.inputs[0].name
            result = gptq(
                in_out, self.hessians[name], spec, damp=self.config.gptq_damp, act_order=self.config.gptq_act_order
            )
        else:
            result = quantize_rtn(in_out, spec, self.hessians.get(linear.node.inputs[0].name or ""))
        restored = result.dequantize()
        stored = restored if linear.in_axis == 0 else restored.T
        set_input_constant(graph, linear.node, linear.weight_index, stored.astype(linear.weight.dtype))
        logger.debug("fake-quantized weight of %s", node_label(linear.node))

    def _format_weight(self, graph: ir.Graph, linear: Linear, in_out: np.ndarray) -> None:
        """The weight in ``weight_format`` along its input axis: its float values, or the QDQ export."""
        assert self.config.weight_format is not None
        fmt = number_format(self.config.weight_format)
        try:
            restored = quantize(in_out, fmt, axis=0)
        except ValueError as error:
            raise ValueError(f"{linear.label}: {error}") from None
        if not self.config.export_weights:
            stored = restored if linear.in_axis == 0 else restored.T
            set_input_constant(graph, linear.node, linear.weight_index, stored.astype(linear.weight.dtype))
            return
        name = linear.node.inputs[linear.weight_index].name or "weight"
        value = export_weight(graph, in_out, fmt, name, before=linear.node)
        if linear.in_axis != 0:  # the layer reads [out, in]
            transpose = ir.node("Transpose", [value], attributes={"perm": [1, 0]})
            transpose.outputs[0].dtype, transpose.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(in_out.shape[::-1])
            graph.insert_before(linear.node, transpose)
            value = transpose.outputs[0]
        linear.node.replace_input_with(linear.weight_index, value)

    def _fake_quantize_tokens(self, graph: ir.Graph, x: ir.Value, before: ir.Node, bits: int) -> ir.Value:
        """``clamp(round(x / s), -q, q) s`` with ``s = clip max|x| / q`` per row of the last axis."""
        qmax = float(2 ** (bits - 1) - 1)
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        base = x.name or "x"

        def const(tag: str, value: float | list[int]) -> ir.Value:
            array = np.array(value, dtype=np.int64 if isinstance(value, list) else dtype)
            return add_initializer(graph, f"{base}_fq_{tag}", array)

        nodes = [ir.node("Abs", [x])]
        nodes.append(ir.node("ReduceMax", [nodes[-1].outputs[0], const("axes", [-1])], attributes={"keepdims": 1}))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], const("ratio", self.config.activation_clip / qmax)]))
        nodes.append(ir.node("Max", [nodes[-1].outputs[0], const("eps", 1e-12)]))
        scale = nodes[-1].outputs[0]
        nodes.append(ir.node("Div", [x, scale]))
        nodes.append(ir.node("Round", [nodes[-1].outputs[0]]))
        nodes.append(ir.node("Clip", [nodes[-1].outputs[0], const("lo", -qmax), const("hi", qmax)]))
        nodes.append(ir.node("Mul", [nodes[-1].outputs[0], scale]))
        for node in nodes:
            if x.dtype is not None:
                node.outputs[0].dtype = x.dtype
        out = nodes[-1].outputs[0]
        out.name = f"{base}_fq"
        out.shape = x.shape
        graph.insert_before(before, nodes)
        return out
