"""Public test helpers: hypothesis strategies for valid graphs and equivalence assertions."""

from __future__ import annotations

from qcompiler.testing.assertions import (
    EDGE_KERNELS,
    assert_bit_exact,
    assert_equivalent,
    assert_float_exact_pass,
    assert_within_quantization_step,
    float_functions,
    output_steps,
    ptx_float_kernels,
    ptx_kernels,
)
from qcompiler.testing.lowering import OpAgreement, assert_lowering_matches, compare_lowering
from qcompiler.testing.strategies import (
    GeneratedModel,
    attention_models,
    cnn_models,
    mlp_models,
    models,
    modern_cnn_models,
    token_mlp_models,
    transformer_models,
)

__all__ = [
    "EDGE_KERNELS",
    "GeneratedModel",
    "OpAgreement",
    "assert_bit_exact",
    "assert_equivalent",
    "assert_float_exact_pass",
    "assert_lowering_matches",
    "assert_within_quantization_step",
    "attention_models",
    "cnn_models",
    "compare_lowering",
    "float_functions",
    "mlp_models",
    "models",
    "modern_cnn_models",
    "output_steps",
    "ptx_float_kernels",
    "ptx_kernels",
    "token_mlp_models",
    "transformer_models",
]
