"""Tiny hand-made models for kernel tests: one node of the ``qcompiler`` domain (or a standard op).

(Not ``models.py``: that name would shadow the ``qcompiler.testing.models`` strategy.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.dialect import DOMAIN, OPSET_VERSION


def single_node_model(
    op: str,
    constant_inputs: Sequence[str],
    input_shape: Sequence[int],
    constants: Mapping[str, np.ndarray],
    *,
    input_dtype: int = TensorProto.INT8,
    output_dtype: int = TensorProto.INT8,
    domain: str = DOMAIN,
    **attributes: Any,
) -> onnx.ModelProto:
    """``y = op(x, *constant_inputs)`` with graph input ``x`` of ``input_shape`` and the named ``constants``."""
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *constant_inputs], ["y"], domain=domain, **attributes)],
        op,
        [helper.make_tensor_value_info("x", input_dtype, list(input_shape))],
        [helper.make_tensor_value_info("y", output_dtype, None)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in constants.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


def int4_gemm_model(
    rng: np.random.Generator,
    m: int,
    n: int,
    k: int,
    group: int,
    *,
    multiplier: np.ndarray,
    shift: np.ndarray,
    bias_bound: int = 1000,
    codes: tuple[int, int] = (-7, 7),
    max_scale: int = 256,
    extreme: bool = False,
    output_dtype: int = TensorProto.INT8,
    **attributes: Any,
) -> onnx.ModelProto:
    """One ``QGemmInt4`` on input ``x [m, k]``: random codes in ``codes`` (the weight quantizer writes [-7, 7]),
    packed two per byte (a zero padding nibble for an odd K), group scales in [1, ``max_scale``] per ``group``
    input channels, a bias in ``(-bias_bound, bias_bound)``, the given epilogue. ``extreme``: every code -8 at
    the largest group scale (the largest products)."""
    from qcompiler.dialect.int4 import pack_int4

    values = rng.integers(codes[0], codes[1] + 1, (n, k + k % 2)).astype(np.int8)
    values[:, k:] = 0
    scales = rng.integers(1, max_scale + 1, (n, -(-k // group))).astype(np.int16)
    if extreme:
        values[:, :k] = -8
        scales[:] = max_scale
    constants = {
        "w": pack_int4(values),
        "g": scales,
        "b": rng.integers(-bias_bound + 1, bias_bound, n).astype(np.int32),
        "m": multiplier,
        "s": shift,
    }
    return single_node_model(
        "QGemmInt4", ["w", "g", "b", "m", "s"], (m, k), constants, output_dtype=output_dtype, group_size=group,
        **attributes,
    )  # fmt: skip
