"""qcompiler.ir.load: every model form becomes one onnx_ir.Model with constants lifted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import qcompiler
from qcompiler.pipeline import run_model


def _with_constant_node() -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["w"], value=onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32) * 2)
            ),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("form", ["proto", "ir", "path"])
def test_constant_nodes_are_lifted(form: str, tmp_path) -> None:
    proto = _with_constant_node()
    if form == "proto":
        model = qcompiler.ir.load(proto)
    elif form == "ir":
        model = qcompiler.ir.load(ir.serde.deserialize_model(proto))
    else:
        onnx.save(proto, str(tmp_path / "m.onnx"))
        model = qcompiler.ir.load(tmp_path / "m.onnx")
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert model.graph.node(0).inputs[1].const_value is not None
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_array_equal(run_model(model, {"x": x})[0], 2 * x)


def test_torch_module_is_captured_with_torch_export() -> None:
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    model = qcompiler.ir.load(module, example_inputs=(x,))
    assert isinstance(model, ir.Model)
    assert all(n.op_type != "Constant" for n in model.graph)
    with torch.no_grad():
        expected = module(x).numpy()
    got = run_model(model, {model.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named() -> None:
    import torch

    with pytest.raises(qcompiler.ModelLoadError, match="example_inputs"):
        qcompiler.ir.load(torch.nn.Linear(2, 2))
    with pytest.raises(qcompiler.ModelLoadError, match="cannot load an object of type dict"):
        qcompiler.ir.load({"not": "a model"})


def test_minus_one_dimensions_are_dynamic() -> None:
    """Paddle2ONNX writes unknown dimensions as -1: they load as symbolic (dynamic) dimensions, so a batch of any
    size is accepted for them."""
    from qcompiler.calibrate import as_feeds, input_specs

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])],
    )
    model = qcompiler.ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert input_specs(model)[0][1] == (None, 3)
    assert as_feeds(model, {"x": np.zeros((5, 3), np.float32)})["x"].shape == (5, 3)
