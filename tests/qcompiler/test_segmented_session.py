"""Issue 20: calibration runs the model in segments (qcompiler.ir.ort_session.SegmentedSession) so that a few
hundred MB of activations are alive at a time, not all of them. What it observes must not change: the same
thresholds, per-channel maxima and Hessians as one session, whatever the cut points; a segment never holds much
more than its budget; subgraphs and untyped cuts fall back to one segment."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from qcompiler import calibrate
from qcompiler.ir import load as load_model
from qcompiler.ir import ort_session
from qcompiler.ir.ort_session import SegmentedSession, _nbytes
from qcompiler.testing import transformer_models
from qcompiler.testing.data import digits_28x28, mnist_model_path


def _observed(model: ir.Model, batches, budget: int | None, monkeypatch) -> calibrate.ActivationRanges:
    monkeypatch.setattr(ort_session, "SEGMENT_BYTES", budget if budget is not None else 1 << 40)
    return calibrate.observe(model, batches, progress=False, hessians=True)


def _assert_same(a: calibrate.ActivationRanges, b: calibrate.ActivationRanges, hessians: bool = False) -> None:
    assert a.thresholds == b.thresholds
    assert a.channel_absmax.keys() == b.channel_absmax.keys()
    for name in a.channel_absmax:
        np.testing.assert_array_equal(a.channel_absmax[name], b.channel_absmax[name])
    assert a.hessians.keys() == b.hessians.keys() and (a.hessians or not hessians)
    for name in a.hessians:
        np.testing.assert_array_equal(a.hessians[name], b.hessians[name])


@pytest.mark.parametrize("budget", [1, 20_000, 200_000])
def test_observing_in_segments_changes_nothing_on_mnist(budget: int, monkeypatch) -> None:
    images, _ = digits_28x28()
    batches = [images[i : i + 1] for i in range(0, 40, 8)]
    model = load_model(str(mnist_model_path()))
    whole = _observed(model, batches, None, monkeypatch)
    _assert_same(whole, _observed(model, batches, budget, monkeypatch))


def test_observing_in_segments_changes_nothing_on_a_transformer(monkeypatch) -> None:
    from hypothesis import find

    generated = find(transformer_models(), lambda g: "layers=2" in g.description)
    model = ir.serde.deserialize_model(generated.model)
    batches = generated.inputs(3)
    whole = _observed(model, batches, None, monkeypatch)
    _assert_same(whole, _observed(model, batches, 1, monkeypatch), hessians=True)


def test_a_segment_holds_about_its_budget() -> None:
    model = load_model(str(mnist_model_path()))
    names = calibrate._float_values(model)
    budget = 20_000
    session = SegmentedSession(model, names, budget_bytes=budget)
    assert len(session.segments) > 3
    sizes = {v.name: _nbytes(v) for node in model.graph for v in node.outputs}
    largest = max(sizes.values())
    for segment in session.segments:
        held = sum(sizes.get(name, 0) for name in segment.outputs if name in set(names))
        assert held < budget + largest
    images, _ = digits_28x28()
    yielded = [name for name, _ in session.run({"Input3": images[:1]})]
    assert sorted(yielded) == sorted(set(names)), "every exposed value comes back exactly once"


def test_a_graph_with_a_subgraph_runs_as_one_segment() -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y_then"])], "then", [], [helper.make_tensor_value_info("y_then", 1, [4])]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["y_else"])], "else", [], [helper.make_tensor_value_info("y_else", 1, [4])]
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph),
            helper.make_node("Mul", ["y", "r"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    session = SegmentedSession(model, ["r", "y", "z"], budget_bytes=1)
    assert len(session.segments) == 1
    x = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    values = dict(session.run({"x": x}))
    np.testing.assert_array_equal(values["z"], -np.maximum(x, 0) * np.maximum(x, 0))
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_the_per_layer_error_is_the_same_in_segments(monkeypatch) -> None:
    """The per-layer SQNR runs the float and the QDQ model in segments, in step: the rows do not change."""
    from qcompiler.api import _quantize_qdq
    from qcompiler.config import load_recipe

    images, _ = digits_28x28()
    batches = [images[i : i + 1] for i in range(0, 40, 8)]

    def layers(budget: int) -> list:
        monkeypatch.setattr(ort_session, "SEGMENT_BYTES", budget)
        result = _quantize_qdq(str(mnist_model_path()), None, batches, load_recipe("w8a8"), True, False, False, True)
        assert result.layers
        return result.layers

    assert layers(1 << 40) == layers(1)


def _exported_mlp(rows: int):
    """A torch MLP exported by qcompiler.ir.load: its linear weights (each above SHARED_BYTES) are transposed
    views of the parameters."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(96, 256), torch.nn.ReLU(), torch.nn.Linear(256, 96), torch.nn.Linear(96, 192)
    ).eval()
    example = torch.randn(1, rows, 96)
    return module, load_model(module, (example,)), example.numpy()


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_transposed_weights_are_fed_in_place_and_give_the_same_values(rows: int) -> None:
    module, model, x = _exported_mlp(rows)
    params = [p.detach().numpy() for p in module.parameters() if p.dim() == 2]
    names = [v.name for node in model.graph for v in node.outputs if v.name]
    feeds = {model.graph.inputs[0].name: x}
    fed = SegmentedSession(model, names, budget_bytes=1)
    weights = [w for segment in fed.segments for w in segment.session.weights.values()]
    in_place = [w for w in weights if any(np.shares_memory(w, p) for p in params)]
    # with more than one row each weight is the parameter itself (FusedMatMul, transB); with one row a copy
    assert len(in_place) == (0 if rows == 1 else len(params)) and len(weights) == len(params)
    got = dict(fed.run(feeds))
    for value in model.graph.initializers.values():  # the same model with contiguous weights: plain MatMuls
        if value.const_value is not None:
            value.const_value = ir.tensor(np.ascontiguousarray(value.const_value.numpy()), name=value.name)
    want = dict(SegmentedSession(model, names).run(feeds))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_segments_also_end_at_their_weight_budget(monkeypatch) -> None:
    _, model, x = _exported_mlp(8)
    monkeypatch.setattr(ort_session, "SEGMENT_WEIGHT_BYTES", 1)
    output = model.graph.outputs[0].name
    session = SegmentedSession(model, [output])
    assert [len(s.session.weights) for s in session.segments if s.session.weights] == [1, 1, 1]
    assert dict(session.run({model.graph.inputs[0].name: x})).keys() == {output}
