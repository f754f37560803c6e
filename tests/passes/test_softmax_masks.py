"""Softmax masks written with Where (``torch.where(mask, scores, min)``, ``masked_fill``): the Where joins the
softmax group and the integer softmax reads the mask; constant causal masks make the graph a causal decoder."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.ir.analysis.architecture import describe
from qcompiler.testing import assert_bit_exact, assert_lowering_matches

TOKENS, WIDTH = 5, 8
CAUSAL = np.tril(np.ones((TOKENS, TOKENS), bool))


def _model(form: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {f"w{n}": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.4 for n in "qk"}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, WIDTH])]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
    ]
    inits["low"] = np.array(np.finfo(np.float32).min, np.float32)
    if form == "keep-constant":  # torch.where(causal, scores, min)
        inits["keep"] = CAUSAL
        nodes.append(helper.make_node("Where", ["keep", "s", "low"], ["masked"]))
    elif form == "drop-constant":  # scores.masked_fill(~causal, min)
        inits["drop"] = ~CAUSAL
        nodes.append(helper.make_node("Where", ["drop", "low", "s"], ["masked"]))
    elif form == "drop-input":  # masked_fill with a padding mask given at run time
        inputs.append(helper.make_tensor_value_info("drop", TensorProto.BOOL, [1, TOKENS]))
        nodes.append(helper.make_node("Where", ["drop", "low", "s"], ["masked"]))
    else:  # GPT-Neo: Where(causal, scores, min), then an additive padding mask (constant, or from a run-time keep)
        inits["keep"] = CAUSAL
        nodes.append(helper.make_node("Where", ["keep", "s", "low"], ["causal"]))
        if form == "causal-then-constant-add":
            inits["pad"] = np.where(np.arange(TOKENS) < TOKENS - 1, 0.0, -np.inf).astype(np.float32)[None, :]
        else:
            inputs.append(helper.make_tensor_value_info("valid", TensorProto.BOOL, [1, TOKENS]))
            inits["zero"], inits["ninf"] = np.array(0.0, np.float32), np.array(-np.inf, np.float32)
            nodes.append(helper.make_node("Where", ["valid", "zero", "ninf"], ["pad"]))
        nodes.append(helper.make_node("Add", ["causal", "pad"], ["masked"]))
    nodes.append(helper.make_node("Softmax", ["masked"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "masked",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, TOKENS])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(form: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        feeds = {"x": rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)}
        if form == "drop-input":
            feeds["drop"] = np.array([[False, False, True, False, True]])
        if form == "causal-then-input-add":
            feeds["valid"] = np.array([[True, True, False, True, True]])
        batches.append(feeds)
    return batches


@pytest.mark.tvm
@pytest.mark.parametrize(
    "form", ["keep-constant", "drop-constant", "drop-input", "causal-then-constant-add", "causal-then-input-add"]
)
def test_where_masks_join_the_integer_softmax(form: str) -> None:
    from qcompiler.backends.tvm import build

    model = _model(form)
    kind = describe(ir.serde.deserialize_model(model).graph).kind
    assert kind == ("attention" if form == "drop-input" else "causal-decoder")  # a causal keep, ANDed or not
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=_batches(form, 4, 0), progress=False)
    ops = [n.op_type for n in integer.graph]
    assert ops.count("IntSoftmax") == 1 and not any(
        n.op_type == "Where" and n.outputs[0].dtype != ir.DataType.BOOL for n in integer.graph
    )  # the masks' float Where and Add joined the integer softmax
    softmax = next(n for n in integer.graph if n.op_type == "IntSoftmax")
    assert len(softmax.inputs) == 2  # the mask, kept
    probe = _batches(form, 2, 5)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
