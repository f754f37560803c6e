"""Dialect schemas and reference semantics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.dialect import DOMAIN, run_reference
from qcompiler.dialect.reference import conv2d_int, requantize


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])


def test_checker_knows_the_dialect() -> None:
    w = np.ones((4, 3), np.int8)
    model = _model(
        [helper.make_node("QGemm", ["x", "w", "b", "m", "s"], ["y"], domain=DOMAIN, lo=0)],
        [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 4])],
        {
            "w": w,
            "b": np.zeros(4, np.int32),
            "m": np.full(4, 1 << 30, np.int32),
            "s": np.full(4, 31, np.int32),
        },
    )
    onnx.checker.check_model(model)
    bad = helper.make_node("QGemm", ["x", "w"], ["y"], domain=DOMAIN)
    model.graph.node[0].CopyFrom(bad)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)


def test_qgemm_is_matmulinteger_add_requantize() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (5, 7)).astype(np.int8)
    w = rng.integers(-128, 128, (3, 7)).astype(np.int8)
    bias = rng.integers(-1000, 1000, 3).astype(np.int32)
    mult = rng.integers(1 << 30, 1 << 31, 3).astype(np.int32)
    shift = np.array([38, 39, 40], np.int32)
    inits = {"w": w, "b": bias, "m": mult, "s": shift, "wt": np.ascontiguousarray(w.T)}
    fused = _model(
        [helper.make_node("QGemm", ["x", "w", "b", "m", "s"], ["y"], domain=DOMAIN, lo=-5, hi=90)],
        [helper.make_tensor_value_info("x", TensorProto.INT8, [5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [5, 3])],
        inits,
    )
    unfused = _model(
        [
            helper.make_node("MatMulInteger", ["x", "wt"], ["acc"]),
            helper.make_node("Add", ["acc", "b"], ["biased"]),
            helper.make_node("Requantize", ["biased", "m", "s"], ["y"], domain=DOMAIN, axis=-1, lo=-5, hi=90),
        ],
        [helper.make_tensor_value_info("x", TensorProto.INT8, [5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [5, 3])],
        inits,
    )
    a = run_reference(fused, {"x": x})[0]
    b = run_reference(unfused, {"x": x})[0]
    expected = requantize(x.astype(np.int64) @ w.astype(np.int64).T + bias, mult, shift, axis=-1, lo=-5, hi=90)
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    assert a.min() >= -5 and a.max() <= 90


def test_conv_reference_matches_onnx_convinteger() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, 4, 9, 7)).astype(np.int8)
    w = rng.integers(-128, 128, (6, 2, 3, 3)).astype(np.int8)
    attrs = {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2], "group": 2}
    model = _model(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.INT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        {"w": w},
    )
    want = run_reference(model, {"x": x})[0]
    got = conv2d_int(x, w, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["group"])
    np.testing.assert_array_equal(got, want)


def test_requantize_rejects_bad_shift() -> None:
    with pytest.raises(ValueError, match="shift"):
        requantize(np.array([1], np.int32), np.array(1 << 30, np.int32), np.array(0, np.int32))


def test_accumulator_overflow_is_an_error() -> None:
    from qcompiler.dialect.reference import qgemm

    x = np.full((1, 140_000), -128, np.int8)
    w = np.full((1, 140_000), -128, np.int8)
    with pytest.raises(OverflowError, match="int32 accumulator overflow"):
        qgemm(x, w, np.zeros(1, np.int32))
