"""Observers and the QDQ pass."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibrate import calibrate
from qcompiler.errors import CalibrationError, UnsupportedOpError
from qcompiler.passes.quantize import MinMaxObserver, PercentileObserver, QuantizeQDQPass
from qcompiler.passes.quantize.qdq import QuantizeConfig, quantize_weight_per_channel


def test_minmax_observer_streams() -> None:
    obs = MinMaxObserver()
    obs.update(np.array([1.0, -3.0]))
    obs.update(np.array([2.5]))
    assert obs.absmax() == 3.0


def test_percentile_observer_ignores_rare_outliers_and_rebins() -> None:
    rng = np.random.default_rng(0)
    obs = PercentileObserver(percentile=99.0, bins=512)
    data = rng.standard_normal(200_000)
    for chunk in np.split(data, 20):
        obs.update(chunk)
    obs.update(np.array([1000.0]))  # one outlier far beyond everything: the range doubles many times
    expected = np.percentile(np.abs(data), 99.0)
    assert abs(obs.absmax() - expected) < 0.1 * expected + 1000.0 / 512 * 2
    assert obs.absmax() < 10.0


@pytest.mark.parametrize("bad", [{"percentile": 0.0}, {"bins": 3}])
def test_percentile_observer_validates(bad) -> None:
    with pytest.raises(ValueError):
        PercentileObserver(**bad)


def test_weight_quantization_is_symmetric_per_channel() -> None:
    w = np.array([[1.0, -2.0], [0.0, 0.0], [0.5, 0.25]], np.float32)
    q, scales = quantize_weight_per_channel(w, axis=0)
    assert q.min() >= -127 and q.max() <= 127
    np.testing.assert_allclose(scales, [2 / 127, 1.0, 0.5 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q[0], [64, -127])
    np.testing.assert_array_equal(q[1], [0, 0])


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="weight_bits: the integer path supports 8 and 4, got 3"):
        QuantizeConfig(weight_bits=3)
    with pytest.raises(ValueError, match="group_size: groups need weight_bits = 4"):
        QuantizeConfig(group_size=128)
    with pytest.raises(ValueError, match="weight_clip_grid: ratios must lie in"):
        QuantizeConfig(weight_bits=4, weight_clip_grid=[1.5])


def _mlp() -> ir.Model:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [
            numpy_helper.from_array(a, n)
            for n, a in {
                "w1": rng.standard_normal((8, 16)).astype(np.float32),
                "b1": rng.standard_normal(16).astype(np.float32),
                "w2": rng.standard_normal((3, 16)).astype(np.float32),
                "b2": rng.standard_normal(3).astype(np.float32),
            }.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ir.serde.deserialize_model(model)


def test_qdq_structure_and_onnxruntime_agrees_with_float() -> None:
    model = _mlp()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(8)]
    float_out = [
        ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, b)[0] for b in batches
    ]
    ranges = calibrate(model, batches, progress=False)
    QuantizeQDQPass(ranges)(model)
    ops = [n.op_type for n in model.graph]
    # input, relu output and graph output are quantized; the Gemm before the ReLU is not (fused)
    assert ops.count("QuantizeLinear") == 3
    assert ops.count("DequantizeLinear") == 3 + 4  # + two weights and two int32 biases
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert {w.inputs[0].dtype for w in weights} == {ir.DataType.INT8, ir.DataType.INT32}
    assert [n.attributes.get_int("axis") for n in weights] == [
        1,
        0,
        0,
        0,
    ]  # w1 is [K, N]; w2 (transB) is [N, K]
    proto = ir.serde.serialize_model(model).SerializeToString()
    # onnxruntime's fused QDQ kernels (on by default) run the graph, but on AVX2 their u8 x s8 products
    # saturate (vpmaddubsw), so only the unfused QDQ semantics are compared with float here.
    default = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    assert default.run(None, batches[0])[0].shape == (4, 3)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    for batch, want in zip(batches, float_out, strict=True):
        got = session.run(None, batch)[0]
        assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_missing_range_is_a_calibration_error() -> None:
    with pytest.raises(CalibrationError, match="no range for tensor 'x'"):
        QuantizeQDQPass({})(_mlp())


def test_dynamic_weight_is_rejected_with_the_node_name() -> None:
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "x2"], ["y"], name="dynamic_gemm")],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(UnsupportedOpError, match="dynamic_gemm.*constant initializer"):
        QuantizeQDQPass({"x": 1.0, "x2": 1.0, "y": 1.0})(model)


def test_mse_observer_minimises_the_quantization_error() -> None:
    from qcompiler.passes.quantize import MSEObserver

    rng = np.random.default_rng(0)
    data = rng.standard_normal(200_000)
    observer = MSEObserver()
    for chunk in np.split(data, 10):
        observer.update(chunk)
    chosen = observer.absmax()

    def error(threshold: float) -> float:
        step = threshold / 127
        q = np.clip(np.round(data / step), -127, 127) * step
        return float(np.mean((data - q) ** 2))

    grid = np.linspace(1.0, np.abs(data).max(), 400)
    best = grid[int(np.argmin([error(t) for t in grid]))]
    assert chosen < np.abs(data).max()  # it clips the Gaussian tail, unlike min-max
    assert error(chosen) <= 1.05 * error(best)
    uniform = MSEObserver()
    uniform.update(rng.uniform(-1, 1, 100_000))
    assert uniform.absmax() > 0.98  # nothing to clip in a bounded uniform


def _two_layer_model(rng: np.random.Generator) -> tuple[ir.Model, np.ndarray, np.ndarray, np.ndarray]:
    """``x -> MatMul(W1) -> Relu -> MatMul(W2)`` with correlated inputs (what makes GPTQ pay)."""
    w1 = (rng.standard_normal((48, 64)) / 7).astype(np.float32)
    w2 = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    mix = rng.standard_normal((48, 48)) / 7 + np.eye(48)
    x = (rng.standard_normal((512, 48)) @ mix * rng.uniform(0.5, 3.0, 48)).astype(np.float32)
    return model, x, w1, w2


def _dequantized_weight(model: ir.Model, name: str) -> np.ndarray:
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].name == f"{name}_quantized":
            q = node.inputs[0].const_value.numpy().astype(np.float64)
            return q * node.inputs[1].const_value.numpy().astype(np.float64).reshape(1, -1)
    raise AssertionError(f"no dequantized {name}")


def test_gptq_weights_lower_the_layer_error_on_calibration_inputs() -> None:
    """weight_quantizer = "gptq": same int8 per-channel format and scales as RTN, lower ``||X (W_q - W)||``
    on the inputs the layer saw in calibration (the Hessian's data)."""
    import dataclasses

    from qcompiler.calibrate import observe

    errors = {}
    for quantizer in ("rtn", "gptq"):
        model, x, w1, _ = _two_layer_model(np.random.default_rng(0))
        ranges = observe(model, [{"x": x}], progress=False, hessians=quantizer == "gptq")
        config = dataclasses.replace(QuantizeConfig(), weight_quantizer=quantizer)
        QuantizeQDQPass(ranges.thresholds, config, hessians=ranges.hessians)(model)
        errors[quantizer] = np.linalg.norm(x.astype(np.float64) @ (_dequantized_weight(model, "w1") - w1))
    assert errors["gptq"] < 0.9 * errors["rtn"], errors  # measured 0.65


def test_gptq_without_hessians_names_the_layer() -> None:
    model, x, _, _ = _two_layer_model(np.random.default_rng(1))
    thresholds = calibrate(model, [{"x": x}], progress=False)
    with pytest.raises(CalibrationError, match="no input Hessian for .*hessians=True"):
        QuantizeQDQPass(thresholds, QuantizeConfig(weight_quantizer="gptq"))(model)
    with pytest.raises(ValueError, match="weight_quantizer: must be 'rtn' or 'gptq'"):
        QuantizeConfig(weight_quantizer="awq")


# --- int4 weights: blocked INT4 QDQ, lowered to QGemmInt4 ------------------------------------------------------


def _int4_qdq(model: ir.Model, batches, **config) -> ir.Model:
    from qcompiler.calibrate import observe

    ranges = observe(model, batches, progress=False, hessians=config.get("weight_quantizer") == "gptq")
    QuantizeQDQPass(ranges.thresholds, QuantizeConfig(weight_bits=4, **config), hessians=ranges.hessians)(model)
    return model


def _output_step(model: ir.Model) -> float:
    (dq,) = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.outputs[0] in model.graph.outputs]
    return float(dq.inputs[1].const_value.numpy())


@pytest.mark.parametrize(("group_size", "quantizer"), [(4, "rtn"), (16, "gptq"), (0, "rtn"), (5, "rtn")])
def test_int4_weights_lower_to_qgemm_int4_within_one_output_step(group_size: int, quantizer: str) -> None:
    """Gemm (with biases, transB and not) at int4 per group (or per channel): an INT4 blocked
    DequantizeLinear that onnxruntime runs, lowered to QGemmInt4 whose integer outputs stay within one output
    quantization step of the QDQ graph's."""
    from qcompiler.dialect import run_reference
    from qcompiler.passes.fuse import FuseIntegerLinearPass
    from qcompiler.passes.lower import LowerQDQToIntegerPass, float_ops_inside

    model = _mlp()
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(8)]
    _int4_qdq(model, batches, group_size=group_size, weight_quantizer=quantizer)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert len(weights) == 2
    if 0 < group_size < 8:
        assert [n.attributes.get_int("block_size", 0) for n in weights] == [group_size, group_size]
        assert [n.attributes.get_int("axis") for n in weights] == [0, 1]  # along K: w1 is [K, N], w2 [N, K]
    else:
        assert all(n.attributes.get_int("block_size", 0) == 0 for n in weights)
    proto = ir.serde.serialize_model(model)
    proto.ir_version = 10
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    simulated = [session.run(None, b)[0] for b in batches]
    for got, batch in zip(simulated, batches, strict=True):
        np.testing.assert_allclose(got, run_reference(proto, batch)[0], rtol=1e-5, atol=1e-5)
    step = _output_step(model)
    LowerQDQToIntegerPass()(model)
    FuseIntegerLinearPass()(model)
    assert float_ops_inside(model) == []
    gemms = [n for n in model.graph if n.op_type == "QGemmInt4"]
    assert len(gemms) == 2 and not any(n.op_type in ("QGemm", "MatMulInteger") for n in model.graph)
    assert all(n.inputs[1].dtype == ir.DataType.UINT8 for n in gemms)  # two codes per byte
    integer = ir.serde.serialize_model(model)
    for batch, want in zip(batches, simulated, strict=True):
        assert np.abs(run_reference(integer, batch)[0] - want).max() <= step * (1 + 1e-5)


def test_int4_needs_opset_21_and_grid_scales() -> None:
    from qcompiler.passes.lower import LowerQDQToIntegerPass

    model = _mlp()
    model.opset_imports[""] = 20
    with pytest.raises(ir.passes.PreconditionError, match="weight_bits = 4 needs opset >= 21.*upgrade-opset"):
        QuantizeQDQPass({"x": 1.0}, QuantizeConfig(weight_bits=4))(model)
    model = _mlp()
    rng = np.random.default_rng(3)
    _int4_qdq(model, [{"x": rng.standard_normal((4, 8)).astype(np.float32)}], group_size=4)
    scale = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4)
    values = scale.inputs[1].const_value.numpy().copy()
    values.flat[0] *= 0.9137  # off the 1/2^B grid: another tool's group scales
    scale.inputs[1].const_value = ir.tensor(values, name=scale.inputs[1].name)
    with pytest.raises(UnsupportedOpError, match="int4 group scales are not multiples of 1/2\\^8"):
        LowerQDQToIntegerPass()(model)


# --- SmoothQuant alpha searched per tensor -------------------------------------------------------------------


def _outlier_layer(rng: np.random.Generator, channels: int = 64, outputs: int = 48, tokens: int = 4096):
    scale = np.ones(channels)
    scale[rng.choice(channels, 4, replace=False)] = rng.uniform(20, 60, 4)  # LLM-like outlier channels
    x = rng.standard_normal((tokens, channels)) * scale
    w = rng.standard_normal((channels, outputs)) * rng.uniform(0.5, 2.0, (channels, 1))
    return x, w


def _measured_error(x: np.ndarray, w: np.ndarray, t: np.ndarray) -> float:
    """Quantize x per channel at t, read at t0 = max t with t/t0 folded into int8 per-column weights."""
    ratio = t / t.max()
    codes = np.clip(np.round(x / t), -127, 127)
    folded = w * ratio[:, None]
    sigma = np.abs(folded).max(axis=0) / 127
    w_hat = np.round(folded / sigma) * sigma
    y_hat = (codes * t.max()) @ w_hat
    return float(((y_hat - x @ w) ** 2).sum(axis=1).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_migration_error_predicts_the_measured_output_error(seed: int) -> None:
    """The expected-error model behind the alpha search matches simulated rounding within 10 % at every alpha,
    so its minimiser is the measured one (up to the grid's neighbours)."""
    from qcompiler.passes.quantize.qdq import balanced_scales, migration_error

    rng = np.random.default_rng(seed)
    x, w = _outlier_layer(rng)
    ranges, w_absmax, second = np.abs(x).max(axis=0), np.abs(w).max(axis=1), (x**2).mean(axis=0)
    grid = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    predicted, measured = [], []
    for alpha in grid:
        t = balanced_scales(ranges, w_absmax, alpha).astype(np.float64)
        predicted.append(migration_error(t, [w], second))
        measured.append(_measured_error(x, w, t))
    np.testing.assert_allclose(predicted, measured, rtol=0.1)  # measured within 7 %
    assert abs(int(np.argmin(predicted)) - int(np.argmin(measured))) <= 1


def test_searched_alpha_is_the_model_minimiser_and_sets_the_scales() -> None:
    """A norm output with outlier channels read by two linears: the QDQ pass picks, per tensor, the grid alpha
    minimising :func:`migration_error` over both readers (E[x^2] from the calibration Hessian), and quantizes the
    tensor with exactly that alpha's scales."""
    from qcompiler.calibrate import observe
    from qcompiler.passes.quantize.qdq import balanced_scales, migration_error

    rng = np.random.default_rng(4)
    x, w = _outlier_layer(rng, tokens=1024)
    w2 = rng.standard_normal((64, 32))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Gelu", ["r"], ["n"]),
        helper.make_node("MatMul", ["n", "w1"], ["a"]),
        helper.make_node("MatMul", ["n", "w2"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "gelu_readers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 48]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(w.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    feeds = {"x": np.abs(x).astype(np.float32)}
    ranges = observe(model, [feeds], progress=False, hessians=True)
    grid = [0.3, 0.5, 0.7, 0.9]
    config = QuantizeConfig(migration_alpha=1.0, migration_alpha_grid=grid)
    readers = [w.astype(np.float32).astype(np.float64), w2.astype(np.float32).astype(np.float64)]
    stats = ranges.channel_absmax["n"]
    w_absmax = np.maximum(np.abs(readers[0]).max(axis=1), np.abs(readers[1]).max(axis=1))
    second = np.diag(ranges.hessians["n"]) / 2
    expected = {a: migration_error(balanced_scales(stats, w_absmax, a), readers, second) for a in [*grid, 1.0]}
    quantizer = QuantizeQDQPass(ranges.thresholds, config, ranges.channel_absmax, ranges.hessians)
    quantizer(model)
    best = min(expected, key=lambda a: expected[a])
    assert quantizer.searched_alpha == {"n": best} and 0.3 < best < 1.0, (quantizer.searched_alpha, expected)
    (quant,) = [q for q in model.graph if q.op_type == "QuantizeLinear" and q.inputs[0].name == "n"]
    np.testing.assert_allclose(quant.inputs[1].const_value.numpy(), balanced_scales(stats, w_absmax, best), rtol=1e-6)
    with pytest.raises(ValueError, match="migration_alpha_grid: values must lie in"):
        QuantizeConfig(migration_alpha_grid=[0.0])


@pytest.mark.parametrize(("factor", "wide"), [(6.0, True), (1e-4, False)])
def test_scores_outside_the_softmax_bounds_get_a_scale_inside_not_an_error(factor: float, wide: bool) -> None:
    """Attention scores of range ~300 would need an int8 step above ln2, which IntSoftmax cannot read: the default
    recipe stores them int16 instead; scores of range ~1e-4 would need a step below ln2 / 2^14: their step is
    raised to it (a choice of scale, never an error to the user). The integer graph keeps agreeing op by op with
    its simulation."""
    import onnx
    from hypothesis import HealthCheck, given, settings

    from qcompiler.api import quantize_to_integer
    from qcompiler.dialect.reference import run_reference
    from qcompiler.testing import attention_models
    from qcompiler.testing.lowering import assert_lowering_matches

    @settings(max_examples=3, derandomize=True, suppress_health_check=list(HealthCheck), deadline=None)
    @given(attention_models().filter(lambda g: g.input_shape[0] >= 4 and g.input_shape[1] >= 4))
    def check(generated) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(generated.model)
        norm_inputs = {name for n in model.graph.node if n.op_type == "LayerNormalization" for name in n.input}
        for tensor in model.graph.initializer:  # scale every projection and bias: scores of range ~300 or ~1e-5
            if tensor.data_type == onnx.TensorProto.FLOAT and tensor.dims and tensor.name not in norm_inputs:
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * factor, tensor.name))
        calibration = generated.inputs(4)
        qdq, integer, _, _ = quantize_to_integer(model, calibration=calibration, progress=False)
        softmax = next(n for n in integer.graph if n.op_type == "IntSoftmax")
        assert softmax.inputs[0].dtype == (ir.DataType.INT16 if wide else ir.DataType.INT8)
        assert_lowering_matches(qdq, integer, generated.inputs(2, offset=1))
        assert np.isfinite(run_reference(ir.serde.serialize_model(integer), calibration[0])[0]).all()

    check()


@pytest.mark.parametrize("make", [MinMaxObserver, PercentileObserver])
def test_observers_ignore_mask_infinities(make) -> None:
    """An additive attention mask puts -inf (and fully masked rows NaN) in the tensors it touches: the range is
    that of the finite values, not an error or an infinite threshold."""
    observer = make()
    values = np.array([[0.5, -2.0, -np.inf], [np.nan, 1.0, -np.inf]], np.float32)
    observer.update(values)
    assert observer.absmax() == pytest.approx(2.0, rel=1e-3)


def test_dead_weight_channels_with_a_live_bias_get_the_scale_their_bias_needs() -> None:
    """After BatchNorm folding a channel can keep weights of 1e-36 and a bias of 0.5 (PP-OCR's detector): its int8
    scale max|W_c| / 127 would put the bias far beyond int32. The channel's scale is raised until the bias fits
    (its weights round to 0 either way), and the integer graph stays within one step of the QDQ graph."""
    from qcompiler.api import quantize_to_integer
    from qcompiler.testing import assert_lowering_matches, assert_within_quantization_step

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 2, 1, 1)).astype(np.float32)
    w[1] = 1e-36
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.1, 0.5, -0.2], np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    batches = [{"x": rng.standard_normal((1, 2, 3, 3)).astype(np.float32)} for _ in range(4)]
    qdq, integer, _, _ = quantize_to_integer(model, calibration=batches, progress=False)
    assert_within_quantization_step(qdq, integer, batches[2:])
    assert_lowering_matches(qdq, integer, batches[2:])
    out = ort.InferenceSession(ir.serde.serialize_model(qdq).SerializeToString()).run(None, batches[0])[0]
    assert np.allclose(out[0, 1], 0.5, atol=0.01)  # the dead channel outputs its bias


def _cache_graph(past_first: bool, second_reader: bool) -> ir.Model:
    """``y = Concat(past, x @ w)`` (the cache's Concat), optionally ``past`` read a second time."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["new"]),
             helper.make_node("Concat", ["past", "new"] if past_first else ["new", "past"], ["y"], axis=0)]  # fmt: skip
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 4])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["past"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("past", TensorProto.FLOAT, [3, 4])]  # fmt: skip
    graph = helper.make_graph(nodes, "cache", inputs, outputs, initializer=[w])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_cache_input_takes_the_scale_of_the_values_appended_to_it() -> None:
    model = _cache_graph(past_first=True, second_reader=False)
    rng = np.random.default_rng(2)
    batches = [{"x": rng.standard_normal((2, 4)).astype(np.float32), "past": 9 * rng.standard_normal((3, 4))
                .astype(np.float32)} for _ in range(4)]  # fmt: skip
    QuantizeQDQPass(calibrate(model, batches, progress=False), cache_inputs=frozenset({"past"}))(model)
    quantizers = {n.inputs[0].name: n for n in model.graph if n.op_type == "QuantizeLinear"}
    past_scale = quantizers["past"].inputs[1].const_value.numpy()
    new_scale = quantizers["new"].inputs[1].const_value.numpy()
    assert past_scale == new_scale  # the new values' scale, not the past's own (9x wider) range
    concat = next(n for n in model.graph if n.op_type == "Concat")
    output_q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0] is concat.outputs[0])
    assert output_q.inputs[1].const_value.numpy() == new_scale


@pytest.mark.parametrize(("past_first", "second_reader", "match"), [
    (False, False, "first of two Concat inputs"),
    (True, True, "has 2 readers"),
])  # fmt: skip
def test_a_cache_input_read_otherwise_is_refused_by_name(past_first: bool, second_reader: bool, match: str) -> None:
    model = _cache_graph(past_first, second_reader)
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((2, 4)).astype(np.float32),
                "past": rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(2)]  # fmt: skip
    with pytest.raises(UnsupportedOpError, match=match):
        QuantizeQDQPass(calibrate(model, batches, progress=False), cache_inputs=frozenset({"past"}))(model)
