"""Exact edits of constant weights, shared by the float-exact transforms.

Every edit computes in float64 and stores in the weight's own dtype, and writes a new initializer for the one
node it edits (a weight shared with another node keeps its old value there; ``remove-unused`` drops the old one
when nothing reads it any more). Conventions: a :class:`~qcompiler.ir.regions.Linear` computes ``y = x W + b``
with W as ``[in, out]`` whatever its storage (``Gemm`` with ``transB`` stores ``W^T``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array
from qcompiler.ir.regions import Linear


def set_input_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    old = node.inputs[index]
    base = (old.name if old is not None and old.name else node.name or node.op_type) + "_t"
    node.replace_input_with(index, add_initializer(graph, base, array))


def as_in_out(linear: Linear) -> np.ndarray:
    """The linear's weight as ``[in, out]`` float64, whatever its storage."""
    weight = linear.weight.astype(np.float64)
    return weight if linear.in_axis == 0 else weight.T


def _store(graph: ir.Graph, linear: Linear, in_out: np.ndarray) -> None:
    dtype = linear.weight.dtype
    stored = in_out if linear.in_axis == 0 else in_out.T
    set_input_constant(graph, linear.node, linear.weight_index, stored.astype(dtype))


def rotate_input(graph: ir.Graph, linear: Linear, rotation: np.ndarray) -> None:
    """The linear now reads ``x R`` and computes what it computed from x: ``W <- R^T W``."""
    _store(graph, linear, rotation.T @ as_in_out(linear))


def rotate_output(graph: ir.Graph, linear: Linear, rotation: np.ndarray) -> None:
    """The linear now writes ``y R``: ``W <- W R``, ``b <- b R``."""
    _store(graph, linear, as_in_out(linear) @ rotation)
    bias = linear.bias
    if bias is not None:
        assert linear.bias_index is not None
        rotated = (bias.astype(np.float64).reshape(-1) @ rotation).reshape(bias.shape)
        set_input_constant(graph, linear.node, linear.bias_index, rotated.astype(bias.dtype))


def scale_input(graph: ir.Graph, linear: Linear, gain: np.ndarray) -> None:
    """The linear now reads x and computes what it computed from ``x * g`` (per input channel):
    ``W <- diag(g) W``."""
    _store(graph, linear, gain.astype(np.float64).reshape(-1, 1) * as_in_out(linear))


def scale_output(graph: ir.Graph, linear: Linear, gain: np.ndarray) -> None:
    """The linear now writes ``y * g`` (per output channel): ``W <- W diag(g)``, ``b <- b g``."""
    _store(graph, linear, as_in_out(linear) * gain.astype(np.float64).reshape(1, -1))
    bias = linear.bias
    if bias is not None:
        assert linear.bias_index is not None
        scaled = (bias.astype(np.float64).reshape(-1) * gain).reshape(bias.shape)
        set_input_constant(graph, linear.node, linear.bias_index, scaled.astype(bias.dtype))


def shift_input(graph: ir.Graph, linear: Linear, shift: np.ndarray) -> None:
    """The linear now reads x and computes from ``x + beta``: ``b <- b + beta W`` (the linear needs a bias)."""
    assert linear.bias_index is not None
    bias = const_array(linear.node.inputs[linear.bias_index])
    assert bias is not None
    new = bias.astype(np.float64).reshape(-1) + shift.astype(np.float64).reshape(-1) @ as_in_out(linear)
    set_input_constant(graph, linear.node, linear.bias_index, new.reshape(bias.shape).astype(bias.dtype))


def blockwise(rotation: np.ndarray, blocks: int) -> np.ndarray:
    """``I_blocks (x) R``: the same rotation on every block of the channel axis."""
    return np.kron(np.eye(blocks), rotation)
