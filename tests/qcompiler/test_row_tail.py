"""The row-wise tail of a graph output (qcompiler/ir/analysis/row_tail.py): where a prefill chunk may stop so that
the logits' tail runs on the one row generation reads. Cut there, the body and the tail compose to the model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompiler.ir.analysis.row_tail import row_tail, split_at

ROWS, WIDTH = 5, 4


def _model(nodes: list, outputs: list[str], constants: dict[str, np.ndarray] | None = None) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "seq", WIDTH]) for name in outputs],
        [numpy_helper.from_array(v, k) for k, v in (constants or {}).items()],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _layer_like() -> ir.Model:
    """``x -> Softmax over the rows -> r = s + x -> y = Tanh(r * c) + r``: the tail is from ``r`` on."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["s"], axis=1),  # mixes the rows: not in any tail
        helper.make_node("Add", ["s", "x"], ["r"]),
        helper.make_node("Mul", ["r", "c"], ["n"]),
        helper.make_node("Tanh", ["n"], ["t"]),
        helper.make_node("Add", ["t", "r"], ["y"]),
    ]
    return _model(nodes, ["y"], {"c": np.linspace(-1, 1, WIDTH).astype(np.float32)})


def _shapes_inferred(model: ir.Model) -> ir.Model:
    for node in model.graph:  # the test graphs keep [1, seq, WIDTH] everywhere
        for value in node.outputs:
            value.shape = ir.Shape([1, "seq", WIDTH])
            value.dtype = ir.DataType.FLOAT
    return model


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, feeds)


def test_the_tail_stops_where_rows_mix_and_the_cut_composes_to_the_model() -> None:
    model = _shapes_inferred(_layer_like())
    found = row_tail(model.graph, model.graph.outputs[0])
    assert found is not None
    cut, nodes = found
    assert cut.name == "r" and [n.op_type for n in nodes] == ["Mul", "Tanh", "Add"]
    body, tail = split_at(model, cut)
    assert [v.name for v in tail.graph.inputs] == ["r"] and [v.name for v in body.graph.outputs] == ["r"]
    assert {n.op_type for n in body.graph} == {"Softmax", "Add"} and len(list(tail.graph)) == 3
    x = np.random.default_rng(0).standard_normal((1, ROWS, WIDTH)).astype(np.float32)
    (hidden,) = _run(body, {"x": x})
    (whole,) = _run(model, {"x": x})
    np.testing.assert_allclose(_run(tail, {"r": hidden})[0], whole, rtol=0, atol=0)
    # on the last row alone, the tail gives the last row's output
    np.testing.assert_allclose(_run(tail, {"r": hidden[:, -1:]})[0], whole[:, -1:], rtol=0, atol=0)
    assert [n.op_type for n in model.graph] == ["Softmax", "Add", "Mul", "Tanh", "Add"]  # not changed


def test_no_tail_when_the_output_mixes_rows_or_its_values_are_read_elsewhere() -> None:
    mixing = _shapes_inferred(_model([helper.make_node("Softmax", ["x"], ["y"], axis=1)], ["y"]))
    assert row_tail(mixing.graph, mixing.graph.outputs[0]) is None
    # Tanh's output is also read by a node outside the tail (another output): the tail stops after it
    shared = _shapes_inferred(_model([
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Mul", ["t", "t"], ["y"]),
        helper.make_node("Neg", ["t"], ["z"]),
    ], ["y", "z"]))  # fmt: skip
    cut, nodes = row_tail(shared.graph, shared.graph.outputs[0]) or (None, [])
    assert cut is not None and cut.name == "t" and [n.op_type for n in nodes] == ["Mul"]


def test_a_broadcast_along_the_rows_is_no_cut() -> None:
    """``y = x + mean over the rows of x``: the one value reaching the tail from outside is a row broadcast."""
    model = _model([
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Neg", ["m"], ["n"]),
        helper.make_node("Tanh", ["n"], ["y"]),
    ], ["y"], {"axes": np.array([1], np.int64)})  # fmt: skip
    for node in model.graph:
        node.outputs[0].shape = ir.Shape([1, 1, WIDTH])
    model.graph.outputs[0].shape = ir.Shape([1, "seq", WIDTH])  # as an exporter may declare it
    assert row_tail(model.graph, model.graph.outputs[0]) is None
