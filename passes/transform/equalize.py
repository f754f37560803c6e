"""Cross-layer equalization (Nagel et al., data-free quantization; REFERENCES.md section 1).

For ``y = L2(relu(L1(x)))`` and any positive per-channel ``s``: ``relu(z / s) = relu(z) / s``, so dividing output
channel i of L1 (weight row and bias) by ``s_i`` and multiplying input channel i of L2 by ``s_i`` computes the
same function. ``s_i = sqrt(r1_i / r2_i)`` with ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|`` makes the two
ranges equal, ``sqrt(r1_i r2_i)``, so per-tensor (or per-channel) weight quantization of both layers loses less.

Pairs come from the graph alone: a linear or convolution with constant weights whose output only a ReLU (or
LeakyReLU: both positive-homogeneous) reads, whose output only one linear or convolution reads. Chains
(L1 -> relu -> L2 -> relu -> L3) are swept ``iterations`` times. Channels with a zero range are left alone.
The pass marks the model's metadata and does nothing a second time (a second sweep would move the chain
further towards its fixed point, a different but equally exact model), so it is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import const_array, consumers, is_graph_output, node_label
from qcompiler.ir.ops import POSITIVE_HOMOGENEOUS
from qcompiler.ir.regions import as_linear
from qcompiler.passes.transform.weights import set_input_constant

logger = logging.getLogger(__name__)

#: positive-homogeneous activations: f(x / s) = f(x) / s for s > 0
HOMOGENEOUS = POSITIVE_HOMOGENEOUS


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A layer's weight seen as ``[out, in, ...]`` (``transpose``: stored ``[in, out]``), with its bias input."""

    node: ir.Node
    transpose: bool
    bias_index: int | None
    depthwise: bool = False

    def weight(self) -> np.ndarray:
        w = const_array(self.node.inputs[1])
        assert w is not None
        w = w.astype(np.float64)
        return w.T if self.transpose else w

    def store(self, graph: ir.Graph, out_in: np.ndarray) -> None:
        original = const_array(self.node.inputs[1])
        assert original is not None
        stored = out_in.T if self.transpose else out_in
        set_input_constant(graph, self.node, 1, stored.astype(original.dtype))

    def output_ranges(self) -> np.ndarray:
        w = self.weight()
        return np.abs(w).reshape(w.shape[0], -1).max(axis=1)

    def input_ranges(self) -> np.ndarray:
        w = self.weight()
        if self.depthwise:  # input channel i feeds output channel i only
            return np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        return np.abs(np.moveaxis(w, 1, 0)).reshape(w.shape[1], -1).max(axis=1)


def _layer(node: ir.Node) -> _Layer | None:
    if node.op_type == "Conv":
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim < 3 or const_array(node.inputs[0]) is not None:
            return None
        group = node.attributes.get_int("group", 1)
        bias = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if bias is not None and const_array(node.inputs[2]) is None:
            return None
        return _Layer(node, False, bias, depthwise=group > 1 and group == w.shape[0] and w.shape[1] == 1)
    linear = as_linear(node)
    if linear is None:
        return None
    return _Layer(node, linear.in_axis == 0, linear.bias_index)


def equalization_pairs(graph: ir.Graph) -> list[tuple[_Layer, ir.Node, _Layer]]:
    """``(L1, activation, L2)`` for every equalizable pair, in graph order."""
    pairs = []
    for node in graph:
        first = _layer(node)
        if first is None or (first.node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1
                             and not first.depthwise):  # fmt: skip
            continue
        out = node.outputs[0]
        readers = consumers(out)
        if len(readers) != 1 or readers[0].op_type not in HOMOGENEOUS or is_graph_output(graph, out):
            continue
        activation = readers[0]
        after = consumers(activation.outputs[0])
        if (
            len(after) != 1
            or is_graph_output(graph, activation.outputs[0])
            or after[0].inputs[0] is not activation.outputs[0]
        ):
            continue
        second = _layer(after[0])
        if second is None or (second.node.op_type == "Conv") != (first.node.op_type == "Conv"):
            continue
        if second.node.op_type == "Conv" and second.node.attributes.get_int("group", 1) > 1 and not second.depthwise:
            continue
        if first.output_ranges().shape != second.input_ranges().shape:
            continue
        pairs.append((first, activation, second))
    return pairs


class EqualizeCrossLayerPass(ir.passes.InPlacePass):
    """Equalize the weight ranges of every linear/conv -> ReLU -> linear/conv pair.

    Args:
        iterations: sweeps over the pairs (chains converge towards equal ranges everywhere).
    """

    marker = "qcompiler.equalize_cross_layer"

    def __init__(self, iterations: int = 4) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations: must be >= 1, got {iterations}")
        self.iterations = iterations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.marker in model.metadata_props:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        modified = False
        for _ in range(self.iterations):
            for first, _activation, second in equalization_pairs(graph):
                r1, r2 = first.output_ranges(), second.input_ranges()
                s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
                if np.all(s == 1.0):
                    continue
                w1 = first.weight() / s.reshape((-1,) + (1,) * (first.weight().ndim - 1))
                first.store(graph, w1)
                if first.bias_index is not None:
                    bias = const_array(first.node.inputs[first.bias_index])
                    assert bias is not None
                    if bias.size == s.size:
                        scaled = (bias.astype(np.float64).reshape(-1) / s).reshape(bias.shape)
                    else:  # a broadcast scalar bias: expand it so each channel can differ
                        scaled = np.broadcast_to(bias.astype(np.float64).reshape(-1), s.shape) / s
                    set_input_constant(graph, first.node, first.bias_index, scaled.astype(bias.dtype))
                w2 = second.weight()
                if second.depthwise:
                    w2 = w2 * s.reshape((-1,) + (1,) * (w2.ndim - 1))
                else:
                    w2 = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
                second.store(graph, w2)
                modified = True
                logger.debug("equalized %s -> %s", node_label(first.node), node_label(second.node))
        if modified:
            model.metadata_props[self.marker] = str(self.iterations)
        return ir.passes.PassResult(model, modified=modified)
