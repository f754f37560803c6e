"""Issue 20 (compile time linear in depth): a pass adding thousands of initializers reads the graph's names
once (qcompiler.ir.graph.naming), and the graph still leaves every pass with unique value names, also when a
node was renamed inside the block to a name the block had handed out."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, naming, unique_name


def _graph() -> ir.Graph:
    x = ir.Value(name="x", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.node("Relu", [x], outputs=[ir.Value(name="w_scale")])
    neg = ir.node("Neg", [relu.outputs[0]], outputs=[ir.Value(name="y")])
    return ir.Graph([x], [neg.outputs[0]], nodes=[relu, neg], name="g")


def _all_names(graph: ir.Graph) -> list[str]:
    names = [v.name for v in graph.inputs]
    names += [v.name for node in graph for v in node.outputs]
    names += list(graph.initializers)
    return [n for n in names if n]


def test_names_handed_out_in_a_block_are_unique_and_avoid_the_graph() -> None:
    graph = _graph()
    with naming(graph):
        values = [add_initializer(graph, "w_scale", np.ones(2, np.float32)) for _ in range(5)]
        assert unique_name(graph, "y") == "y_1"
    names = [v.name for v in values]
    assert names == ["w_scale_1", "w_scale_2", "w_scale_3", "w_scale_4", "w_scale_5"]
    assert len(_all_names(graph)) == len(set(_all_names(graph)))


def test_a_rename_inside_the_block_that_takes_a_handed_out_name_is_undone_at_the_end() -> None:
    graph = _graph()
    with naming(graph):
        handed = add_initializer(graph, "scale", np.ones(2, np.float32))
        assert handed.name == "scale"
        graph.node(1).outputs[0].name = "scale"  # a pass renames an output after the names were read
    names = _all_names(graph)
    assert len(names) == len(set(names)), names
    assert graph.node(1).outputs[0].name == "scale" and handed.name != "scale"
    assert graph.initializers[handed.name] is handed


def test_outside_a_block_every_call_reads_the_graph() -> None:
    graph = _graph()
    first = add_initializer(graph, "scale", np.ones(2, np.float32))
    graph.node(1).outputs[0].name = "scale_1"
    second = add_initializer(graph, "scale", np.ones(2, np.float32))
    assert (first.name, second.name) == ("scale", "scale_2")
