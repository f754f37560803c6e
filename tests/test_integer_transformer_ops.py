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
from qcompiler.testing import GeneratedModel, assert_bit_exact, token_mlp_models

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
