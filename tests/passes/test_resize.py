"""DecomposeResizePass (decompose-resize): linear and nearest Resize as MatMuls by interpolation matrices and Gathers,
equal to onnx.reference (float64) and onnxruntime (float32) over every coordinate transformation, up and down,
non-square; a small CNN with a Resize compiles integer-only, within one step of its QDQ graph op by op and
bit-exact on TVM; what it leaves (cubic, fractional lengths) is refused by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.dialect import run_reference
from qcompiler.errors import UnsupportedOpError
from qcompiler.passes.canonicalize import DecomposeResizePass
from qcompiler.passes.canonicalize.resize import plan_resize, resize_refusal
from qcompiler.testing import (
    assert_bit_exact,
    assert_float_exact_pass,
    assert_lowering_matches,
    assert_within_quantization_step,
)

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
SHAPE = (1, 2, 5, 7)
#: (scales, sizes) over the four axes: up, down, non-square both ways, one axis only
RESIZES = {
    "up-scales": ([1.0, 1.0, 2.0, 3.0], None),
    "down-scales": ([1.0, 1.0, 0.4, 3 / 7], None),
    "up-sizes": (None, [1, 2, 9, 11]),
    "down-sizes": (None, [1, 2, 3, 4]),
    "up-and-down": (None, [1, 2, 8, 3]),
    "width-only": (None, [1, 2, 5, 12]),
}


def resize_model(
    mode: str,
    scales: list[float] | None,
    sizes: list[int] | None,
    shape: tuple[int, ...] = SHAPE,
    **attributes: Any,
) -> onnx.ModelProto:
    inputs, inits = ["x", ""], []
    if scales is not None:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        inputs.append("scales")
    else:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        inputs += ["", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], name="resize", mode=mode, **attributes)
    graph = helper.make_graph(
        [node],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options).run(None, {"x": x})[0]


def assert_matches_onnx(model: onnx.ModelProto, ops: set[str], seed: int = 0) -> bool:
    """Rewritten into ``ops`` only, float-exact against onnx.reference in float64 (honest, idempotent), and within
    float32 rounding of onnxruntime's Resize; or left alone because the two runtimes disagree on the Resize itself
    (checked here). Returns whether it was rewritten."""
    x = np.random.default_rng(seed).standard_normal(_shape(model))
    x32 = x.astype(np.float32)
    plan = plan_resize(ir.serde.deserialize_model(model).graph.node(0))
    if isinstance(plan, str):
        assert "disagree" in plan, plan
        assert not DecomposeResizePass()(ir.serde.deserialize_model(model)).modified
        (reference,) = run_reference(model, {"x": x32})
        runtime = _onnxruntime(model, x32)
        assert reference.shape != runtime.shape or not np.allclose(reference, runtime, rtol=0, atol=1e-4)
        return False
    after, modified = assert_float_exact_pass(DecomposeResizePass, model, [{"x": x}], rtol=1e-12)
    assert modified
    assert {node.op_type for node in after.graph} <= ops
    rewritten = ir.serde.serialize_model(DecomposeResizePass()(ir.serde.deserialize_model(model)).model)
    np.testing.assert_allclose(_onnxruntime(rewritten, x32), _onnxruntime(model, x32), rtol=0, atol=2e-6)
    return True


def _shape(model: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)


@pytest.mark.parametrize("antialias", [0, 1])
@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("coordinates", COORDINATE_MODES)
def test_linear_resize_becomes_products_by_interpolation_matrices(
    coordinates: str, resize: str, antialias: int
) -> None:
    model = resize_model("linear", *RESIZES[resize], coordinate_transformation_mode=coordinates, antialias=antialias)
    assert assert_matches_onnx(model, {"MatMul", "Transpose"})


@pytest.mark.parametrize("nearest", NEAREST_MODES)
@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("coordinates", COORDINATE_MODES)
def test_nearest_resize_becomes_gathers(coordinates: str, resize: str, nearest: str) -> None:
    model = resize_model("nearest", *RESIZES[resize], coordinate_transformation_mode=coordinates, nearest_mode=nearest)
    rewritten = assert_matches_onnx(model, {"Gather"})
    assert rewritten or "down" in resize  # ties of a rounding rule: only where a length shrinks by a non-dyadic ratio


def test_axes_attribute_and_unchanged_axes() -> None:
    """Sizes given for H and W only (``axes``); an axis the Resize keeps gets no op."""
    model = resize_model("linear", None, [5, 12], axes=[2, 3])
    assert assert_matches_onnx(model, {"MatMul"})
    after = DecomposeResizePass()(ir.serde.deserialize_model(model)).model
    assert [node.op_type for node in after.graph] == ["MatMul"]


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["linear", "nearest"]),
    coordinates=st.sampled_from(COORDINATE_MODES),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    out=st.tuples(st.integers(1, 13), st.integers(1, 13)),
    seed=st.integers(0, 2**16),
)
def test_any_sizes_match_onnx(
    mode: str, coordinates: str, shape: tuple[int, int, int, int], out: tuple[int, int], seed: int
) -> None:
    model = resize_model(
        mode, None, [shape[0], shape[1], *out], shape=shape, coordinate_transformation_mode=coordinates
    )
    assert_matches_onnx(model, {"MatMul", "Transpose", "Gather", "Identity"}, seed)


# -- end to end: quantized, lowered, on TVM --------------------------------------------------------------------


def decoder_head(mode: str, sizes: list[int], **attributes: Any) -> onnx.ModelProto:
    """Conv -> Relu -> Resize -> 1x1 Conv on [1, 3, 6, 5]: a segmentation head's upsampling between projections."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(sizes, np.int64), "sizes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["u"], name="upsample", mode=mode, **attributes),
        helper.make_node("Conv", ["u", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, sizes[2], sizes[3]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 6, 5)).astype(np.float32)} for _ in range(count)]


@pytest.mark.tvm
@pytest.mark.parametrize(
    ("mode", "sizes", "attributes"),
    [
        pytest.param("linear", [1, 4, 12, 15], {}, id="bilinear-up-half-pixel"),
        pytest.param("linear", [1, 4, 4, 3], {"coordinate_transformation_mode": "align_corners"}, id="bilinear-down"),
        pytest.param("nearest", [1, 4, 12, 10], {"coordinate_transformation_mode": "asymmetric"}, id="nearest-up"),
    ],
)
def test_resize_compiles_integer_only(mode: str, sizes: list[int], attributes: dict[str, str]) -> None:
    from qcompiler.backends.tvm import build

    qdq, integer, _, shapes = quantize_to_integer(
        decoder_head(mode, sizes, **attributes), calibration=_batches(4, 0), progress=False
    )
    probe = _batches(2, 9)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    ops = {node.op_type for node in integer.graph}
    assert "Resize" not in ops
    if mode == "nearest":  # moves int8 values: no rescaling
        gathers = [node for node in integer.graph if node.op_type == "Gather"]
        assert len(gathers) == 2 and all(node.outputs[0].dtype == ir.DataType.INT8 for node in gathers)


# -- refusals ------------------------------------------------------------------------------------------------------


def test_cubic_is_refused_by_name_with_what_to_do() -> None:
    with pytest.raises(
        UnsupportedOpError, match=r"'upsample' \(op Resize\): mode 'cubic' has no integer form"
    ) as error:
        quantize_to_integer(decoder_head("cubic", [1, 4, 12, 10]), calibration=_batches(2, 0), progress=False)
    assert error.value.node_name == "upsample"
    assert "--float-islands" in str(error.value) and "linear or nearest" in str(error.value)


def test_a_fractional_length_from_scales_is_left_with_its_reason() -> None:
    model = ir.serde.deserialize_model(resize_model("linear", [1.0, 1.0, 1.7, 2.0], None))
    assert not DecomposeResizePass()(model).modified
    assert "give sizes instead" in resize_refusal(model.graph.node(0))


def test_a_resize_it_could_take_names_the_missing_pass() -> None:
    model = ir.serde.deserialize_model(resize_model("linear", [1.0, 1.0, 2.0, 2.0], None))
    assert "the canonicalize list has no decompose-resize" in resize_refusal(model.graph.node(0))


def test_an_attribute_combination_a_runtime_rejects_is_left_with_its_reason() -> None:
    model = ir.serde.deserialize_model(resize_model("nearest", [1.0, 1.0, 2.0, 2.0], None, antialias=1))
    assert "cannot run it" in str(plan_resize(model.graph.node(0)))
    assert not DecomposeResizePass()(model).modified
