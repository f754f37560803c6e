"""Every canonicalize pass on generated graphs with biases, shared biases and shared weights (issue 21): the graph
stays in topological order and verifier-clean, its outputs are unchanged in float64, ``modified`` is honest, a
second run changes nothing, and each pass leaves none of its patterns behind that it could have rewritten."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.ir.graph import const_array
from qcompiler.ir.verifier import verify
from qcompiler.passes.canonicalize import DecomposeBatchNormPass, FoldBatchNormPass, FuseBiasAddPass, FuseRMSNormPass
from qcompiler.pipeline import run_model
from qcompiler.testing import GeneratedModel, assert_float_exact_pass, models, token_mlp_models
from qcompiler.testing.strategies import shared_parameter_models

#: the canonicalize passes in recipe order (qcompiler/recipes/*.toml)
CANONICALIZE = (FuseBiasAddPass, FuseRMSNormPass, FoldBatchNormPass, DecomposeBatchNormPass)

WITH_BIASES = st.one_of(shared_parameter_models(), token_mlp_models(), models())


def _linear_add_left(model: ir.Model) -> list[str]:
    """Adds of a constant to a Conv/Gemm/MatMul output that nothing else reads: FuseBiasAddPass's to take."""
    left = []
    for node in model.graph:
        if node.op_type != "Add" or const_array(node.inputs[1]) is None:
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        fusable = producer is not None and producer.op_type in ("Conv", "Gemm", "MatMul") and len(producer.inputs) == 2
        if fusable and len(node.inputs[0].uses()) == 1:
            left.append(node.outputs[0].name)
    return left


def _foldable_batchnorms_left(model: ir.Model) -> list[str]:
    """BatchNorms after a Conv whose weight and bias no other node reads: FoldBatchNormPass's to take."""
    left = []
    for node in model.graph:
        producer = node.inputs[0].producer() if node.op_type == "BatchNormalization" else None
        if producer is None or producer.op_type != "Conv" or len(node.inputs[0].uses()) != 1:
            continue
        if all(len({id(user) for user, _ in value.uses()}) == 1 for value in producer.inputs[1:] if value is not None):
            left.append(node.outputs[0].name)
    return left


def _assert_float32_pass(make_pass: type[ir.passes.PassBase], model: onnx.ModelProto, feeds: list) -> ir.Model:
    """:func:`assert_float_exact_pass` in float32, for a pass whose output the reference interpreter cannot run in
    float64 (``RMSNormalization`` with ``stash_type`` double): verifier, honest flag, idempotence, outputs to 1e-5."""
    before = ir.serde.deserialize_model(model)
    result = make_pass()(ir.serde.deserialize_model(model))
    verify(result.model)
    changed = _bytes(result.model) != _bytes(before)
    assert result.modified == changed, f"{make_pass.__name__} reported modified={result.modified}"
    again = make_pass()(ir.serde.deserialize_model(ir.serde.serialize_model(result.model)))
    assert not again.modified and _bytes(again.model) == _bytes(result.model), f"{make_pass.__name__} not idempotent"
    for inputs in feeds:
        for want, got in zip(run_model(before, inputs), run_model(result.model, inputs), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    return result.model


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


@settings(max_examples=120)
@given(WITH_BIASES)
def test_every_canonicalize_pass_keeps_the_graph_valid_and_exact(generated: GeneratedModel) -> None:
    feeds = generated.inputs(2)
    for make_pass in CANONICALIZE:
        if make_pass is FuseRMSNormPass:
            after = _assert_float32_pass(make_pass, generated.model, feeds)
        else:  # the verifier, float64 exactness, an honest flag and idempotence
            after, _ = assert_float_exact_pass(make_pass, generated.model, feeds)
        if make_pass is FuseBiasAddPass:
            assert not _linear_add_left(after), generated.description
        if make_pass is FuseRMSNormPass:
            assert not any(n.op_type == "Pow" for n in after.graph), generated.description
        if make_pass is FoldBatchNormPass:
            assert not _foldable_batchnorms_left(after), generated.description
        if make_pass is DecomposeBatchNormPass:
            assert not any(n.op_type == "BatchNormalization" for n in after.graph), generated.description


@settings(max_examples=60)
@given(shared_parameter_models())
def test_recipe_order_is_verifier_clean_after_every_pass(generated: GeneratedModel) -> None:
    """The passes one after the other, as a recipe runs them, with the verifier after each (verify-each)."""
    model = ir.serde.deserialize_model(generated.model)
    for make_pass in CANONICALIZE:
        model = make_pass()(model).model
        verify(model)
    feeds = generated.inputs(1)[0]
    before = run_model(ir.serde.deserialize_model(generated.model), feeds)
    np.testing.assert_allclose(run_model(model, feeds)[0], before[0], rtol=1e-4, atol=1e-5)
