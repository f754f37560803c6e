"""What kind of model a graph is, read from its structure (never from module or node names).

``recipe="auto"`` chooses its quantization settings from this description (:mod:`qcompiler.auto`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.ir.analysis.softmax_groups import softmax_groups
from qcompiler.ir.graph import const_array
from qcompiler.ir.ops import LINEAR_OPS


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Structural facts about a (canonicalized) graph."""

    #: softmax groups over scores of a product of two activations (attention; a classifier's softmax is not one)
    softmax_groups: int
    #: softmax groups whose mask is causal: a constant lower-triangular keep mask over the last two axes
    causal_softmax_groups: int
    #: Conv nodes with ``group == channels`` (depthwise) and with other ``group > 1``
    depthwise_convs: int
    grouped_convs: int
    #: Conv, Gemm and MatMul nodes with a constant weight
    linears: int

    @property
    def kind(self) -> str:
        """``"causal-decoder"``, ``"depthwise-attention"`` (mobile hybrids: depthwise convolutions and attention, as
        MobileViT or PP-OCR's SVTR recognizer), ``"attention"`` (encoders, vision transformers), ``"depthwise-cnn"``
        or ``"other"``."""
        if self.causal_softmax_groups:
            return "causal-decoder"
        if self.softmax_groups and self.depthwise_convs:
            return "depthwise-attention"
        if self.softmax_groups:
            return "attention"
        if self.depthwise_convs:
            return "depthwise-cnn"
        return "other"


def _is_causal(keep: np.ndarray | None) -> bool:
    """A keep mask with nothing kept above the (bottom-right aligned) diagonal of its last two axes."""
    if keep is None or keep.ndim < 2:
        return False
    rows, cols = keep.shape[-2], keep.shape[-1]
    above = np.triu(np.ones((rows, cols), dtype=bool), k=cols - rows + 1)
    return bool(above.any()) and not bool(keep[..., above].any())


#: ops between attention's score product and its softmax (scale, position bias, head reshapes; Paddle2ONNX
#: flattens the heads' scores to 2-D for an opset-11 Softmax)
_SCORE_PATH = frozenset({"Mul", "Div", "Add", "Sub", "Reshape", "Transpose", "Cast", "Identity", "Squeeze",
                         "Unsqueeze", "Flatten"})  # fmt: skip


def _is_attention(scores: ir.Value) -> bool:
    """The scores come from a product of two activations (Q K^T) through scaling, biases and reshapes: attention,
    not a classifier's softmax over logits of a constant-weight layer."""
    value: ir.Value | None = scores
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if node.op_type == "MatMul":
            return all(v is not None and const_array(v) is None for v in node.inputs[:2])
        if node.op_type not in _SCORE_PATH:
            return False
        value = next((v for v in node.inputs if v is not None and const_array(v) is None), None)
    return False


def describe(graph: ir.Graph) -> Architecture:
    """The :class:`Architecture` of ``graph``."""
    groups = [g for g in softmax_groups(graph) if _is_attention(g.scores)]
    depthwise = grouped = linears = 0
    for node in graph:
        if node.op_type in LINEAR_OPS and len(node.inputs) > 1 and const_array(node.inputs[1]) is not None:
            linears += 1
        if node.op_type == "Conv":
            group = node.attributes.get_int("group", 1)
            weight = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if group > 1 and weight is not None and weight.shape[1] == 1:
                depthwise += 1
            elif group > 1:
                grouped += 1
    return Architecture(
        softmax_groups=len(groups),
        causal_softmax_groups=sum(_is_causal(g.keep_constant) for g in groups),
        depthwise_convs=depthwise,
        grouped_convs=grouped,
        linears=linears,
    )
