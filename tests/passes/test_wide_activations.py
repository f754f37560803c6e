"""W8A16 (``activation_bits = 16``, the ``w8a16`` recipe): activations are int16 wherever every reader takes int16,
each at the largest level bound for which its readers' int32 sums cannot overflow (passes/quantize/precision.py).

The properties: the integer code is integer-only, within one step of its QDQ graph op by op and bit-exact on TVM;
every linear reading an int16 tensor has ``bound * 127 * K + max|bias| < 2^31`` for its input's level bound (the
producer's clamp), so its int32 arithmetic is exact for any input, not only the calibrated ones; and the output
is much closer to float than W8A8's on a mobile block (hard-swish, depthwise, squeeze-excitation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import _quantize_to_integer
from qcompiler.config import load_recipe
from qcompiler.ir.graph import const_array
from qcompiler.passes.lower import float_ops_inside
from qcompiler.passes.quantize.precision import INT32_MAX, wide_activation_bound
from qcompiler.passes.quantize.qdq import QuantizeConfig
from qcompiler.testing import assert_bit_exact, assert_lowering_matches, assert_within_quantization_step

C, MID, SIDE = 8, 16, 10


def _model(nodes, inits, shape_in, shape_out) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _mobile_block(seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> HardSwish -> depthwise 3x3 -> Relu -> squeeze-excitation (GAP, 1x1, Relu, 1x1, HardSigmoid,
    Mul) -> 1x1 projection -> residual Add."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.standard_normal((MID, C, 3, 3)) * 0.3,
        "b1": rng.standard_normal(MID) * 0.2,
        "w2": rng.standard_normal((MID, 1, 3, 3)) * 0.5,
        "b2": rng.standard_normal(MID) * 0.2,
        "ws1": rng.standard_normal((4, MID, 1, 1)) * 0.4,
        "bs1": rng.standard_normal(4) * 0.1,
        "ws2": rng.standard_normal((MID, 4, 1, 1)) * 0.4,
        "bs2": rng.standard_normal(MID) * 0.1,
        "w3": rng.standard_normal((C, MID, 1, 1)) * 0.3,
        "b3": rng.standard_normal(C) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["a"], ["a_hs"]),
        helper.make_node("Conv", ["a_hs", "w2", "b2"], ["d"], pads=[1, 1, 1, 1], group=MID),
        helper.make_node("Relu", ["d"], ["d_r"]),
        helper.make_node("GlobalAveragePool", ["d_r"], ["s"]),
        helper.make_node("Conv", ["s", "ws1", "bs1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["s1_r"]),
        helper.make_node("Conv", ["s1_r", "ws2", "bs2"], ["s2"]),
        helper.make_node("HardSigmoid", ["s2"], ["gate"], alpha=1.0 / 6.0),
        helper.make_node("Mul", ["d_r", "gate"], ["e"]),
        helper.make_node("Conv", ["e", "w3", "b3"], ["p"]),
        helper.make_node("Add", ["x", "p"], ["y"]),
    ]
    shape = [1, C, SIDE, SIDE]
    return _model(nodes, inits, shape, shape)


def _batches(count: int, seed: int, shape=(1, C, SIDE, SIDE)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _compile(model: onnx.ModelProto, recipe: str, calibration):
    return _quantize_to_integer(model, None, calibration, load_recipe(recipe), True, False)


def _input_level(value: ir.Value) -> tuple[int, ir.DataType]:
    """The level bound of a dequantized input in a QDQ graph: the Clip before its QuantizeLinear, else storage."""
    dq = value.producer()
    q = dq.inputs[0].producer()
    storage = 32768 if q.outputs[0].dtype == ir.DataType.INT16 else 128  # QuantizeLinear can write -32768
    clip = q.inputs[0].producer() if q.inputs[0] is not None else None
    if clip is not None and clip.op_type == "Clip" and len(clip.inputs) > 2:
        high = float(const_array(clip.inputs[2]))
        return min(storage, round(high / float(const_array(q.inputs[1])))), q.outputs[0].dtype
    return storage, q.outputs[0].dtype


def _accumulator_peaks(qdq: ir.Model) -> list[tuple[str, int, int]]:
    """(node, level bound of its int16 input, the largest |int32 sum| it can reach) for every linear reading int16."""
    found = []
    for node in qdq.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        level, dtype = _input_level(node.inputs[0])
        if dtype != ir.DataType.INT16:
            continue
        weight_q = node.inputs[1].producer().inputs[0]
        codes = const_array(weight_q).astype(np.int64)
        rows = codes.reshape(codes.shape[0], -1) if node.op_type == "Conv" else codes.T
        bias = 0
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = int(np.abs(const_array(node.inputs[2].producer().inputs[0]).astype(np.int64)).max())
        found.append((node.name, level, int(level * np.abs(rows).sum(axis=1).max()) + bias))
    return found


def _sqnr(got: np.ndarray, want: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want).astype(np.float64) ** 2)))


@pytest.mark.tvm
def test_w8a16_mobile_block_is_integer_only_exact_and_bounded() -> None:
    from qcompiler.backends.tvm import build

    result = _compile(_mobile_block(), "w8a16", _batches(6, 0))
    qdq, integer = result.qdq_ir(), result.model
    assert qdq is not None
    assert float_ops_inside(integer) == []
    wide = [q for q in qdq.graph if q.op_type == "QuantizeLinear" and q.outputs[0].dtype == ir.DataType.INT16]
    narrow = [q for q in qdq.graph if q.op_type == "QuantizeLinear" and q.outputs[0].dtype == ir.DataType.INT8]
    narrow_activations = [q for q in narrow if const_array(q.inputs[0]) is None]
    assert len(wide) >= 8 and narrow_activations == [], [q.outputs[0].name for q in narrow_activations]
    peaks = _accumulator_peaks(qdq)
    assert len(peaks) == 5  # every convolution reads int16
    for name, _, peak in peaks:
        assert peak <= INT32_MAX, f"{name}: its int32 sum can reach {peak}"
    probe = _batches(3, 11)
    assert_within_quantization_step(qdq, integer, probe)
    assert_lowering_matches(qdq, integer, probe)
    assert_bit_exact(lambda proto: build(proto, result.shapes), integer, probe)


def test_w8a16_is_much_closer_to_float_than_w8a8() -> None:
    from onnx.reference import ReferenceEvaluator

    model = _mobile_block(1)
    calibration, probe = _batches(6, 0), _batches(4, 21)
    reference = ReferenceEvaluator(model)
    want = np.concatenate([reference.run(None, feeds)[0] for feeds in probe])
    sqnr = {}
    for recipe in ("w8a8-tables", "w8a16"):
        qdq = _compile(model, recipe, calibration).qdq_ir()
        session = ReferenceEvaluator(ir.serde.serialize_model(qdq))
        got = np.concatenate([session.run(None, feeds)[0] for feeds in probe])
        sqnr[recipe] = _sqnr(got, want)
    # 8 more bits of activation: the weights' rounding is what is left (about 31 dB for W8A8 here, 38 for W8A16)
    assert sqnr["w8a16"] > sqnr["w8a8-tables"] + 5.0, sqnr


def _long_linear(depth: int, bias: float, activation: str = "Relu") -> onnx.ModelProto:
    """x [2, 4] -> Gemm to ``depth`` features -> ``activation`` -> Gemm with a bias of ``bias`` back to 3."""
    rng = np.random.default_rng(2)
    inits = {
        "w1": rng.standard_normal((4, depth)),
        "w2": rng.standard_normal((depth, 3)) / np.sqrt(depth),
        "b2": np.full(3, bias),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node(activation, ["h"], ["h_r"]),
        helper.make_node("Gemm", ["h_r", "w2", "b2"], ["y"], name="gemm"),
    ]
    return _model(nodes, inits, [2, 4], [2, 3])


@pytest.mark.parametrize(
    ("depth", "bias", "activation"),
    [
        (64, 0.0, "Relu"),
        (40_000, 0.0, "Relu"),
        (4_000, 30_000.0, "Relu"),
        (40_000, 0.0, "HardSwish"),
        (40_000, 0.0, "Reciprocal"),
    ],
)
def test_the_level_bound_keeps_the_int32_sum_exact(depth: int, bias: float, activation: str) -> None:
    """A long reduction (K = 40,000: 2^31 / (127 K) = 422 levels) or a bias far above the input's range shrinks
    the bound below 32767; the producer clamps to it (a fused Relu becomes Clip(0, bound); a table's codes are
    clamped), the worst-case int32 sum stays below 2^31, and inputs twice the calibrated range meet the clamp in
    the integer code exactly as in the QDQ graph."""
    model = _long_linear(depth, bias, activation)
    result = _compile(model, "w8a16", _batches(4, 0, shape=(2, 4)))
    qdq = result.qdq_ir()
    assert qdq is not None
    ((_, level, peak),) = [p for p in _accumulator_peaks(qdq) if p[0] == "gemm"]
    assert peak <= INT32_MAX
    gemm = next(n for n in qdq.graph if n.op_type == "Gemm")
    clamp = gemm.inputs[0].producer().inputs[0].producer().inputs[0].producer()
    if depth == 64 and bias == 0.0:
        assert level == 32768 and clamp.op_type == "Relu"
    else:
        assert 128 <= level < 32768
        assert clamp.op_type == "Clip"  # the bound is the producer's clamp (a Relu becomes Clip(0, bound))
        high = float(const_array(clamp.inputs[2])) / float(const_array(gemm.inputs[0].producer().inputs[1]))
        assert round(high) == level
    # the bound, not a coarser weight step (qdq's _fit_bias), makes room for the bias: every step is max|W_n| / 127
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w2"))
    steps = const_array(gemm.inputs[1].producer().inputs[1])
    np.testing.assert_allclose(steps, np.abs(w2).max(axis=0) / 127, rtol=1e-6)
    assert float_ops_inside(result.model) == []
    wide = [{"x": 2.0 * feeds["x"]} for feeds in _batches(3, 5, shape=(2, 4))]
    assert_lowering_matches(qdq, result.model, wide)


def test_wide_activation_bound_formula() -> None:
    """``B (127 K + max_n |b_n| / (absmax s_n)) + 1 <= 2^31 - 1`` exactly at the returned B, with B capped at
    32767 and 0 (stay int8) below 128 levels."""
    model = ir.serde.deserialize_model(_long_linear(40_000, 0.0))
    hidden = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    bound = wide_activation_bound(model.graph, hidden, absmax=1.0)
    assert bound == (INT32_MAX - 1) // (127 * 40_000 + 1)  # clamped to it
    assert (bound + 1) * (127 * 40_000 + 1) > INT32_MAX - 1  # the largest
    short = ir.serde.deserialize_model(_long_linear(64, 0.0))
    assert wide_activation_bound(short.graph, next(n for n in short.graph if n.op_type == "Relu").outputs[0], 1.0) == (
        32767
    )
    huge = ir.serde.deserialize_model(_long_linear(200_000, 0.0))
    assert wide_activation_bound(huge.graph, next(n for n in huge.graph if n.op_type == "Relu").outputs[0], 1.0) == 0


@pytest.mark.parametrize("recipe", ["w8a16", "w8a16-polynomials"])
def test_a_silu_reads_its_input_at_int16(recipe: str, tmp_path) -> None:
    """EfficientNet's swish, x * Sigmoid(x): x is int16 too (a 65,536-level table, or IntSigmoid's 16-bit form
    with the polynomial lowering), and the integer code follows its QDQ graph."""
    rng = np.random.default_rng(6)
    inits = {"w1": rng.standard_normal((C, C, 3, 3)) * 0.4, "w2": rng.standard_normal((C, C, 1, 1)) * 0.4}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["gate"]),
        helper.make_node("Mul", ["a", "gate"], ["s"]),
        helper.make_node("Conv", ["s", "w2"], ["y"]),
    ]
    model = _model(nodes, inits, [1, C, SIDE, SIDE], [1, C, SIDE, SIDE])
    if recipe == "w8a16-polynomials":  # the same recipe lowered with I-BERT's integer sigmoid, not tables
        recipe_path = tmp_path / "poly.toml"
        source = Path(__file__).resolve().parents[2] / "qcompiler" / "recipes" / "w8a16.toml"
        text = source.read_text().replace('{ pass = "lower-qdq-to-integer", tables = true }', '"lower-qdq-to-integer"')
        recipe_path.write_text(text.replace('name = "w8a16"', 'name = "w8a16-polynomials"'))
        recipe = str(recipe_path)
    result = _compile(model, recipe, _batches(4, 0))
    qdq = result.qdq_ir()
    dtypes = {q.inputs[0].name: q.outputs[0].dtype for q in qdq.graph if q.op_type == "QuantizeLinear"}
    assert dtypes["a"] == dtypes["s"] == ir.DataType.INT16
    assert float_ops_inside(result.model) == []
    import qcompiler

    # the simulation with the recipe's own integer nonlinearities (tables, or I-BERT's polynomials)
    simulation = qcompiler.simulate(
        model, calibration=_batches(4, 0), recipe=recipe, nonlinearities="integer", progress=False
    )
    assert_lowering_matches(simulation, result.model, _batches(2, 5))


def test_readers_that_cannot_take_int16_keep_the_tensor_int8() -> None:
    """A Concat of two differently scaled tensors requantizes int8 parts only: both parts stay int8 (no refusal),
    while the Concat's output, read by a convolution, is int16."""
    rng = np.random.default_rng(4)
    inits = {"wa": rng.standard_normal((C, C, 1, 1)), "wb": rng.standard_normal((C, C, 1, 1)) * 5,
             "wc": rng.standard_normal((C, 2 * C, 1, 1))}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"]),
        helper.make_node("Conv", ["x", "wb"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
        helper.make_node("Conv", ["ab", "wc"], ["y"]),
    ]
    model = _model(nodes, inits, [1, C, SIDE, SIDE], [1, C, SIDE, SIDE])
    result = _compile(model, "w8a16", _batches(4, 0))
    qdq = result.qdq_ir()
    dtypes = {q.inputs[0].name: q.outputs[0].dtype for q in qdq.graph if q.op_type == "QuantizeLinear"}
    assert dtypes["a"] == dtypes["b"] == ir.DataType.INT8
    assert float_ops_inside(result.model) == []
    assert_lowering_matches(qdq, result.model, _batches(2, 5))


def test_config_validates_activation_bits() -> None:
    with pytest.raises(ValueError, match="activation_bits: must be 4, 8 or 16"):
        QuantizeConfig(activation_bits=12)
    with pytest.raises(ValueError, match="activation_bits = 4 reads every linear's input per token"):
        QuantizeConfig(activation_bits=4, weight_bits=4)  # W4A4 without row exponents
    with pytest.raises(ValueError, match=r"row_exponent_clip: must lie in \[0.5, 1\], got 0.2"):
        QuantizeConfig(row_exponents=True, row_exponent_clip=0.2)
    with pytest.raises(ValueError, match="8-bit weights in every layer"):
        QuantizeConfig(activation_bits=16, weight_bits=4)
    with pytest.raises(ValueError, match="row_exponents"):
        QuantizeConfig(activation_bits=16, row_exponents=True)
