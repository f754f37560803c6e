"""The public API on the real MNIST CNN (acceptance 2), save/load, the torch path, and bad input (acceptance 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler
from qcompiler.testing.data import digits_28x28, mnist_model_path, mnist_test_vector

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return digits_28x28()


@pytest.fixture(scope="module")
def compiled_mnist(digits) -> qcompiler.CompiledModel:
    images, _ = digits
    calibration = [images[i : i + 1] for i in range(1, len(images), 9)]  # every 9th digit, offset 1
    return qcompiler.compile(str(mnist_model_path()), target="llvm", calibration=calibration, progress=False)


def test_mnist_shipped_test_vector(compiled_mnist) -> None:
    x, expected = mnist_test_vector()
    assert int(np.argmax(compiled_mnist(x))) == int(np.argmax(expected))


def test_mnist_digits_accuracy_within_one_point_of_float(compiled_mnist, digits) -> None:
    images, labels = digits
    session = ort.InferenceSession(str(mnist_model_path()), providers=["CPUExecutionProvider"])
    float_pred = np.array([session.run(None, {"Input3": images[i : i + 1]})[0].argmax() for i in range(len(images))])
    int_pred = np.array([compiled_mnist(images[i : i + 1]).argmax() for i in range(len(images))])
    float_acc = float(np.mean(float_pred == labels))
    int_acc = float(np.mean(int_pred == labels))
    assert abs(float_acc - 0.889) < 0.002, f"float accuracy {float_acc} differs from digits_28x28's 88.9 %"
    assert abs(int_acc - float_acc) <= 0.01, f"integer {int_acc:.4f} vs float {float_acc:.4f}"


def test_integer_graph_has_no_float_op_inside(compiled_mnist) -> None:
    import onnx_ir as ir

    from qcompiler.passes.lower import float_ops_inside

    model = ir.serde.deserialize_model(compiled_mnist.integer_model)
    assert float_ops_inside(model) == []
    ops = [n.op_type for n in compiled_mnist.integer_model.graph.node]
    assert ops[0] == "QuantizeLinear" and ops[-1] == "DequantizeLinear"
    assert ops.count("QConv") == 2 and ops.count("QGemm") == 1


def test_qdq_model_runs_in_onnxruntime(compiled_mnist) -> None:
    x, expected = mnist_test_vector()
    session = ort.InferenceSession(compiled_mnist.qdq_model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"Input3": x})[0]
    assert int(np.argmax(out)) == int(np.argmax(expected))


def test_the_report_has_time_and_memory_per_stage(compiled_mnist) -> None:
    """Issue 20: every stage of the compile with its seconds and the peak resident memory up to its end."""
    stages = compiled_mnist.report["stages"]
    labels = [s["stage"] for s in stages]
    for expected in ("canonicalize", "calibrate", "lower to integer ops", "build: import to TVM Relax"):
        assert expected in labels, labels
    assert labels.index("calibrate") < labels.index("lower to integer ops") < labels.index("build: import to TVM Relax")
    assert all(s["seconds"] >= 0 for s in stages)
    peaks = [s["peak_rss_mb"] for s in stages]
    assert all(p is not None and p > 0 for p in peaks)
    assert peaks == sorted(peaks), "the peak so far can only grow"
    assert compiled_mnist.report["peak_rss_mb"] == peaks[-1]
    assert all(s["rss_mb"] <= s["peak_rss_mb"] for s in stages)


def test_save_and_load_round_trip(compiled_mnist, tmp_path: Path) -> None:
    x, _ = mnist_test_vector()
    target = compiled_mnist.save(tmp_path / "mnist")
    assert sorted(p.name for p in target.iterdir()) == ["integer.onnx", "model.so", "qdq.onnx", "report.json"]
    reloaded = qcompiler.load(target)
    np.testing.assert_array_equal(reloaded(x), compiled_mnist(x))
    assert reloaded.report["recipe"] == "w8a8"
    with pytest.raises(FileExistsError, match="overwrite"):
        compiled_mnist.save(target)


def test_a_large_model_saves_its_tensors_beside_the_graph(compiled_mnist, tmp_path: Path, monkeypatch) -> None:
    """Issue 20: above the size limit the ONNX graphs keep their tensors in a .data file (protobuf stops at 2 GiB),
    the model in memory is unchanged, and a reload gives the same outputs."""
    from qcompiler import api

    monkeypatch.setattr(api, "EXTERNAL_DATA_BYTES", 0)
    before = compiled_mnist.integer_model.SerializeToString()
    target = compiled_mnist.save(tmp_path / "mnist")
    assert {"integer.onnx.data", "qdq.onnx.data"} <= {p.name for p in target.iterdir()}
    assert compiled_mnist.integer_model.SerializeToString() == before
    assert (target / "integer.onnx").stat().st_size < (target / "integer.onnx.data").stat().st_size
    reloaded = qcompiler.load(target)
    x, _ = mnist_test_vector()
    np.testing.assert_array_equal(reloaded(x), compiled_mnist(x))
    assert onnx.numpy_helper.to_array(reloaded.integer_model.graph.initializer[0]).size > 0


def test_save_failure_leaves_nothing_behind(compiled_mnist, tmp_path: Path, monkeypatch) -> None:
    def broken_export(path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(compiled_mnist.module, "export", broken_export)
    with pytest.raises(OSError, match="disk full"):
        compiled_mnist.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(compiled_mnist, tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    compiled_mnist.save(target, overwrite=True)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_torch_inputs_and_outputs(compiled_mnist) -> None:
    import torch

    x, _ = mnist_test_vector()
    out = compiled_mnist(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), compiled_mnist(x))
    with pytest.raises(ValueError, match="compiled for"):
        compiled_mnist(np.zeros((2, 1, 28, 28), np.float32))


def test_torch_module_end_to_end() -> None:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 4),
    )
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(16)]
    compiled = qcompiler.compile(
        module, example_inputs=(torch.from_numpy(batches[0]),), calibration=batches, progress=False
    )
    x = rng.standard_normal((4, 16)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = compiled(x)
    scale = np.abs(expected).max()
    assert np.max(np.abs(got - expected)) < 0.05 * scale


# --- bad input: clear errors that name the culprit ----------------------------------------------------------
def test_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(qcompiler.RecipeError, match="unknown recipe 'w3a3'.*w8a8"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], recipe="w3a3")


def test_malformed_recipe_names_the_field(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('name = "mine"\ncanonicalize = ["no-such-pass"]\n')
    with pytest.raises(qcompiler.RecipeError, match="no-such-pass"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], recipe=recipe)
    recipe.write_text('name = "mine"\n[quantize]\nweight_bits = 3\n')
    with pytest.raises(qcompiler.RecipeError, match="weight_bits"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], recipe=recipe)


def test_layer_weight_bits_load_from_toml_in_order_and_bad_values_name_the_field(tmp_path: Path) -> None:
    from qcompiler.config import load_recipe

    recipe = tmp_path / "mixed.toml"
    recipe.write_text('name = "mixed"\n[quantize]\nweight_bits = 4\ngroup_size = 128\n'
                      '[quantize.layer_weight_bits]\n"*.down_proj" = 8\n"model.layers.0.*" = 8\n')  # fmt: skip
    loaded = load_recipe(recipe).quantize
    assert loaded.layer_weight_bits == (("*.down_proj", 8), ("model.layers.0.*", 8))
    assert loaded.bits_used == {4, 8}
    for text, field in (('"*.down_proj" = 3', "bits must be 4 or 8"), ('"*" = "eight"', "layer_weight_bits")):
        recipe.write_text(f'name = "mixed"\n[quantize.layer_weight_bits]\n{text}\n')
        with pytest.raises(qcompiler.RecipeError, match=field):
            load_recipe(recipe)
    recipe.write_text('name = "w8a16"\n[quantize]\nactivation_bits = 16\n[quantize.layer_weight_bits]\n"*" = 4\n')
    with pytest.raises(qcompiler.RecipeError, match="activation_bits = 16 needs"):
        load_recipe(recipe)


def test_unknown_target() -> None:
    with pytest.raises(qcompiler.TargetError, match="unknown target 'tpu'"):
        qcompiler.compile(str(mnist_model_path()), target="tpu", calibration=[])


def test_malformed_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf at all \x00\xff" * 10)
    with pytest.raises(qcompiler.ModelLoadError, match="broken.onnx"):
        qcompiler.compile(str(bad), calibration=[])
    with pytest.raises(qcompiler.ModelLoadError, match="no such ONNX file"):
        qcompiler.compile(str(tmp_path / "missing.onnx"), calibration=[])


def test_calibration_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(qcompiler.CalibrationError, match=r"input 'Input3' has shape \(1, 28, 28\).*\(1, 1, 28, 28\)"):
        qcompiler.compile(str(mnist_model_path()), calibration=[np.zeros((1, 28, 28), np.float32)], progress=False)
    with pytest.raises(qcompiler.CalibrationError, match="no batch"):
        qcompiler.compile(str(mnist_model_path()), calibration=[], progress=False)
    with pytest.raises(qcompiler.CalibrationError, match="unknown input name"):
        qcompiler.compile(str(mnist_model_path()), calibration=[{"image": np.zeros((1, 1, 28, 28))}], progress=False)


def test_unsupported_op_names_the_node(tmp_path: Path) -> None:
    w = np.ones((4, 4), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("Atan", ["h"], ["y"], name="gate"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(qcompiler.UnsupportedOpError, match="node 'gate' \\(op Atan\\)") as info:
        qcompiler.compile(model, calibration=[np.ones((1, 4), np.float32)], progress=False)
    assert info.value.node_name == "gate"


def test_nothing_written_when_compile_fails(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(qcompiler.CalibrationError):
        qcompiler.compile(str(mnist_model_path()), calibration=[np.zeros((2, 2), np.float32)], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_external_data_files_load(tmp_path: Path) -> None:
    model = onnx.load(str(mnist_model_path()))
    for tensor in model.graph.initializer:  # external data applies to raw_data tensors only
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    path = tmp_path / "external.onnx"
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").is_file()
    ir_model = qcompiler.ir.load(path)
    assert all(v.const_value is not None for v in ir_model.graph.initializers.values())


def test_dynamic_batch_is_fixed_from_the_data() -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [
            numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    batches = [rng.standard_normal((3, 6)).astype(np.float32) for _ in range(8)]
    compiled = qcompiler.compile(model, calibration=batches, progress=False)
    assert compiled.report["input_shapes"] == {"x": [3, 6]}
    x = batches[0]
    expected = np.maximum(
        x @ numpy_helper.to_array(graph.initializer[0]) + numpy_helper.to_array(graph.initializer[1]), 0
    )
    assert np.max(np.abs(compiled(x) - expected)) < 0.05 * np.abs(expected).max()
    generator = (b for b in batches)  # a stream cannot fix the shape: the error says what to pass
    with pytest.raises(qcompiler.CalibrationError, match="example_inputs: input 'x' has dynamic shape"):
        qcompiler.compile(model, calibration=generator, progress=False)


# --- float-simulation recipes (w4a8-dynamic, w4a4-dynamic) and simulations of integer recipes ------------------------


def _pre_norm_llama_block():
    from hypothesis import find

    from qcompiler.testing import transformer_models

    return find(
        transformer_models(),
        lambda g: all(p in g.description for p in ("rms", "pre-norm", "swiglu", "layers=2")) and "x4" in g.description,
    )


def test_simulation_recipes_load_and_refuse_the_integer_path(tmp_path: Path) -> None:
    from qcompiler.config import load_recipe

    w4a8, w4a4 = load_recipe("w4a8-dynamic"), load_recipe("w4a4-dynamic")
    assert w4a8.simulate is not None and w4a4.simulate is not None
    integer_w4a8 = load_recipe("w4a8")
    assert integer_w4a8.simulate is None
    assert (integer_w4a8.quantize.weight_bits, integer_w4a8.quantize.group_size) == (4, 128)
    assert (w4a8.simulate.weight.bits, w4a8.simulate.weight.group_size, w4a8.simulate.activation_bits) == (4, 128, 8)
    assert (w4a4.simulate.activation_bits, w4a4.simulate.activation_clip, w4a4.simulate.weight_quantizer) == (
        4, 0.9, "gptq",
    )  # fmt: skip
    assert "online-hadamard" in [spec.name for spec in w4a4.canonicalize]
    generated = _pre_norm_llama_block()
    path = tmp_path / "block.onnx"
    onnx.save(generated.model, str(path))
    with pytest.raises(qcompiler.RecipeError, match="float simulation.*qcompiler.simulate"):
        qcompiler.compile(str(path), "llvm", calibration=generated.inputs(2), recipe="w4a4-dynamic")
    qdq = qcompiler.simulate(str(path), calibration=generated.inputs(2), recipe="w8a8", progress=False)
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph) > 0  # an integer recipe simulates as its QDQ graph
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[simulate]\nweight_bitz = 4\n')
    with pytest.raises(qcompiler.RecipeError, match="unknown keys \\['weight_bitz'\\]"):
        qcompiler.simulate(str(path), calibration=generated.inputs(2), recipe=bad)


def test_simulate_runs_the_rotated_gptq_recipe_and_8_bits_stay_close() -> None:
    """w4a4-dynamic on a generated Llama block: a float graph with rotations, online Hadamards, GPTQ weights and
    per-token activations; at 8 bits the same pipeline stays within a few percent of float."""
    import dataclasses

    from qcompiler.config import load_recipe
    from qcompiler.passes.quantize.weights import WeightQuantSpec
    from qcompiler.pipeline import run_onnxruntime

    generated = _pre_norm_llama_block()
    calibration, probe = generated.inputs(8), generated.inputs(2, offset=1)
    reference = [ort.InferenceSession(generated.model.SerializeToString()).run(None, feeds)[0] for feeds in probe]
    w4a4 = qcompiler.simulate(generated.model, calibration=calibration, recipe="w4a4-dynamic", progress=False)
    # one fake quantizer per linear input: q/k/v, o, gate/up, down per layer, and the head
    assert sum(n.op_type == "Round" for n in w4a4.graph) == 4 * 2 + 1
    base = load_recipe("w4a4-dynamic")
    assert base.simulate is not None
    eight = dataclasses.replace(
        base,
        simulate=dataclasses.replace(base.simulate, weight=WeightQuantSpec(8), activation_bits=8, activation_clip=1.0),
    )
    simulated = qcompiler.simulate(generated.model, calibration=calibration, recipe=eight, progress=False)
    for feeds, want in zip(probe, reference, strict=True):
        got = run_onnxruntime(simulated, feeds)[0]
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
        low = run_onnxruntime(w4a4, feeds)[0]
        assert np.all(np.isfinite(low))


def test_a_large_qdq_graph_is_kept_in_a_temporary_file_and_serves_as_before(monkeypatch, tmp_path) -> None:
    """Issue 20: above OFFLOAD_BYTES the QDQ graph a compiled model keeps is memory-mapped from a temporary file
    (not resident); its proto, its saved copy and its HTML report are what an in-memory graph gives, and the
    file goes with the model."""
    import gc

    import qcompiler.api as api

    images, _ = digits_28x28()
    calibration = [images[i : i + 1] for i in range(0, 32, 4)]
    kept = qcompiler.compile(str(mnist_model_path()), calibration=calibration, progress=False)
    monkeypatch.setattr(api, "OFFLOAD_BYTES", 0)
    offloaded = qcompiler.compile(str(mnist_model_path()), calibration=calibration, progress=False)
    held = [v.const_value for v in offloaded._qdq.graph.initializers.values() if v.const_value.nbytes >= 1024]
    assert held and all(isinstance(t, ir.ExternalTensor) for t in held)  # the small ones stay inline
    folder = Path(held[0].base_dir)
    assert folder.is_dir() and not folder.is_relative_to(tmp_path)
    assert offloaded.qdq_model.SerializeToString() == kept.qdq_model.SerializeToString()
    saved = onnx.load(str(offloaded.save(tmp_path / "model") / api.QDQ_FILE))
    want = kept.qdq_model
    assert list(saved.graph.node) == list(want.graph.node)
    arrays = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert arrays.keys() == {t.name for t in want.graph.initializer}
    for tensor in want.graph.initializer:
        np.testing.assert_array_equal(arrays[tensor.name], numpy_helper.to_array(tensor))
    offloaded.report_html(tmp_path / "report.html", profile=False)
    del offloaded, held
    gc.collect()
    assert not folder.exists()
