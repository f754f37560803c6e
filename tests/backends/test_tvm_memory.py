"""What a built step holds in memory: a graph output is computed as soon as its inputs are, so what it reads is
not held to the end (a causal LM's step returns each layer's new cache entries as slices of its concatenation)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from tvm import relax

from qcompiler.backends.tvm import build, importer

pytestmark = pytest.mark.tvm

LAYERS, PAST, NEW, WIDTH = 8, 256, 4, 64


def _cached_layers() -> object:
    """``LAYERS`` layers of ``c = Concat(past_i, h)``, ``h += ReduceSum(c over positions)``; outputs ``h`` and the
    new rows of each ``c`` (a Slice), listed, as torch.export writes them, after every layer."""
    nodes, outputs = [], []
    for i in range(LAYERS):
        nodes.append(helper.make_node("Concat", [f"past_{i}", "h" if i == 0 else f"h{i}"], [f"c{i}"], axis=1))
        nodes.append(helper.make_node("ReduceSum", [f"c{i}", "axis"], [f"s{i}"], keepdims=1))
        nodes.append(helper.make_node("Add", ["h" if i == 0 else f"h{i}", f"s{i}"], [f"h{i + 1}"]))
    for i in range(LAYERS):
        nodes.append(helper.make_node("Slice", [f"c{i}", "start", "end", "axis"], [f"new_{i}"]))
        outputs.append(helper.make_tensor_value_info(f"new_{i}", TensorProto.INT32, [1, NEW, WIDTH]))
    graph = helper.make_graph(
        nodes,
        "cached",
        [helper.make_tensor_value_info("h", TensorProto.INT32, [1, NEW, WIDTH])]
        + [helper.make_tensor_value_info(f"past_{i}", TensorProto.INT32, [1, PAST, WIDTH]) for i in range(LAYERS)],
        [helper.make_tensor_value_info(f"h{LAYERS}", TensorProto.INT32, [1, NEW, WIDTH]), *outputs],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
         (("axis", [1]), ("start", [PAST]), ("end", [PAST + NEW]))],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _planned_bytes(model: object, shapes: dict[str, list[int]]) -> int:
    """Bytes of the storage TVM's static memory plan allocates for one call."""
    mod = importer.import_onnx(model, shapes)
    passes = relax.transform
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential([passes.LegalizeOps(), passes.ToNonDataflow(), passes.RemovePurityChecking(),
                                        passes.CallTIRRewrite(), passes.StaticPlanBlockMemory()])(mod)  # fmt: skip
    total = 0

    def visit(expr: object) -> None:
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.memory.alloc_storage":
            total += int(expr.args[0].values[0])

    relax.analysis.post_order_visit(mod["main"], visit)
    return total


def test_outputs_are_computed_where_their_inputs_are_and_free_them() -> None:
    model = _cached_layers()
    shapes = {"h": [1, NEW, WIDTH], **{f"past_{i}": [1, PAST, WIDTH] for i in range(LAYERS)}}
    concat = (PAST + NEW) * WIDTH * 4
    # one layer's concatenation at a time (two where a layer's overlaps the next's), not every layer's
    assert _planned_bytes(model, shapes) <= 2 * concat + 4 * NEW * WIDTH * 4
    rng = np.random.default_rng(0)
    feeds = {name: rng.integers(-100, 100, shape).astype(np.int32) for name, shape in shapes.items()}
    expected = ReferenceEvaluator(model).run(None, feeds)
    got = build(model, shapes).run(feeds)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_outputs_are_views_of_fresh_memory_and_never_of_the_inputs() -> None:
    """CPU outputs come back as numpy views of the VM's output tensors, except those over an input's memory (a
    reshaped input): the staging tensors are refilled by the next call, so those are copied."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("Neg", ["x"], ["negated"])]
    graph = helper.make_graph(
        nodes,
        "views",
        [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 3])],
        [helper.make_tensor_value_info("flat", TensorProto.INT32, [6]),
         helper.make_tensor_value_info("negated", TensorProto.INT32, [2, 3])],
        [numpy_helper.from_array(np.array([6], np.int64), "shape")],
    )  # fmt: skip
    module = build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": [2, 3]})
    first = module.run({"x": np.arange(6, dtype=np.int32).reshape(2, 3)})
    second = module.run({"x": np.full((2, 3), 7, np.int32)})
    np.testing.assert_array_equal(first[0], np.arange(6))  # not the refilled staging tensor
    np.testing.assert_array_equal(first[1], -np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(second[0], np.full(6, 7))
    assert first[1].base is not None  # a view (no copy), alive while the array is
