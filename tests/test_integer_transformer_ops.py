"""The integer nonlinearities inside whole graphs: generated token-MLP blocks (LayerNorm, GELU or Sigmoid,
residual, Softmax) compile to integer-only code that is bit-exact against the reference interpreter and
within a few output steps of the QDQ graph (the gap is the nonlinearities' documented bounds, compounded;
the gap between QDQ and float is quantization itself and depends on the calibration data)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings

from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.dialect import run_reference
from qcompiler.passes.lower import float_ops_inside
from qcompiler.testing import GeneratedModel, assert_bit_exact, attention_models, output_steps, token_mlp_models

STEPS_FROM_QDQ = 5  # softmax output steps (2^-7): measured worst 2 over 40 generated blocks


def _check(generated: GeneratedModel) -> None:
    calibration = generated.inputs(8)
    qdq, integer, _, shapes = quantize_to_integer(generated.model, calibration=calibration, progress=False)
    assert float_ops_inside(integer) == []
    ops = {n.op_type for n in integer.graph}
    assert "IntSoftmax" in ops and "IntLayerNorm" in ops and ops & {"IntGelu", "IntSigmoid"}
    probe = generated.inputs(2, offset=1)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    qdq_proto, proto = ir.serde.serialize_model(qdq), ir.serde.serialize_model(integer)
    for feeds in probe:
        want = run_reference(qdq_proto, feeds)[0]
        got = run_reference(proto, feeds)[0]
        assert np.max(np.abs(got - want)) <= STEPS_FROM_QDQ / 128, generated.description


@settings(max_examples=15)
@given(token_mlp_models())
def test_token_mlp_blocks_quick(generated: GeneratedModel) -> None:
    _check(generated)


@pytest.mark.slow
@settings(max_examples=100)
@given(token_mlp_models())
def test_token_mlp_blocks_100(generated: GeneratedModel) -> None:
    _check(generated)


# --- self-attention: int8 Q K^T and P V, scale by a constant, integer softmax ---------------------------------
# Output steps between the integer and the QDQ graph: rounding (about 3 steps through five rescales) plus the
# softmax bound. Each probability may be off by 2^-8 (+0.4 %), and P V sums T of them, so the context moves by
# up to T 2^-8 max|v|, i.e. about T / 2 of its int8 steps; the output projection carries that through.
ATTENTION_BASE_STEPS = 4


def _check_attention(generated: GeneratedModel) -> None:
    qdq, integer, _, shapes = quantize_to_integer(generated.model, calibration=generated.inputs(8), progress=False)
    assert float_ops_inside(integer) == []
    ops = [n.op_type for n in integer.graph]
    assert ops.count("MatMulInteger") == 2 and "IntSoftmax" in ops and "IntLayerNorm" in ops
    probe = generated.inputs(2, offset=1)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    step = output_steps(integer)[0]
    qdq_proto, proto = ir.serde.serialize_model(qdq), ir.serde.serialize_model(integer)
    for feeds in probe:
        want = run_reference(qdq_proto, feeds)[0]
        got = run_reference(proto, feeds)[0]
        allowed = (ATTENTION_BASE_STEPS + generated.input_shape[0] / 2) * step * (1 + 1e-5)
        assert np.max(np.abs(got - want)) <= allowed, generated.description


@settings(max_examples=10)
@given(attention_models())
def test_attention_blocks_quick(generated: GeneratedModel) -> None:
    _check_attention(generated)


@pytest.mark.slow
@settings(max_examples=100)
@given(attention_models())
def test_attention_blocks_100(generated: GeneratedModel) -> None:
    _check_attention(generated)
