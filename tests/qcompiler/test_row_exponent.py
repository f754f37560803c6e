"""Per-token power-of-two exponents (``qcompiler.RowExponent`` and the ``row_exponent`` input of ``Requantize``
and ``QGemm``): the reference semantics, the QDQ form the quantizer writes (bit for bit the same arithmetic), and
the TVM kernels bit-exact at the int16 extremes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from qcompiler.dialect import DOMAIN, OPSET_VERSION, requantize, run_reference
from qcompiler.dialect.dyadic import ROW_EXPONENT_MAX, round_shift, row_exponents, row_shift
from qcompiler.passes.quantize import row_exponent

INT16 = hnp.arrays(
    np.int16,
    hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9),
    elements=st.integers(-32768, 32767),
)


@settings(max_examples=300, deadline=None)
@given(INT16)
def test_row_exponent_is_the_smallest_that_fits_and_rounds_half_up(x: np.ndarray) -> None:
    e = row_exponents(x).astype(np.int64)
    peak = np.abs(x.astype(np.int64)).max(axis=-1, keepdims=True)
    assert e.shape == (*x.shape[:-1], 1) and e.min() >= 0 and e.max() <= ROW_EXPONENT_MAX
    assert np.all(peak <= 127 << e)  # fits
    assert np.all((e == 0) | (peak > 127 << np.maximum(e - 1, 0)))  # and no smaller exponent does
    y = row_shift(x, e).astype(np.int64)
    assert y.dtype == np.int64 and np.abs(y).max() <= 127
    error = (y << e) - x  # round half up: the error lies in (-2^(e-1), 2^(e-1)]
    half = np.where(e > 0, 1 << np.maximum(e - 1, 0), 0)
    assert np.all((error <= half) & ((error > -half) | (e == 0)))
    assert np.all(np.where(e == 0, y == x, True))


@settings(max_examples=300, deadline=None)
@given(INT16)
def test_int4_levels_fit_or_saturate_at_the_largest_exponent(x: np.ndarray) -> None:
    """qmax = 7 (W4A4's reads): the smallest exponent that fits, codes in [-7, 7]; a row beyond 7 2^9 takes
    exponent 9 and saturates."""
    e = row_exponents(x, 7).astype(np.int64)
    y = row_shift(x, e, 7).astype(np.int64)
    peak = np.abs(x.astype(np.int64)).max(axis=-1, keepdims=True)
    assert e.max() <= ROW_EXPONENT_MAX and np.abs(y).max() <= 7
    fits = peak <= 7 << e
    assert np.all(fits | (e == ROW_EXPONENT_MAX))
    assert np.all((e == 0) | (peak > 7 << np.maximum(e - 1, 0)))
    unclamped = np.where(e == 0, x, round_shift(x, np.maximum(e, 1)))
    np.testing.assert_array_equal(y, np.clip(unclamped, -7, 7))
    assert np.all(np.where(fits, y == unclamped, True))  # the clamp acts only on rows beyond 7 2^9


def test_a_bound_above_qmax_clips_the_peak_instead_of_doubling_the_step() -> None:
    x = np.array([[8, -3, 1], [9, 2, 0], [16, 4, -4], [17, 0, 0]], np.int16)
    e = row_exponents(x, 7, bound=8)
    np.testing.assert_array_equal(e.ravel(), [0, 1, 1, 2])  # 8 fits 8 * 2^0, 9 needs 2^1, 17 needs 2^2
    np.testing.assert_array_equal(row_shift(x, e, 7), [[7, -3, 1], [5, 1, 0], [7, 2, -2], [4, 0, 0]])
    np.testing.assert_array_equal(row_exponents(x, 7), [[1], [1], [2], [2]])  # without the bound: coarser steps


def test_row_exponent_at_the_extremes() -> None:
    x = np.array([[127, -127], [128, 0], [-32768, 32767], [254, -254], [255, 0], [0, 0]], np.int16)
    np.testing.assert_array_equal(row_exponents(x).ravel(), [0, 1, 9, 1, 2, 0])
    np.testing.assert_array_equal(row_shift(x, row_exponents(x)), [[127, -127], [64, 0], [-64, 64], [127, -127],
                                                                    [64, 0], [0, 0]])  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_requantize_row_exponent_shifts_each_row(rows: int, cols: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    acc = rng.integers(-(2**31), 2**31, (rows, cols)).astype(np.int32)
    mult = rng.integers(1 << 30, 1 << 31, cols).astype(np.int32)
    shift = rng.integers(ROW_EXPONENT_MAX + 1, 50, cols).astype(np.int32)
    e = rng.integers(0, ROW_EXPONENT_MAX + 1, (rows, 1)).astype(np.int8)
    got = requantize(acc, mult, shift, axis=-1, lo=-32768, hi=32767, row_exponent=e)
    want = np.clip(round_shift(acc.astype(np.int64) * mult, shift.astype(np.int64) - e), -32768, 32767)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="less the row exponent"):
        requantize(acc, mult, np.full(cols, 3, np.int32), axis=-1, row_exponent=np.full((rows, 1), 3, np.int8))


def _graph_model(nodes, inputs, outputs, inits=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


@settings(max_examples=80, deadline=None)
@given(INT16, st.floats(1e-4, 10.0), st.sampled_from([(127, 127), (7, 7), (7, 8), (127, 141)]))
def test_qdq_form_computes_the_integer_arithmetic_bit_for_bit(codes: np.ndarray, scale: float, levels) -> None:
    """The standard-op form the quantizer writes (passes/quantize/row_exponent.py) gives ``y 2^e u`` with y and e
    exactly RowExponent's, on every int16 input: the QDQ graph and the integer code agree on this step."""
    u = np.float32(scale)
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    graph = model.graph
    x = ir.Value(name="z", type=ir.TensorType(ir.DataType.INT16), shape=ir.Shape(codes.shape))
    graph.inputs.append(x)
    s = ir.Value(
        name="u", const_value=ir.tensor(np.array(u)), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([])
    )
    zero = ir.Value(name="zp", const_value=ir.tensor(np.array(0, np.int16)), type=ir.TensorType(ir.DataType.INT16),
                    shape=ir.Shape([]))  # fmt: skip
    graph.register_initializer(s)
    graph.register_initializer(zero)
    dq = ir.node("DequantizeLinear", [x, s, zero])
    dq.outputs[0].dtype = ir.DataType.FLOAT
    graph.append(dq)
    qmax, bound = levels
    out = row_exponent.insert(graph, dq.outputs[0], float(u), qmax=qmax, bound=bound)
    graph.outputs.append(out)
    assert row_exponent.source_of(out) is dq.outputs[0] and row_exponent.levels_of(out) == (qmax, bound)
    (got,) = run_reference(ir.serde.serialize_model(model), {"z": codes})
    e = row_exponents(codes, qmax, bound)
    want = (row_shift(codes, e, qmax).astype(np.float32) * np.float32(2.0) ** e.astype(np.float32)) * u
    np.testing.assert_array_equal(got, want)


@pytest.mark.tvm
@pytest.mark.parametrize(("m", "n", "k", "qmax", "bound"), [(1, 9, 5, 127, 0), (6, 40, 130, 127, 0),
                                                            (17, 64, 64, 127, 0), (6, 40, 130, 7, 0),
                                                            (17, 64, 64, 7, 9)])  # fmt: skip
def test_row_exponent_and_qgemm_rows_bit_exact_in_tvm(m: int, n: int, k: int, qmax: int, bound: int) -> None:
    """RowExponent -> QGemm(row_exponent) compiled by TVM against the reference: rows at -32768, 32767, 127, 128,
    zero and random ones (exponents 0 to 9), per-channel shifts down to 10."""
    from qcompiler.backends.tvm import build
    from qcompiler.testing import assert_bit_exact

    rng = np.random.default_rng(m * 100 + n + k)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    mult = rng.integers(1 << 30, 1 << 31, n).astype(np.int32)
    shift = rng.integers(ROW_EXPONENT_MAX + 1, 48, n).astype(np.int32)
    shift[0] = ROW_EXPONENT_MAX + 1  # the smallest a row exponent allows
    nodes = [
        helper.make_node("RowExponent", ["x"], ["codes", "e"], domain=DOMAIN, qmax=qmax, bound=bound),
        helper.make_node("QGemm", ["codes", "w", "b", "m", "s", "e"], ["y"], domain=DOMAIN, lo=-32768, hi=32767),
    ]
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.INT16, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, None),
         helper.make_tensor_value_info("e", TensorProto.INT8, None)],
        [("w", w), ("b", np.zeros(n, np.int32)), ("m", mult), ("s", shift)],
    )  # fmt: skip
    extreme = rng.integers(-32768, 32768, (m, k)).astype(np.int16)
    extreme[0, 0] = -32768
    if m > 1:
        extreme[1] = 127
    if m > 2:
        extreme[2] = 0
    if m > 3:
        extreme[3, :] = 128
    feeds = [{"x": extreme}, {"x": rng.integers(-300, 300, (m, k)).astype(np.int16)},
             {"x": rng.integers(-127, 128, (m, k)).astype(np.int16)}]  # fmt: skip
    exponents = {int(v) for f in feeds for v in row_exponents(f["x"], qmax, bound).ravel()}
    assert 9 in exponents and (0 in exponents or qmax < 127)
    assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}), model, feeds)


@pytest.mark.tvm
def test_row_exponent_on_3d_input_bit_exact_in_tvm() -> None:
    from qcompiler.backends.tvm import build
    from qcompiler.testing import assert_bit_exact

    model = _graph_model(
        [helper.make_node("RowExponent", ["x"], ["y", "e"], domain=DOMAIN)],
        [helper.make_tensor_value_info("x", TensorProto.INT16, [2, 3, 7])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None),
         helper.make_tensor_value_info("e", TensorProto.INT8, None)],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.integers(-32768, 32768, (2, 3, 7)).astype(np.int16)}, {"x": np.zeros((2, 3, 7), np.int16)}]
    assert_bit_exact(lambda proto: build(proto, {"x": [2, 3, 7]}), model, feeds)


def test_row_exponent_settings_are_validated() -> None:
    from qcompiler.passes.quantize.qdq import QuantizeConfig

    with pytest.raises(ValueError, match="row_exponent_refinement: must lie in"):
        QuantizeConfig(row_exponents=True, row_exponent_refinement=0)
    assert QuantizeConfig(row_exponents=True, weight_bits=4, group_size=128).row_exponents  # QGemmInt4 takes them


def test_candidates_are_bias_free_linear_inputs() -> None:
    """A tensor read by a linear with a bias, or by anything but linears (through shape-only ops), keeps its
    static int8 scale."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21})
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 8]))
    graph.inputs.append(x)

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array), type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(array.shape))  # fmt: skip
        graph.register_initializer(value)
        return value

    relu = ir.node("Relu", [x])
    plain = ir.node("MatMul", [relu.outputs[0], const("w", np.ones((8, 3), np.float32))])
    sigmoid = ir.node("Sigmoid", [x])
    biased = ir.node("Gemm", [sigmoid.outputs[0], const("w2", np.ones((8, 3), np.float32)),
                              const("b", np.ones(3, np.float32))])  # fmt: skip
    tanh = ir.node("Tanh", [x])
    reshaped = ir.node("Reshape", [tanh.outputs[0], const("shape", np.array([4, 8], np.float32))])
    through = ir.node("MatMul", [reshaped.outputs[0], const("w3", np.ones((8, 3), np.float32))])
    for node in (relu, plain, sigmoid, biased, tanh, reshaped, through):
        graph.append(node)
    graph.outputs.extend([plain.outputs[0], biased.outputs[0], through.outputs[0]])
    assert row_exponent.candidate(graph, relu.outputs[0])
    assert not row_exponent.candidate(graph, sigmoid.outputs[0])  # the Gemm has a bias
    assert not row_exponent.candidate(graph, tanh.outputs[0])  # a Reshape reads it ...
    assert row_exponent.candidate(graph, tanh.outputs[0], through_shape_ops=True)  # ... then a linear
    assert not row_exponent.candidate(graph, x)  # a graph input


@pytest.mark.tvm
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 9, 64, 32), (5, 40, 96, 32)])
def test_row_exponent_and_int4_gemm_rows_bit_exact_in_tvm(m: int, n: int, k: int, group: int) -> None:
    """RowExponent -> QGemmInt4(row_exponent): packed int4 codes with integer group scales, rows shifted by their
    exponents in the epilogue; bit-exact against the reference at the int16 extremes."""
    from qcompiler.backends.tvm import build
    from qcompiler.dialect.int4 import pack_int4
    from qcompiler.testing import assert_bit_exact

    rng = np.random.default_rng(m + n + k)
    codes = rng.integers(-7, 8, (n, k)).astype(np.int8)
    scales = rng.integers(1, 257, (n, k // group)).astype(np.int16)
    mult = rng.integers(1 << 30, 1 << 31, n).astype(np.int32)
    shift = rng.integers(ROW_EXPONENT_MAX + 1, 48, n).astype(np.int32)
    nodes = [
        helper.make_node("RowExponent", ["x"], ["codes", "e"], domain=DOMAIN),
        helper.make_node("QGemmInt4", ["codes", "w", "g", "b", "m", "s", "e"], ["y"], domain=DOMAIN,
                         group_size=group, lo=-32768, hi=32767),
    ]  # fmt: skip
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.INT16, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, None)],
        [("w", pack_int4(codes)), ("g", scales), ("b", np.zeros(n, np.int32)), ("m", mult), ("s", shift)],
    )
    extreme = rng.integers(-32768, 32768, (m, k)).astype(np.int16)
    extreme[0, 0] = -32768
    feeds = [{"x": extreme}, {"x": rng.integers(-127, 128, (m, k)).astype(np.int16)}]
    assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}), model, feeds)
