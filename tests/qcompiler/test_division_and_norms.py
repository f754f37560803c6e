"""IntDiv and ISqrt (the quotient of two activations and ReduceL2): the reference against exact rational
arithmetic, TVM bit-exact against the reference at ties, zeros and extremes, and whole blocks (ConvNeXt V2's
global response normalization, an L2-normalized embedding) integer-only and within one step of their QDQ graph."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import quantize_to_integer
from qcompiler.dialect import DOMAIN
from qcompiler.dialect.reference import INT_DIV_MAX_SHIFT, int_div
from qcompiler.testing import assert_bit_exact, assert_lowering_matches, assert_within_quantization_step


def _exact_quotient(a: int, b: int, multiplier: int, shift: int, lo: int, hi: int) -> int:
    """round(a m / (b 2^c)), ties toward +inf, clamped; a zero divisor saturates by the sign of a."""
    if b == 0:
        return hi if a > 0 else lo if a < 0 else 0
    q = Fraction(a * multiplier, b * 2**shift)
    return min(max(math.floor(q + Fraction(1, 2)), lo), hi)


@given(
    a=st.integers(-32768, 32767),
    b=st.integers(-32768, 32767),
    multiplier=st.integers(1, (1 << 31) - 1),
    shift=st.integers(0, INT_DIV_MAX_SHIFT),
)
def test_int_div_is_the_rounded_rational_quotient(a: int, b: int, multiplier: int, shift: int) -> None:
    got = int_div(np.array([a], np.int16), np.array([b], np.int16), multiplier, shift, lo=-32768, hi=32767)
    assert int(got[0]) == _exact_quotient(a, b, multiplier, shift, -32768, 32767)


def test_int_div_rounds_ties_toward_plus_infinity() -> None:
    a = np.array([1, -1, 3, -3, 5, -5], np.int8)
    b = np.array([2, 2, 2, 2, -2, -2], np.int8)  # quotients 0.5, -0.5, 1.5, -1.5, -2.5, 2.5
    assert int_div(a, b, 1, 0).tolist() == [1, 0, 2, -1, -2, 3]


def test_int_div_refuses_a_shift_beyond_its_int64_bound() -> None:
    with pytest.raises(ValueError, match="shift"):
        int_div(np.array([1], np.int8), np.array([1], np.int8), 1 << 30, INT_DIV_MAX_SHIFT + 1)


def _opsets() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]


@pytest.mark.tvm
@pytest.mark.parametrize(("multiplier", "shift", "dtype"), [(1, 0, "int8"), (1 << 30, 31, "int8"),
                                                            (1518500250, 44, "int16"), (123, 46, "int16")])  # fmt: skip
def test_int_div_kernel_is_bit_exact(multiplier: int, shift: int, dtype: str) -> None:
    from qcompiler.backends.tvm import build

    bits = 8 if dtype == "int8" else 16
    elem = TensorProto.INT8 if bits == 8 else TensorProto.INT16
    levels = np.arange(-(1 << (bits - 1)), 1 << (bits - 1), max(1, (1 << bits) // 256), dtype=np.int64)
    a = levels.reshape(-1, 1)  # every dividend against a row of divisors: zeros, signs, extremes, ties
    divisors = np.array([0, 1, -1, 2, -2, 3, 7, -128, 127, levels.min(), levels.max()], np.int64).reshape(1, -1)
    lo, hi = (-128, 127) if bits == 8 else (-32768, 32767)
    graph = helper.make_graph(
        [helper.make_node("IntDiv", ["a", "b", "m", "s"], ["y"], domain=DOMAIN, lo=lo, hi=hi)],
        "div",
        [helper.make_tensor_value_info("a", elem, list(a.shape))],
        [helper.make_tensor_value_info("y", elem, None)],
        [
            numpy_helper.from_array(divisors.astype(dtype), "b"),
            numpy_helper.from_array(np.array(multiplier, np.int32), "m"),
            numpy_helper.from_array(np.array(shift, np.int32), "s"),
        ],
    )
    model = helper.make_model(graph, opset_imports=_opsets())
    assert_bit_exact(lambda proto: build(proto, {"a": list(a.shape)}), model, [{"a": a.astype(dtype)}])


@pytest.mark.tvm
def test_isqrt_kernel_is_bit_exact_at_squares_and_their_neighbours() -> None:
    from qcompiler.backends.tvm import build

    roots = np.array([0, 1, 2, 3, 255, 256, 65535, 65536, (1 << 31) - 1, (1 << 31) - 2], np.int64)
    x = np.unique(np.clip(np.concatenate([roots**2 - 1, roots**2, roots**2 + 1, [(1 << 62) - 1]]), 0, None))
    x = x.reshape(1, -1)
    graph = helper.make_graph(
        [helper.make_node("ISqrt", ["x"], ["y"], domain=DOMAIN)],
        "isqrt",
        [helper.make_tensor_value_info("x", TensorProto.INT64, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
    )
    model = helper.make_model(graph, opset_imports=_opsets())
    assert_bit_exact(lambda proto: build(proto, {"x": list(x.shape)}), model, [{"x": x}])


# --- whole blocks -------------------------------------------------------------------------------------------------
CHANNELS, SIDE = 6, 5


def _model(nodes, inits, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIDE, SIDE, CHANNELS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def grn_model() -> onnx.ModelProto:
    """ConvNeXt V2's global response normalization (channels last) after a projection:
    ``g = ||h||_2 over (H, W)``, ``n = g / (mean_c(g) + eps)``, ``y = gamma (h n) + beta + h``."""
    rng = np.random.default_rng(3)
    inits = {
        "w": rng.standard_normal((CHANNELS, CHANNELS)).astype(np.float32),
        "spatial": np.array([1, 2], np.int64),
        "channel": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "gamma": (0.5 * rng.standard_normal(CHANNELS)).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(CHANNELS)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceL2", ["h", "spatial"], ["g"], keepdims=1),
        helper.make_node("ReduceMean", ["g", "channel"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["me"]),
        helper.make_node("Div", ["g", "me"], ["n"]),
        helper.make_node("Mul", ["h", "n"], ["hn"]),
        helper.make_node("Mul", ["hn", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"]),
        helper.make_node("Add", ["shifted", "h"], ["y"]),
    ]
    return _model(nodes, inits, [1, SIDE, SIDE, CHANNELS])


def l2_normalize_model() -> onnx.ModelProto:
    """A sentence-embedding head: ``h / ||h||_2`` over the last axis."""
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((CHANNELS, CHANNELS)).astype(np.float32), "last": np.array([-1], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceL2", ["h", "last"], ["norm"], keepdims=1),
        helper.make_node("Div", ["h", "norm"], ["y"]),
    ]
    return _model(nodes, inits, [1, SIDE, SIDE, CHANNELS])


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, SIDE, SIDE, CHANNELS)).astype(np.float32)} for _ in range(count)]


@pytest.mark.tvm
@pytest.mark.parametrize("make_model", [grn_model], ids=["grn"])
def test_norm_and_quotient_blocks_are_integer_only(make_model) -> None:
    from qcompiler.backends.tvm import build

    qdq, integer, _, shapes = quantize_to_integer(make_model(), calibration=_batches(4, 0), progress=False)
    ops = {n.op_type for n in integer.graph}
    assert {"ISqrt", "IntDiv"} <= ops and not ops & {"ReduceL2", "Div"}
    probe = _batches(2, 9)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)


def test_division_by_a_constant_tensor_is_a_named_refusal() -> None:
    from qcompiler.errors import UnsupportedOpError

    rng = np.random.default_rng(5)
    inits = {"w": rng.standard_normal((CHANNELS, CHANNELS)).astype(np.float32),
             "d": (1.0 + rng.random(CHANNELS)).astype(np.float32)}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Div", ["h", "d"], ["y"])]
    with pytest.raises(UnsupportedOpError, match="Div"):
        quantize_to_integer(_model(nodes, inits, [1, SIDE, SIDE, CHANNELS]), calibration=_batches(2, 0), progress=False)
