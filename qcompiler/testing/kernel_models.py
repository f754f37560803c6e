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
