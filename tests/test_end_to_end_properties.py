"""Acceptance 3: on generated MLPs and CNNs, the integer graph is within one quantization step of the QDQ
graph (reference interpreter), every op of it within one step of the QDQ graph's value when fed the QDQ graph's
inputs (op by op, issue 4's acceptance 4), and the TVM build equals the reference interpreter bit for bit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.testing import (
    GeneratedModel,
    assert_bit_exact,
    assert_lowering_matches,
    assert_within_quantization_step,
    models,
)

CALIBRATION_BATCHES = 4


def _check(generated: GeneratedModel) -> None:
    calibration = generated.inputs(CALIBRATION_BATCHES)
    qdq, integer, _, shapes = quantize_to_integer(generated.model, calibration=calibration, progress=False)
    probe = generated.inputs(2, offset=1)  # unseen data: includes values outside the calibrated ranges
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


@settings(max_examples=20)
@given(models())
def test_generated_models_quick(generated: GeneratedModel) -> None:
    _check(generated)


@pytest.mark.slow
@settings(max_examples=200)
@given(models())
def test_generated_models_200(generated: GeneratedModel) -> None:
    _check(generated)
