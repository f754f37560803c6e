"""Softmax groups as exporters write them (torch's scaled_dot_product_attention with a boolean mask):

    mask_add = Where(keep, 0.0, -inf);  p = Softmax(Add(scores, mask_add));  out = Where(IsNaN(p), 0.0, p)

The additive mask may also be a constant of 0 and -inf (a causal mask folded at export). The quantizer keeps
the whole group in float between the int8 scores and the group's output (quantized at the softmax scale 2^-7);
the lowering turns it into one ``IntSoftmax(scores, keep)``, whose empty rows are all 0: exactly what the NaN
guard produces.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import const_array, consumers

DROP_THRESHOLD = -1e4  # an additive value at or below this drops the entry (exporters use -inf or finfo.min)


def additive_mask_condition(value: ir.Value | None) -> ir.Value | None:
    """``keep`` when ``value = Where(keep, 0, -inf)`` (boolean ``keep``), else None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Where" or node.inputs[0] is None:
        return None
    keep_value, drop_value = const_array(node.inputs[1]), const_array(node.inputs[2])
    if keep_value is None or drop_value is None or keep_value.size != 1 or drop_value.size != 1:
        return None
    if float(keep_value.reshape(())) != 0.0 or not float(drop_value.reshape(())) <= DROP_THRESHOLD:
        return None
    if node.inputs[0].dtype not in (ir.DataType.BOOL, None):
        return None
    return node.inputs[0]


def constant_mask(value: ir.Value | None) -> np.ndarray | None:
    """``keep = (M == 0)`` when ``value`` is a constant ``M`` of zeros and drops (<= -1e4 or -inf), else None."""
    mask = const_array(value)
    if mask is None or mask.dtype.kind != "f":
        return None
    zero, drop = mask == 0.0, mask <= DROP_THRESHOLD
    if not np.all(zero | drop) or np.all(zero):
        return None
    return zero


@dataclasses.dataclass
class SoftmaxGroup:
    softmax: ir.Node
    scores: ir.Value  # the float scores entering the group (before the mask)
    keep: ir.Value | None  # boolean mask at run time, or None
    keep_constant: np.ndarray | None  # boolean mask from constant masks (ANDed with ``keep`` when both), or None
    members: list[ir.Node]  # the group's nodes other than the Softmax (mask Add, IsNaN, guard Where)
    output: ir.Value  # the group's float output
    keep_inverted: bool = False  # ``keep`` marks the dropped entries (masked_fill's mask): the lowering negates it

    @property
    def ids(self) -> set[int]:
        return {id(n) for n in self.members}


def _nan_guard(softmax: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    probabilities = softmax.outputs[0]
    readers = consumers(probabilities)
    if len(readers) != 2 or {r.op_type for r in readers} != {"IsNaN", "Where"}:
        return None
    is_nan = next(r for r in readers if r.op_type == "IsNaN")
    guard = next(r for r in readers if r.op_type == "Where")
    zero = const_array(guard.inputs[1])
    if guard.inputs[0] is not is_nan.outputs[0] or guard.inputs[2] is not probabilities:
        return None
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
        return None
    return is_nan, guard


def _select_mask(node: ir.Node) -> tuple[int, ir.Value, np.ndarray | None, bool] | None:
    """``Where(keep, s, drop)`` or ``Where(mask, drop, s)`` (masked_fill) with a constant ``drop <= -1e4``: the
    index of ``s``, the boolean condition, its constant value (or None) and whether it marks the dropped entries."""
    if node.op_type != "Where" or len(node.inputs) != 3 or node.inputs[0] is None:
        return None
    condition = node.inputs[0]
    if condition.dtype not in (ir.DataType.BOOL, None):
        return None
    for scores_index, drop_index, inverted in ((1, 2, False), (2, 1, True)):
        drop = const_array(node.inputs[drop_index])
        if drop is not None and drop.size >= 1 and bool(np.all(drop <= DROP_THRESHOLD)):
            if const_array(node.inputs[scores_index]) is not None:
                return None
            constant = const_array(condition)
            return scores_index, condition, None if constant is None else constant.astype(bool), inverted
    return None


def _additive_mask(node: ir.Node) -> tuple[int, ir.Value | None, np.ndarray | None] | None:
    """``Add(s, mask)`` with an additive mask (``Where(keep, 0, -inf)`` or a constant of zeros and drops): the
    index of ``s``, the boolean ``keep`` at run time or the constant one."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index in (0, 1):
        condition = additive_mask_condition(node.inputs[index])
        constant = constant_mask(node.inputs[index])
        if condition is not None or constant is not None:
            return 1 - index, condition, constant
    return None


def softmax_group(softmax: ir.Node) -> SoftmaxGroup:
    """The group around a Softmax node (a plain Softmax is a group of one). Masks before it are peeled one after
    another (a causal ``Where`` then an additive padding mask, as GPT-Neo writes them): constant ones combine into
    one constant keep, and at most one run-time mask joins the group."""
    scores = softmax.inputs[0]
    assert scores is not None
    members: list[ir.Node] = []
    keep: ir.Value | None = None
    keep_constant: np.ndarray | None = None
    keep_inverted = False
    while (producer := scores.producer()) is not None and len(consumers(scores)) == 1:
        select = _select_mask(producer)
        if select is not None:
            source_index, condition, constant, inverted = select
        elif (added := _additive_mask(producer)) is not None:
            source_index, condition, constant = added
            inverted = False
        else:
            break
        if constant is not None:
            constant = ~constant if inverted else constant
            keep_constant = constant if keep_constant is None else np.logical_and(keep_constant, constant)
        elif keep is None and condition is not None:
            keep, keep_inverted = condition, inverted
        else:
            break  # a second run-time mask: the group ends before it
        members.append(producer)
        source = producer.inputs[source_index]
        assert source is not None
        scores = source
    output = softmax.outputs[0]
    guard = _nan_guard(softmax)
    if guard is not None:
        members.extend(guard)
        output = guard[1].outputs[0]
    return SoftmaxGroup(softmax, scores, keep, keep_constant, members, output, keep_inverted)


def softmax_groups(graph: ir.Graph) -> list[SoftmaxGroup]:
    return [softmax_group(node) for node in graph if node.op_type == "Softmax"]


def is_mask_where(node: ir.Node) -> bool:
    """A ``Where(keep, 0, -inf)`` whose readers are all masked-softmax Adds."""
    if node.op_type != "Where" or additive_mask_condition(node.outputs[0]) is None:
        return False
    return all(r.op_type == "Add" for r in consumers(node.outputs[0]))


__all__ = [
    "SoftmaxGroup",
    "additive_mask_condition",
    "constant_mask",
    "is_mask_where",
    "softmax_group",
    "softmax_groups",
]
