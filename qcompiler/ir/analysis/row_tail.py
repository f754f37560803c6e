"""The row-wise tail of a graph output: the nodes before it that treat each position (row) on its own.

A causal LM's logits come from the hidden state through a tail that reads each position alone: the last
layer's MLP and residual add, the final norm, the LM head, the dequantize. Generation needs the logits of the
last position only, so a prefill chunk can stop at the tail's input and run the tail on one row: the LM head of
SmolLM2 alone is a fifth of a chunk's products, and its ``[chunk, vocab]`` logits the largest tensor of the step.

:func:`row_tail` finds the tail's single input; :func:`split_at` cuts a graph there into the body (which returns
that input instead of the output) and the tail (which reads it as its input).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qcompiler.ir.graph import consumers, is_graph_output

#: (domain, op type) of the ops of an integer graph whose output rows (every axis but the last) each read the same
#: row of their inputs alone: elementwise ops (their other inputs constants, or rows of the same shape), products
#: with constant weights, and functions over the last axis
ROW_WISE: frozenset[tuple[str, str]] = frozenset(
    [("qcompiler", op) for op in ("QGemm", "QGemmInt4", "RowExponent", "Requantize", "RescaleAdd", "IntLayerNorm",
                                  "IntGelu", "IntSigmoid", "Hadamard", "IntDiv", "ISqrt")]
    + [("", op) for op in ("Cast", "Mul", "Add", "Sub", "Neg", "Relu", "Clip", "Tanh", "DequantizeLinear")]
)  # fmt: skip


def _activations(node: ir.Node) -> list[ir.Value]:
    """The node's inputs that are computed (not constants or initializers)."""
    return [v for v in node.inputs if v is not None and v.const_value is None]


def _row_wise(node: ir.Node, rank: int) -> bool:
    """``node`` reads each row alone: a row-wise op whose computed inputs are rows like its output's (not
    broadcast along them), its constants (scales, weights, tables) per channel of the last axis or scalars."""
    if (node.domain, node.op_type) not in ROW_WISE:
        return False
    if any(v.shape is not None and len(v.shape) != rank for v in _activations(node)):
        return False
    if node.op_type == "DequantizeLinear":  # per channel of the last axis, or per tensor
        axis = node.attributes.get_int("axis", 1)
        scale = node.inputs[1]
        return scale is None or scale.shape is None or len(scale.shape) == 0 or axis in (-1, rank - 1)
    return True


def row_tail(graph: ir.Graph, output: ir.Value) -> tuple[ir.Value, list[ir.Node]] | None:
    """The earliest value the graph output ``output`` depends on through row-wise nodes alone, with those nodes
    (graph order): every computed input of the tail is that value or made inside the tail, and nothing outside
    the tail reads what the tail makes. None when ``output``'s own producer is not row-wise."""
    if output.shape is None or len(output.shape) < 2:
        return None
    rank = len(output.shape)
    order = {id(node): index for index, node in enumerate(graph)}
    producer = output.producer()
    if producer is None or not _row_wise(producer, rank):
        return None
    tail = {id(producer): producer}
    pending = {id(v): v for v in _activations(producer)}  # computed inputs from outside the tail
    best: tuple[ir.Value, list[ir.Node]] | None = None
    while pending:
        if len(pending) == 1:
            (value,) = pending.values()
            if value.shape is not None and len(value.shape) == rank and value.shape[:-1] == output.shape[:-1]:
                best = (value, sorted(tail.values(), key=lambda n: order[id(n)]))
        # the latest producer of a pending value joins the tail, if every reader of its outputs is in the tail
        node = max((v.producer() for v in pending.values() if v.producer() is not None),
                   key=lambda n: order[id(n)], default=None)  # fmt: skip
        if node is None or not _row_wise(node, rank):
            break
        if any(is_graph_output(graph, out) or any(id(user) not in tail for user in consumers(out))
               for out in node.outputs):  # fmt: skip
            break
        tail[id(node)] = node
        for out in node.outputs:
            pending.pop(id(out), None)
        pending.update({id(v): v for v in _activations(node)})
    return best


def split_at(model: ir.Model, cut: ir.Value, output_index: int = 0) -> tuple[ir.Model, ir.Model]:
    """``model`` cut at ``cut`` (a value of :func:`row_tail` for output ``output_index``): the body, whose output
    ``output_index`` is ``cut`` instead, and the tail, a graph from ``cut`` (its one input, same name) to that
    output. Both are copies (tensors shared); ``model`` is not changed."""
    body = model.clone()
    body_cut = _value_named(body.graph, cut.name)
    body.graph.outputs[output_index] = body_cut
    RemoveUnusedNodesPass()(body)

    head = model.clone()
    graph = head.graph
    old = _value_named(graph, cut.name)
    new = ir.Value(name=cut.name, shape=old.shape, type=old.type)
    old.replace_all_uses_with(new)
    kept = graph.outputs[output_index]
    graph.outputs.clear()
    graph.outputs.append(kept)
    graph.inputs.clear()
    graph.inputs.append(new)
    RemoveUnusedNodesPass()(head)
    return body, head


def _value_named(graph: ir.Graph, name: str | None) -> ir.Value:
    for value in [*graph.inputs, *(v for node in graph for v in node.outputs)]:
        if value.name == name:
            return value
    raise KeyError(f"no value named {name!r} in the graph")
