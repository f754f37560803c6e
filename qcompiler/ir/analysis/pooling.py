"""The windows of a 2-D AveragePool: kernel, strides, explicit pads and how many input values each output averages.

The quantizer checks a pool with :func:`average_pool_window` before it writes anything (an unsupported attribute
is a named refusal, or a float island), and the integer lowering builds its window sum and its per-position
divisors from the same answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.graph import node_label


@dataclasses.dataclass(frozen=True)
class PoolWindow:
    """A 2-D pool's windows over an input ``[N, C, H, W]`` with static ``C``, ``H`` and ``W``."""

    channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    #: ONNX order: height begin, width begin, height end, width end
    pads: tuple[int, int, int, int]
    #: ``[H_out, W_out]``: the number of values each output divides its window sum by (int64)
    counts: np.ndarray


def _pads(node: ir.Node, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int]) -> list[int]:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad == "NOTSET":
        return [int(p) for p in node.attributes.get_ints("pads", [0, 0, 0, 0])]
    begin, end = [], []
    for axis in range(2):
        out = -(-size[axis] // strides[axis])
        total = max(0, (out - 1) * strides[axis] + kernel[axis] - size[axis])
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _inside(size: int, kernel: int, stride: int, begin: int, out: int) -> np.ndarray:
    """Per output position along one axis, how many of its window's ``kernel`` taps fall inside the input."""
    starts = np.arange(out, dtype=np.int64) * stride - begin
    return np.maximum(np.minimum(starts + kernel, size) - np.maximum(starts, 0), 0)


def average_pool_window(node: ir.Node) -> PoolWindow:
    """The windows of ``node`` (an AveragePool), or a named refusal of what the integer path does not support.

    ``count_include_pad=1`` divides every window by ``kh * kw``; ``0`` by the taps inside the input, which differ at
    the borders.

    Raises:
        UnsupportedOpError: not a 2-D pool over a static ``[N, C, H, W]``, ``ceil_mode=1``, dilations, or a window
            wholly inside the padding.
    """
    label, op = node_label(node), node.op_type
    x = node.inputs[0]
    shape = x.shape if x is not None else None
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise UnsupportedOpError(label, op, "the integer pool needs a 4-D input [N, C, H, W] with static C, H and "
                                 "W (1-D and 3-D pools are not supported; export with fixed image sizes)")  # fmt: skip
    if node.attributes.get_int("ceil_mode", 0):
        raise UnsupportedOpError(label, op, "ceil_mode=1 is not supported: export with ceil_mode=False (pad the "
                                 "input so the last window fits)")  # fmt: skip
    if any(d != 1 for d in node.attributes.get_ints("dilations", [1, 1])):
        raise UnsupportedOpError(label, op, "dilated pooling windows are not supported")
    kernel_shape = node.attributes.get_ints("kernel_shape", None)
    if kernel_shape is None or len(kernel_shape) != 2:
        raise UnsupportedOpError(label, op, "needs a 2-D kernel_shape")
    kernel = (int(kernel_shape[0]), int(kernel_shape[1]))
    strides_attr = node.attributes.get_ints("strides", [1, 1])
    strides = (int(strides_attr[0]), int(strides_attr[1]))
    size = (int(shape[2]), int(shape[3]))
    pads = _pads(node, size, kernel, strides)
    out = [(size[a] + pads[a] + pads[a + 2] - kernel[a]) // strides[a] + 1 for a in range(2)]
    if min(out) < 1:
        raise UnsupportedOpError(label, op, f"its window {kernel} does not fit the padded input {size}")
    if node.attributes.get_int("count_include_pad", 0):
        counts = np.full(out, kernel[0] * kernel[1], np.int64)
    else:
        rows, cols = (_inside(size[a], kernel[a], strides[a], pads[a], out[a]) for a in range(2))
        counts = np.outer(rows, cols)
        if counts.min() < 1:
            raise UnsupportedOpError(label, op, "a window lies wholly in the padding (its average is undefined)")
    return PoolWindow(int(shape[1]), kernel, strides, (pads[0], pads[1], pads[2], pads[3]), counts)
