"""The pipeline runner: verify-each, probe comparison, records, dumps; recipes; interop with onnx_ir and onnxscript."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxscript.optimizer
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import builtin_recipes, load_recipe
from qcompiler.errors import PassFailedError, RecipeError
from qcompiler.passes.canonicalize import FoldBatchNormPass, FuseBiasAddPass
from qcompiler.pipeline import Pipeline, format_records, run_model


def _conv_bn_model() -> ir.Model:
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal((4, 1, 1)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "beta": rng.standard_normal(4).astype(np.float32),
        "mu": rng.standard_normal(4).astype(np.float32),
        "var": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["c", "b"], ["a"]),
            helper.make_node("BatchNormalization", ["a", "g", "beta", "mu", "var"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


PROBE = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}


class DropFirstNodePass(ir.passes.InPlacePass):
    """A broken pass: removes a node whose output is still read."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.remove(model.graph.node(0), safe=False)
        return ir.passes.PassResult(model, modified=True)


class ScaleOutputPass(ir.passes.InPlacePass):
    """A wrong pass: claims to preserve outputs but doubles them."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        out = model.graph.outputs[0]
        two = ir.Value(
            name="two",
            shape=ir.Shape([]),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(np.array(2.0, np.float32), name="two"),
        )
        model.graph.register_initializer(two)
        node = ir.node("Mul", [out, two])
        model.graph.append(node)
        node.outputs[0].name = "doubled"
        model.graph.outputs[0] = node.outputs[0]
        return ir.passes.PassResult(model, modified=True)


def test_records_and_probe_comparison() -> None:
    result = Pipeline([FuseBiasAddPass(), FoldBatchNormPass()], probe_inputs=PROBE, rtol=1e-5, atol=1e-5).run(
        _conv_bn_model()
    )
    names = [r.name for r in result.records]
    assert names == ["FuseBiasAddPass", "FoldBatchNormPass"]
    assert result.records[0].removed == {"Add": 1} and result.records[0].modified
    assert result.records[1].removed == {"BatchNormalization": 1}
    assert [n.op_type for n in result.model.graph] == ["Conv"]
    assert "FoldBatchNormPass" in format_records(result.records)


def test_verify_each_names_the_pass_that_broke_the_graph() -> None:
    with pytest.raises(PassFailedError, match="pass DropFirstNodePass broke the graph: .*used before it is defined"):
        Pipeline([FuseBiasAddPass(), DropFirstNodePass()]).run(_conv_bn_model())


def test_probe_comparison_names_the_pass_that_changed_outputs() -> None:
    with pytest.raises(PassFailedError, match="pass ScaleOutputPass broke the graph: output 0 changed"):
        Pipeline([FuseBiasAddPass(), ScaleOutputPass()], probe_inputs=PROBE).run(_conv_bn_model())


def test_dump_dir(tmp_path: Path) -> None:
    Pipeline([FuseBiasAddPass(), FoldBatchNormPass()], dump_dir=tmp_path).run(_conv_bn_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_FuseBiasAddPass.onnx",
        "01_FoldBatchNormPass.onnx",
    ]


def test_our_passes_run_in_a_plain_onnx_ir_pass_manager_and_next_to_onnxscript() -> None:
    model = _conv_bn_model()
    before = run_model(model, PROBE)[0]
    manager = ir.passes.PassManager([FuseBiasAddPass(), FoldBatchNormPass()], steps=2)
    result = manager(model)
    assert result.modified
    onnxscript.optimizer.optimize(result.model)
    after = run_model(result.model, PROBE)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert [n.op_type for n in result.model.graph] == ["Conv"]


def test_builtin_recipes_load() -> None:
    assert "w8a8" in builtin_recipes()
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.canonicalize and (recipe.lower or recipe.simulate is not None)
        assert [spec.build() for spec in recipe.canonicalize]


def test_recipe_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(RecipeError, match="bad.toml"):
        load_recipe(bad)
    bad.write_text('[calibration]\nobserver = "median"\n')
    with pytest.raises(RecipeError, match="observer"):
        load_recipe(bad)
    bad.write_text("canonicalize = [42]\n")
    with pytest.raises(RecipeError, match="neither a pass name"):
        load_recipe(bad)
    bad.write_text("[quantise]\nweight_bits = 4\n")  # misspelt: would silently run on the defaults
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['quantise'\]"):
        load_recipe(bad)
    bad.write_text('canonicalize = [{ pass = "fold-constants", sizee = 10 }]\n')  # found at load, not mid-compile
    with pytest.raises(RecipeError, match="'fold-constants': options .*sizee"):
        load_recipe(bad)


def test_compile_verifies_a_user_pass_from_a_recipe(tmp_path: Path) -> None:
    """A user pass in a user recipe that changes outputs is caught by compile's probe and named."""
    import qcompiler
    from qcompiler.registry import PASSES, register_pass
    from qcompiler.testing.data import mnist_model_path

    if "test-scale-output" not in PASSES:
        register_pass("test-scale-output", ScaleOutputPass)
    recipe = tmp_path / "broken.toml"
    recipe.write_text('name = "broken"\ncanonicalize = ["infer-shapes", "test-scale-output"]\nlower = []\n')
    batch = np.zeros((1, 1, 28, 28), np.float32) + 100.0
    with pytest.raises(PassFailedError, match="ScaleOutputPass"):
        qcompiler.compile(str(mnist_model_path()), calibration=[batch], recipe=recipe, progress=False)


def test_upgrade_opset_converts_old_models_and_never_downgrades() -> None:
    from qcompiler.registry import PASSES

    def model(opset: int) -> ir.Model:
        node = helper.make_node("Relu", ["x"], ["y"])
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )  # fmt: skip
        return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))

    old = model(13)
    assert PASSES["upgrade-opset"](opset=21)(old).modified and old.opset_imports[""] == 21
    new = model(23)  # RMSNormalization has no opset-21 form: converting down would fail
    assert not PASSES["upgrade-opset"](opset=21)(new).modified and new.opset_imports[""] == 23


def test_a_value_a_pass_took_out_of_the_outputs_is_freed() -> None:
    """Issue 20: onnx_ir 1.1's graph inputs and outputs count their values in a Counter that is only decremented,
    so a value once taken out (QuantizeQDQPass re-routes graph outputs through Q/DQ) stays referenced, and with it
    what it holds: on a 1.1 B Llama, 1 GB of int8 weights the lowering had replaced. The pipeline releases such
    values after every pass."""
    import gc
    import weakref

    class OutAndBackIn(ir.passes.InPlacePass):
        def __init__(self, array: np.ndarray) -> None:
            super().__init__()
            self.arrays = [array]

        def call(self, model: ir.Model) -> ir.passes.PassResult:
            tensor = ir.tensor(self.arrays.pop(), name="extra")  # the pass keeps no reference
            model.graph.outputs.append(ir.Value(name="extra", const_value=tensor))
            model.graph.outputs.pop()
            return ir.passes.PassResult(model, modified=True)

    weight = np.ones((64, 64), np.float32)
    alive = weakref.ref(weight)
    a_pass = OutAndBackIn(weight)
    del weight
    model = _conv_bn_model()
    Pipeline([a_pass]).run(model)
    gc.collect()
    assert alive() is None and len(model.graph.outputs) == 1
