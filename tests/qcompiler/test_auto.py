"""``recipe="auto"``: the architecture read from the graph's structure, and the recipe chosen from it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import _quantize_qdq
from qcompiler.config import Recipe, load_recipe
from qcompiler.errors import RecipeError
from qcompiler.ir.analysis.architecture import describe
from qcompiler.testing import attention_models, cnn_models

TOKENS, WIDTH = 6, 8


def _score_block(mask: np.ndarray | None, depthwise: bool = False):
    """x -> Q, K projections -> scores (+ constant additive mask) -> Softmax; or a depthwise Conv; with both, a
    mobile hybrid: a depthwise Conv over [1, WIDTH, 1, TOKENS], its output as tokens into the attention."""
    rng = np.random.default_rng(0)
    if depthwise and mask is not None:
        front = [
            helper.make_node("Conv", ["image", "w"], ["c"], group=WIDTH, pads=[0, 1, 0, 1]),
            helper.make_node("Reshape", ["c", "tokens_shape"], ["ct"]),
            helper.make_node("Transpose", ["ct"], ["x"], perm=[1, 0]),
        ]
        model, _ = _score_block(mask)
        graph = model.graph
        for position, node in enumerate(front):
            graph.node.insert(position, node)
        graph.initializer.extend([
            numpy_helper.from_array(rng.standard_normal((WIDTH, 1, 1, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(np.array([WIDTH, TOKENS], np.int64), "tokens_shape"),
        ])  # fmt: skip
        graph.input[0].CopyFrom(helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, WIDTH, 1, TOKENS]))
        images = [{"image": rng.standard_normal((1, WIDTH, 1, TOKENS)).astype(np.float32)} for _ in range(3)]
        return model, images
    if depthwise:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=WIDTH, pads=[1, 1, 1, 1])]
        inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, 1, 3, 3)).astype(np.float32), "w")]
        shape, out_shape = [1, WIDTH, 5, 5], [1, WIDTH, 5, 5]
    else:
        wq, wk = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) for _ in range(2))
        nodes = [
            helper.make_node("MatMul", ["x", "wq"], ["q"]),
            helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
        ]
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wk, "wk")]
        scores = "s"
        if mask is not None:
            nodes.append(helper.make_node("Add", ["s", "mask"], ["sm"]))
            inits.append(numpy_helper.from_array(mask.astype(np.float32), "mask"))
            scores = "sm"
        nodes.append(helper.make_node("Softmax", [scores], ["y"], axis=-1))
        shape, out_shape = [TOKENS, WIDTH], [TOKENS, TOKENS]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    return model, batches


CAUSAL = np.where(np.tril(np.ones((TOKENS, TOKENS), bool)), 0.0, -np.inf)
#: a padding mask (the last key dropped for every query): not causal
PADDING = np.where(np.arange(TOKENS)[None, :] < TOKENS - 1, 0.0, -np.inf).repeat(TOKENS, 0)


@pytest.mark.parametrize(
    ("mask", "depthwise", "kind", "recipe"),
    [
        (CAUSAL, False, "causal-decoder", "w8a8-llm"),
        (PADDING, False, "attention", "w8a8-percentile"),
        (None, False, "attention", "w8a8-percentile"),
        (None, True, "depthwise-cnn", "w8a16"),
        (PADDING, True, "depthwise-attention", "w8a16"),
    ],
)
def test_auto_chooses_from_the_structure(mask, depthwise: bool, kind: str, recipe: str) -> None:
    model, batches = _score_block(mask, depthwise)
    assert describe(ir.serde.deserialize_model(model).graph).kind == kind
    result = _quantize_qdq(model, None, batches, load_recipe("auto"), True, False)
    assert result.recipe.name == recipe
    assert result.choice is not None and (result.choice.kind, result.choice.recipe) == (kind, recipe)
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph)


@settings(max_examples=10, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(attention_models())
def test_generated_attention_blocks_are_attention(generated) -> None:
    assert describe(ir.serde.deserialize_model(generated.model).graph).kind == "attention"


@settings(max_examples=10, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(cnn_models())
def test_generated_cnns_are_not_attention(generated) -> None:
    assert describe(ir.serde.deserialize_model(generated.model).graph).kind == "other"


def test_a_plain_recipe_chooses_itself() -> None:
    plain = load_recipe("w8a8")
    assert plain.choose("causal-decoder") is plain


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('causal-decoder = "w8a8"\nattention = "w8a8"\nother = "w8a8"', r"missing \['depthwise-cnn'\]"),
        ('causal-decoder = "w8a8"\nattention = "w8a8"\ndepthwise-cnn = "w8a8"\nother = "w4a4-dynamic"', "integer-path"),
        ('causal-decoder = "nope"\nattention = "w8a8"\ndepthwise-cnn = "w8a8"\nother = "w8a8"', "unknown recipe"),
    ],
)
def test_a_malformed_auto_table_is_refused(tmp_path, table: str, message: str) -> None:
    base = (load_recipe("auto"),)
    assert isinstance(base[0], Recipe)
    canonicalize = ", ".join(
        f'{{ pass = "{p.name}", opset = {p.options["opset"]} }}' if p.options else f'"{p.name}"'
        for p in load_recipe("w8a8").canonicalize
    )
    text = (
        f'name = "mine"\ncanonicalize = [{canonicalize}]\n'
        f'lower = ["lower-qdq-to-integer", "fuse-integer-linear", "remove-unused"]\n[auto]\n{table}\n'
    )
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_classifiers_softmax_is_not_attention() -> None:
    """Softmax over the logits of a constant-weight layer (a CNN classifier's head) does not make a model attention."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.ones((WIDTH, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert describe(ir.serde.deserialize_model(model).graph).kind == "other"


def test_scores_flattened_for_the_softmax_are_attention() -> None:
    """Paddle2ONNX writes attention's softmax as Flatten -> Softmax over 2-D -> Reshape (PP-OCR's recognizer, an
    attention model with depthwise convolutions around it): still attention, so auto picks w8a8-percentile."""
    rng = np.random.default_rng(1)
    wq, wk = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wq"], ["q"]),
            helper.make_node("MatMul", ["x", "wk"], ["k"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Flatten", ["s"], ["f"], axis=2),
            helper.make_node("Softmax", ["f"], ["p"], axis=1),
            helper.make_node("Reshape", ["p", "shape"], ["y"]),
        ],
        "paddle-attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, TOKENS])],
        [
            numpy_helper.from_array(wq, "wq"),
            numpy_helper.from_array(wk, "wk"),
            numpy_helper.from_array(np.array([1, TOKENS, TOKENS], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert describe(ir.serde.deserialize_model(model).graph).kind == "attention"
