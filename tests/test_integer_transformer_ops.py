"""The integer nonlinearities inside whole graphs: generated token-MLP blocks (LayerNorm, GELU or Sigmoid,
residual, Softmax) compile to integer-only code that is bit-exact against the reference interpreter and
within a few output steps of the QDQ graph (the gap is the nonlinearities' documented bounds, compounded;
the gap between QDQ and float is quantization itself and depends on the calibration data); and op by op, each
integer op within one step of the simulation with the integer nonlinearities (issue 4's acceptance 4)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings

from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.dialect import run_reference
from qcompiler.passes.lower import LowerNonlinearitiesPass, float_ops_inside
from qcompiler.testing import (
    GeneratedModel,
    assert_bit_exact,
    assert_lowering_matches,
    attention_models,
    output_steps,
    token_mlp_models,
)

STEPS_FROM_QDQ = 5  # softmax output steps (2^-7): measured worst 2 over 40 generated blocks


def _assert_op_by_op(qdq: ir.Model, integer: ir.Model, probe) -> None:
    simulation = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
    LowerNonlinearitiesPass()(simulation)
    assert_lowering_matches(simulation, integer, probe)


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
    _assert_op_by_op(qdq, integer, probe)


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


def _int8_step(integer: ir.Model) -> float:
    """The output step of an int8 output of the same range: the error comes from the int8 tensors inside, so
    a wide (int16) output is judged in the steps an int8 one would have."""
    step = output_steps(integer)[0]
    output_dq = integer.graph.outputs[0].producer()
    assert output_dq is not None
    wide = output_dq.inputs[0].dtype == ir.DataType.INT16
    return step * 32767 / 127 if wide else step


def _check_attention(generated: GeneratedModel) -> None:
    qdq, integer, _, shapes = quantize_to_integer(generated.model, calibration=generated.inputs(8), progress=False)
    assert float_ops_inside(integer) == []
    ops = [n.op_type for n in integer.graph]
    assert ops.count("MatMulInteger") == 2 and "IntSoftmax" in ops and "IntLayerNorm" in ops
    probe = generated.inputs(2, offset=1)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    step = _int8_step(integer)
    qdq_proto, proto = ir.serde.serialize_model(qdq), ir.serde.serialize_model(integer)
    for feeds in probe:
        want = run_reference(qdq_proto, feeds)[0]
        got = run_reference(proto, feeds)[0]
        allowed = (ATTENTION_BASE_STEPS + generated.input_shape[0] / 2) * step * (1 + 1e-5)
        assert np.max(np.abs(got - want)) <= allowed, generated.description
    _assert_op_by_op(qdq, integer, probe)


@settings(max_examples=10)
@given(attention_models())
def test_attention_blocks_quick(generated: GeneratedModel) -> None:
    _check_attention(generated)


@pytest.mark.slow
@settings(max_examples=100)
@given(attention_models())
def test_attention_blocks_100(generated: GeneratedModel) -> None:
    _check_attention(generated)


def test_embeddings_are_int8_lookups() -> None:
    """Word + position embeddings (Gather from constant tables), summed and normalised: int8 tables, int8
    lookups, a rescaled add, integer LayerNorm; bit-exact in TVM."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vocab, positions, width, tokens = 50, 16, 24, 6
    inits = {
        "words": rng.standard_normal((vocab, width)).astype(np.float32),
        "pos_table": (rng.standard_normal((positions, width)) * 0.3).astype(np.float32),
        "pos_ids": np.arange(tokens, dtype=np.int64)[None, :],
        "g": rng.uniform(0.5, 1.5, width).astype(np.float32),
        "b": (rng.standard_normal(width) * 0.1).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["words", "ids"], ["w"]),
            helper.make_node("Gather", ["pos_table", "pos_ids"], ["p"]),
            helper.make_node("Add", ["w", "p"], ["e"]),
            helper.make_node("LayerNormalization", ["e", "g", "b"], ["y"], axis=-1),
        ],
        "embeddings",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, tokens])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, tokens, width])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    batches = [{"ids": rng.integers(0, vocab, (2, tokens))} for _ in range(8)]
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=batches, progress=False)
    assert float_ops_inside(integer) == []
    ops = [n.op_type for n in integer.graph]
    # the position lookup has constant indices: folded to a constant addend, quantized int8 like the table
    assert ops.count("Gather") == 1 and "RescaleAdd" in ops and "IntLayerNorm" in ops
    gather = next(n for n in integer.graph if n.op_type == "Gather")
    add = next(n for n in integer.graph if n.op_type == "RescaleAdd")
    for constant in (gather.inputs[0].const_value, add.inputs[1].const_value):
        assert constant is not None and constant.dtype.name == "INT8"
    assert_bit_exact(lambda proto: build(proto, shapes), integer, batches[:2])
    step = output_steps(integer)[0]
    for feeds in batches[:2]:
        want = run_reference(ir.serde.serialize_model(qdq), feeds)[0]
        got = run_reference(ir.serde.serialize_model(integer), feeds)[0]
        assert np.max(np.abs(got - want)) <= 2 * step  # LayerNorm bound: 1 step + 2^-9 of the value
