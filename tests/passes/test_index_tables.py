"""TabulateIndexFunctionsPass: float functions of an integer position input become Gathers of tables, equal to
the float graph at every position; values whose rows depend on other positions are left as they are. Plus the
symbolic-dimension helpers the cached step relies on (dim_upper_bound, specialize_dims)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcompiler.ir.graph import dim_upper_bound, set_dim_bounds, specialize_dims
from qcompiler.passes.canonicalize.index_tables import TabulateIndexFunctionsPass

BOUND = 40


def _rope_like(cumulative: bool = False) -> onnx.ModelProto:
    """``y = x * cos(pos * f) + x * sin(pos * f)`` with ``pos`` an int64 ``[1, s]`` input (or its cumulative sum)."""
    freq = numpy_helper.from_array(np.array([1.0, 0.3, 0.01, 1e-4], np.float32), "freq")
    axis = numpy_helper.from_array(np.array([2], np.int64), "axis")
    zero = numpy_helper.from_array(np.array(1, np.int64), "one")
    nodes = [
        helper.make_node("CumSum", ["pos", "one"], ["p"])
        if cumulative
        else helper.make_node("Identity", ["pos"], ["p"])
    ]
    nodes += [
        helper.make_node("Cast", ["p"], ["pf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pf", "axis"], ["pu"]),
        helper.make_node("Mul", ["pu", "freq"], ["angle"]),
        helper.make_node("Cos", ["angle"], ["cos"]),
        helper.make_node("Sin", ["angle"], ["sin"]),
        helper.make_node("Mul", ["x", "cos"], ["xc"]),
        helper.make_node("Mul", ["x", "sin"], ["xs"]),
        helper.make_node("Add", ["xc", "xs"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "rope", [helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "s"]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 4])], initializer=[freq, axis, zero],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: onnx.ModelProto, pos: np.ndarray, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pos": pos, "x": x})[0]


def test_positions_become_table_reads_equal_to_the_float_graph() -> None:
    proto = _rope_like()
    model = ir.serde.deserialize_model(proto)
    assert TabulateIndexFunctionsPass({"pos": BOUND})(model).modified
    ops = [n.op_type for n in model.graph]
    assert "Cos" not in ops and "Sin" not in ops and "Cast" not in ops
    assert ops.count("Gather") == 2
    rewritten = ir.serde.serialize_model(model)
    rng = np.random.default_rng(0)
    for length in (1, 5, BOUND):
        pos = rng.integers(0, BOUND, (1, length)).astype(np.int64)
        x = rng.standard_normal((1, length, 4)).astype(np.float32)
        np.testing.assert_allclose(_run(rewritten, pos, x), _run(proto, pos, x), rtol=1e-6, atol=1e-6)


def test_rows_that_depend_on_other_positions_are_left_alone() -> None:
    model = ir.serde.deserialize_model(_rope_like(cumulative=True))
    assert not TabulateIndexFunctionsPass({"pos": BOUND})(model).modified
    assert "Cos" in [n.op_type for n in model.graph]


def test_inputs_without_a_bound_are_not_tabulated() -> None:
    model = ir.serde.deserialize_model(_rope_like())
    assert not TabulateIndexFunctionsPass({"other": BOUND})(model).modified


def test_symbolic_bounds_and_specialization() -> None:
    model = ir.serde.deserialize_model(_rope_like())
    graph = model.graph
    assert dim_upper_bound(graph, 7) == 7
    assert dim_upper_bound(graph, ir.SymbolicDim("s")) is None  # no bounds recorded
    set_dim_bounds(graph, {"s": 12, "past": 100})
    assert dim_upper_bound(graph, ir.SymbolicDim("s + past")) == 112
    assert dim_upper_bound(graph, ir.SymbolicDim("2*s + 1")) == 25
    assert dim_upper_bound(graph, ir.SymbolicDim("past - s")) is None  # falls with s: no upper bound from maxima
    assert dim_upper_bound(graph, ir.SymbolicDim("t")) is None
    static = specialize_dims(model, {"s": 3})
    assert [int(d) for d in static.graph.inputs[1].shape] == [1, 3, 4]
    assert [int(d) for d in static.graph.outputs[0].shape] == [1, 3, 4]
    assert graph.inputs[1].shape[1] == ir.SymbolicDim("s")  # the symbolic model is left as it was
