"""Number formats (passes/quantize/formats.py): the element grids equal ONNX's own casts, the scale rules are the
MX and NV definitions, the ONNX simulation subgraph equals the numpy definition bit for bit, and the QDQ export
dequantizes to the same values."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from qcompiler.passes.quantize.formats import (
    FORMATS,
    block_scales,
    export_weight,
    fake_quantize_graph,
    number_format,
    quantize,
    round_elements,
)

FLOAT_ELEMENTS = {"fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN, "fp8_e5m2": onnx.TensorProto.FLOAT8E5M2,
                  "mxfp4": onnx.TensorProto.FLOAT4E2M1}  # fmt: skip


def _onnx_cast(values: np.ndarray, to: int) -> np.ndarray:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=to, saturate=1), helper.make_node("Cast", ["y"], ["z"], to=1)]
    graph = helper.make_graph(
        nodes, "cast", [helper.make_tensor_value_info("x", 1, [None])], [helper.make_tensor_value_info("z", 1, [None])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return ReferenceEvaluator(model).run(None, {"x": values})[0]


def _awkward_values(rng: np.random.Generator, top: float) -> np.ndarray:
    """Random magnitudes over the whole range, subnormals, exact grid points and the ties between them, zeros,
    and values past the largest (saturation)."""
    spread = np.exp2(rng.uniform(-20, np.log2(top) + 2, 4000)) * rng.choice([-1, 1], 4000)
    grid = np.exp2(np.arange(-12, int(np.log2(top)) + 1, dtype=np.float64))
    ties = np.concatenate([grid * 1.0625, grid * 1.125, grid * 1.25, grid * 1.75, grid * 1.875])
    return np.concatenate([spread, grid, -grid, ties, [0.0, top, -top, top * 1.04, top * 8]]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FLOAT_ELEMENTS))
def test_fp_elements_equal_onnx_saturating_cast(name) -> None:
    fmt = FORMATS[name]
    values = _awkward_values(np.random.default_rng(0), fmt.max_value)
    np.testing.assert_array_equal(round_elements(values, fmt), _onnx_cast(values, FLOAT_ELEMENTS[name]))


def test_integer_elements_are_symmetric_codes_at_their_fraction() -> None:
    mxint8, mxint4 = FORMATS["mxint8"], FORMATS["mxint4"]
    assert (mxint8.qmax, mxint8.max_value, mxint8.emax) == (127, 127 / 64, 0)
    assert (mxint4.qmax, mxint4.max_value, mxint4.emax) == (7, 1.75, 0)
    np.testing.assert_array_equal(round_elements(np.array([1.99, -5.0, 0.3, 0.375], np.float32), mxint4),
                                  [1.75, -1.75, 0.25, 0.5])  # fmt: skip


def test_mx_block_scale_is_the_ocp_shared_exponent() -> None:
    """X = 2^(floor(log2 max|x|) - emax) per block of 32; the block's largest element then saturates at most."""
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = 0.01
    x[0, 5] = 5.9  # mxfp4: emax 2, floor(log2 5.9) = 2: X = 1, 5.9 -> 6
    x[0, 32:] = -3.0  # floor(log2 3) = 1: X = 2^-1, -3 -> -6 (x 0.5)
    fmt = FORMATS["mxfp4"]
    np.testing.assert_array_equal(block_scales(x, fmt)[0, :, 0], [1.0, 0.5])
    out = quantize(x, fmt)
    assert out[0, 5] == 6.0 and np.all(out[0, 32:] == -3.0) and out[0, 0] == 0.0  # 0.01 under X = 1: below 0.25
    assert block_scales(np.zeros((2, 32), np.float32), fmt).ravel().tolist() == [1.0, 1.0]


def test_an_nv_block_below_its_scales_range_reads_as_zeros() -> None:
    """A block whose E4M3 scale underflows (its peak below about 2e-6 of its slice's) has scale 0, as NVFP4 stores
    it, so its elements read as 0, in the definition, in the ONNX simulation and in the QDQ export alike."""
    x = np.full((1, 1, 32), 1.0, np.float32)
    x[0, 0, :16] = 1e9  # the slice's peak; the second block's scale then underflows
    fmt = FORMATS["nvfp4"]
    assert block_scales(x, fmt)[0, 0, 1, 0] == 0.0
    assert np.all(quantize(x, fmt)[0, 0, 16:] == 0.0) and quantize(x, fmt)[0, 0, 0] == 1e9 * np.float32(1.0)
    np.testing.assert_array_equal(_run_graph_subgraph(x, "nvfp4"), quantize(x, fmt))


def test_nv_block_scale_is_e4m3_under_the_slice_scale() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    fmt = FORMATS["nvfp4"]
    scales = block_scales(x, fmt)[..., 0]
    outer = np.abs(x).max(axis=1, keepdims=True) / np.float32(6 * 448)
    inner = scales / outer
    np.testing.assert_allclose(inner, round_elements(inner, FORMATS["fp8_e4m3"]), rtol=1e-6)
    assert np.all(np.abs(x - quantize(x, fmt)) <= np.repeat(scales, 16, axis=1) * 2.0 + 1e-6)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantize_is_idempotent_and_bounded(name) -> None:
    fmt = FORMATS[name]
    x = np.random.default_rng(2).standard_t(3, size=(4, 96)).astype(np.float32)
    once = quantize(x, fmt)
    if fmt.block_scale == "e8m0":  # power-of-two scales: exact
        np.testing.assert_array_equal(quantize(once, fmt), once)
    else:  # a float scale divides and multiplies back within float32 rounding
        np.testing.assert_allclose(quantize(once, fmt), once, rtol=4e-7)
    relative = np.linalg.norm(once - x) / np.linalg.norm(x)
    assert relative < {8: 0.05, 4: 0.3}[fmt.bits], relative


def _run_graph_subgraph(x: np.ndarray, fmt_name: str, clip: float = 1.0) -> np.ndarray:
    fmt = FORMATS[fmt_name]
    value = ir.Value(name="x", shape=ir.Shape([None, x.shape[1], x.shape[2]]), type=ir.TensorType(ir.DataType.FLOAT))
    identity = ir.node("Identity", [value])
    graph = ir.Graph([value], [identity.outputs[0]], nodes=[identity], opset_imports={"": 21})
    identity.outputs[0].name, identity.outputs[0].dtype = "y", ir.DataType.FLOAT
    out = fake_quantize_graph(graph, value, fmt, identity, clip=clip)
    identity.replace_input_with(0, out)
    import onnxruntime as ort

    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_onnx_simulation_equals_the_definition(name) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_t(2, size=(2, 5, 64)) * np.exp2(rng.integers(-8, 8, size=(2, 5, 1)))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 1, :32] = 0.0  # an all-zero block
    x[1, 2, 3] = 4.0  # an exact power of two at a block's peak
    clip = 0.9 if FORMATS[name].block_size is None else 1.0
    np.testing.assert_array_equal(_run_graph_subgraph(x, name, clip), quantize(x, FORMATS[name], clip=clip))


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(FORMATS)), st.integers(-30, 30), st.integers(0, 2**31 - 1))
def test_onnx_simulation_equals_the_definition_at_any_magnitude(name, exponent, seed) -> None:
    x = np.random.default_rng(seed).normal(size=(1, 3, 32)).astype(np.float32) * np.float32(2.0**exponent)
    np.testing.assert_array_equal(_run_graph_subgraph(x, name), quantize(x, FORMATS[name]))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_qdq_export_dequantizes_to_the_simulated_weight(name) -> None:
    fmt = FORMATS[name]
    weight = np.random.default_rng(4).normal(size=(64, 24)).astype(np.float32) * 0.05
    weight[:, 3] = 0.0  # a dead output channel
    weight[:32, 5], weight[32:, 5] = 1e6, 1e-3  # an NV block whose scale underflows: zeros in every form
    x = ir.Value(name="x", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    matmul = ir.node("MatMul", [x, x])
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=[matmul], opset_imports={"": 23}, name="export")
    matmul.outputs[0].name, matmul.outputs[0].dtype = "y", ir.DataType.FLOAT
    matmul.outputs[0].shape = ir.Shape([2, 24])
    restored = export_weight(graph, weight, fmt, "w", before=matmul)
    matmul.replace_input_with(1, restored)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=11))
    onnx.checker.check_model(proto)
    stored = next(t for t in proto.graph.initializer if t.name.endswith(fmt.name))
    assert stored.data_type == fmt.onnx_type.value
    inputs = np.eye(64, dtype=np.float32)[:2]
    expected = quantize(weight, fmt, axis=0)
    np.testing.assert_array_equal(ReferenceEvaluator(proto).run(None, {"x": inputs})[0], inputs @ expected)


def test_graph_floor_log2_is_exact_at_every_power_of_two() -> None:
    """The subgraph's ``floor(log2 v)`` (Log, then a correction of one either way) equals the binary exponent at
    and on both sides of every float32 power of two, where Log's rounding alone is wrong about a third of the
    time."""
    import math

    import onnxruntime as ort

    from qcompiler.passes.quantize.formats import _Builder, floor_log2

    powers = np.exp2(np.arange(-126, 128)).astype(np.float32)
    values = np.concatenate([powers, np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf))])
    values = values[np.isfinite(values)]
    x = ir.Value(name="x", shape=ir.Shape([len(values)]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="floor_log2")
    builder = _Builder(graph, "t")
    out = builder.floor_log2(x)
    guess = builder.nodes[2].outputs[0]  # Floor(Log(v) / ln 2): what the correction starts from
    for node in builder.nodes:
        graph.append(node)
    out.name, guess.name = "exponent", "guess"
    graph.outputs.extend([out, guess])
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    exponent, uncorrected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": values}
    )
    np.testing.assert_array_equal(exponent, floor_log2(values))
    assert np.mean(uncorrected != floor_log2(values)) > 0.1  # the case the correction exists for
    assert math.isclose(float(floor_log2(np.float32(1.0))), 0.0)


def test_unknown_format_and_ragged_blocks_are_named_errors() -> None:
    with pytest.raises(ValueError, match="unknown number format 'mxfp3'.*mxfp4"):
        number_format("mxfp3")
    with pytest.raises(ValueError, match="mxint4: the reduction axis has 40 elements, not a multiple of the block"):
        quantize(np.ones((2, 40), np.float32), FORMATS["mxint4"])


# -- the float simulation (FakeQuantizePass) and the integer path's formats ---------------------------------------


def _two_linears(rng: np.random.Generator, transposed: bool = False):
    """x [3, 64] -> MatMul [64, 32] -> Relu -> Gemm [32, 16] (its weight stored [16, 32] with transB)."""
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    stored = w2.T.copy() if transposed else w2
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=int(transposed))]  # fmt: skip
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 16])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(stored, "w2")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return ir.serde.deserialize_model(proto), w1, w2


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "fp8_e4m3", "mxint8"])
@pytest.mark.parametrize("export", [False, True])
def test_fake_quantize_pass_rounds_weights_and_activations_to_the_format(name, export) -> None:
    """y = Q(relu(Q(x) Q(W1))) Q(W2), Q the format (activations per token or block along their last axis, weights
    along their input axis); with ``export_weights`` the weights are stored in the format's ONNX type behind a
    DequantizeLinear (run here by onnx.reference: onnxruntime has no FLOAT4E2M1 kernel) and give the same output."""
    from qcompiler.passes.quantize.fake import FakeQuantConfig, FakeQuantizePass

    rng = np.random.default_rng(6)
    model, w1, w2 = _two_linears(rng, transposed=True)
    x = (rng.standard_normal((3, 64)) * rng.uniform(0.1, 10, (3, 1))).astype(np.float32)
    fmt = FORMATS[name]
    config = FakeQuantConfig(weight_format=name, activation_format=name, activation_bits=None, export_weights=export)
    assert FakeQuantizePass(config)(model).modified
    proto = ir.serde.serialize_model(model)
    stored = {t.data_type for t in proto.graph.initializer}
    assert (fmt.onnx_type.value in stored) == export
    got = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    hidden = np.maximum(quantize(x, fmt) @ quantize(w1, fmt, axis=0), 0)
    want = quantize(hidden, fmt) @ quantize(w2, fmt, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_format_errors_name_the_key_and_the_layer() -> None:
    from qcompiler.config import _simulate_config
    from qcompiler.passes.quantize.fake import FakeQuantConfig, FakeQuantizePass
    from qcompiler.passes.quantize.qdq import QuantizeConfig

    with pytest.raises(ValueError, match="activation_format: format: unknown number format 'fp6'"):
        FakeQuantConfig(activation_format="fp6")
    with pytest.raises(ValueError, match="weight_format 'mxfp4': rounds to nearest; weight_quantizer must be 'rtn'"):
        FakeQuantConfig(weight_format="mxfp4", weight_quantizer="gptq")
    with pytest.raises(ValueError, match="export_weights: needs a weight_format"):
        FakeQuantConfig(export_weights=True)
    parsed = _simulate_config({"weight_format": "nvfp4", "activation_format": "nvfp4"})
    assert (parsed.weight_format, parsed.activation_format, parsed.activation_bits) == ("nvfp4", "nvfp4", None)
    ragged = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "ragged",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 40])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, 16])],
        [onnx.numpy_helper.from_array(np.ones((40, 16), np.float32), "w")],
    )  # fmt: skip

    def model() -> ir.Model:
        return ir.serde.deserialize_model(helper.make_model(ragged, opset_imports=[helper.make_opsetid("", 23)]))

    with pytest.raises(ValueError, match="proj.*mxint4: the reduction axis has 40 elements, not a multiple of"):
        FakeQuantizePass(FakeQuantConfig(weight_format="mxint4", activation_bits=None))(model())
    with pytest.raises(ValueError, match="mxfp4: input 'x' has last axis 40; blocks of 32"):
        FakeQuantizePass(FakeQuantConfig(weight_format="int8", activation_format="mxfp4"))(model())
    with pytest.raises(ValueError, match=r"integer path compiles \['int4', 'mxint4'\].*got 'mxfp4'"):
        QuantizeConfig(weight_bits=4, group_size=32, weight_format="mxfp4")
    with pytest.raises(ValueError, match="'mxint4': needs 4-bit weights and group_size = 32.*group_size 128"):
        QuantizeConfig(weight_bits=4, group_size=128, weight_format="mxint4")
