"""The ``qcompiler`` ONNX operator domain: schemas, numpy reference semantics, dyadic helpers.

Importing this package registers the ONNX schemas (so ``onnx.checker`` accepts our nodes) and exposes
:data:`REFERENCE_OPS`, the ``new_ops`` list for ``onnx.reference.ReferenceEvaluator``.
"""

from __future__ import annotations

from qcompiler.dialect.dyadic import (
    quantize_multiplier,
    quantize_multiplier_pair,
    quantize_multipliers,
    round_shift,
    storage_dtype,
)
from qcompiler.dialect.reference import REFERENCE_OPS, requantize, run_reference
from qcompiler.dialect.schemas import DOMAIN, OPSET_VERSION, register_schemas

register_schemas()

__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "REFERENCE_OPS",
    "quantize_multiplier",
    "quantize_multiplier_pair",
    "quantize_multipliers",
    "requantize",
    "round_shift",
    "run_reference",
    "storage_dtype",
]
