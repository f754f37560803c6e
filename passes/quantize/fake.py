"""Float simulation of weight-and-activation quantization (W4A8, W4A4, ...), for comparing recipes by accuracy.

The integer path (:mod:`qcompiler.passes.quantize.qdq`) quantizes activations statically per tensor; the
low-bit recipes of the literature (QuaRot, SpinQuant) quantize them dynamically per token, which no
integer-only graph can express without a run-time max. This pass keeps the graph float and runnable by any
ONNX runtime:

- every linear layer with a constant weight (MatMul, Gemm) gets its weight replaced by the dequantized
  result of RTN or GPTQ (:mod:`qcompiler.passes.quantize.weights`: bits, group size, symmetry, clipping);
- its activation input is fake-quantized per token: ``s = clip_ratio * max|x| / qmax`` over the last axis,
  ``x -> clamp(round(x / s), -qmax, qmax) s`` (symmetric), as a small subgraph of standard ops.

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

    def __post_init__(self) -> None:
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
        for linear in linears:
            self._quantize_weight(graph, linear)
            bits = self.config.activation_bits
            source = linear.node.inputs[0]
            if bits is None or source is None:
                continue
            if id(source) not in quantized_inputs:
                quantized_inputs[id(source)] = self._fake_quantize_tokens(graph, source, linear.node, bits)
            linear.node.replace_input_with(0, quantized_inputs[id(source)])
        return ir.passes.PassResult(model, modified=bool(linears))

    def _quantize_weight(self, graph: ir.Graph, linear: Linear) -> None:
        weight = linear.weight.astype(np.float64)
        in_out = weight if linear.in_axis == 0 else weight.T
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
