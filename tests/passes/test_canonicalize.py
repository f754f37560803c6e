"""FuseBiasAddPass and FoldBatchNormPass: golden rewrites, float64 equivalence, near misses, properties."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

from qcompiler.passes.canonicalize import FoldBatchNormPass, FuseBiasAddPass
from qcompiler.testing import GeneratedModel, assert_equivalent, models


def _model(nodes, x_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


RNG = np.random.default_rng(0)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_conv_add_becomes_conv_with_bias() -> None:
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"])],
        (1, 2, 5, 5),
        {
            "w": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
            "b": RNG.standard_normal((3, 1, 1)).astype(np.float32),
        },
    )
    feeds = [{"x": RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)}]
    after = assert_equivalent(FuseBiasAddPass(), model, feeds)
    assert _ops(after) == ["Conv"]
    assert after.graph.node(0).inputs[2].const_value.shape == (3,)  # type: ignore[union-attr]


def test_matmul_add_becomes_gemm() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        (4, 6),
        {
            "w": RNG.standard_normal((6, 3)).astype(np.float32),
            "b": RNG.standard_normal((1, 3)).astype(np.float32),
        },
    )
    after = assert_equivalent(FuseBiasAddPass(), model, [{"x": RNG.standard_normal((4, 6)).astype(np.float32)}])
    assert _ops(after) == ["Gemm"]


def test_batched_matmul_add_becomes_reshape_gemm_reshape() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        (2, 4, 6),
        {"w": RNG.standard_normal((6, 3)).astype(np.float32), "b": RNG.standard_normal(3).astype(np.float32)},
    )
    after = assert_equivalent(FuseBiasAddPass(), model, [{"x": RNG.standard_normal((2, 4, 6)).astype(np.float32)}])
    assert _ops(after) == ["Reshape", "Gemm", "Reshape"]


def test_near_misses_are_left_alone() -> None:
    # a per-pixel (not per-channel) constant, and a 3-D MatMul input of dynamic batch: neither is rewritten
    per_pixel = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "b"], ["y"])],
        (1, 2, 5, 5),
        {
            "w": RNG.standard_normal((3, 2, 3, 3)).astype(np.float32),
            "b": RNG.standard_normal((1, 1, 3, 3)).astype(np.float32),
        },
    )
    batched = _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        ("batch", 4, 6),
        {"w": RNG.standard_normal((6, 3)).astype(np.float32), "b": RNG.standard_normal(3).astype(np.float32)},
    )
    for model in (per_pixel, batched):
        result = FuseBiasAddPass()(ir.serde.deserialize_model(model))
        assert not result.modified
        assert _ops(result.model) == [n.op_type for n in model.graph.node]


def test_batchnorm_folds_into_conv() -> None:
    c = 3
    model = _model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        ],
        (1, 2, 5, 5),
        {
            "w": RNG.standard_normal((c, 2, 3, 3)).astype(np.float32),
            "g": RNG.uniform(0.5, 2, c).astype(np.float32),
            "b": RNG.standard_normal(c).astype(np.float32),
            "m": RNG.standard_normal(c).astype(np.float32),
            "v": RNG.uniform(0.5, 2, c).astype(np.float32),
        },
    )
    after = assert_equivalent(
        FoldBatchNormPass(),
        model,
        [{"x": RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)}],
        rtol=1e-7,
        atol=1e-9,
    )
    assert _ops(after) == ["Conv"]


@settings(max_examples=40)
@given(models())
def test_canonicalize_properties(generated: GeneratedModel) -> None:
    """Float64 equivalence, idempotence and an honest modified flag on generated graphs."""
    feeds = generated.inputs(2)
    for pass_factory in (FuseBiasAddPass, FoldBatchNormPass):
        after = assert_equivalent(pass_factory(), generated.model, feeds, rtol=1e-9, atol=1e-12)
        again = pass_factory()(after)
        assert not again.modified, f"{pass_factory.__name__} is not idempotent"
    first = FuseBiasAddPass()(ir.serde.deserialize_model(generated.model))
    constants = {t.name for t in generated.model.graph.initializer}
    expected_change = any(n.op_type == "Add" and n.input[1] in constants for n in generated.model.graph.node)
    assert first.modified == expected_change
