"""Wide (int16) residual tensors and per-channel norm outputs: chosen from the graph, exact in the integer graph,
and worth it on data with outlier channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.config import CalibrationConfig, Recipe, load_recipe
from qcompiler.dialect import REFERENCE_OPS, run_reference
from qcompiler.ir.graph import const_array
from qcompiler.passes.lower import float_ops_inside
from qcompiler.passes.quantize.qdq import QuantizeConfig
from qcompiler.testing import assert_bit_exact, assert_within_quantization_step

TOKENS, WIDTH, HIDDEN = 16, 32, 64
OUTLIER = 5  # the channel carrying BERT-style outliers


def _post_norm_block(seed: int = 0) -> tuple[object, list[dict[str, np.ndarray]]]:
    """x -> LN1 -> FFN (MatMul+bias, Gelu, MatMul+bias) -> + LN1 output -> LN2: BERT's post-norm FFN half, with a
    LN1 gain 40x larger on one channel (an outlier channel in the residual stream)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, WIDTH).astype(np.float32)
    gamma[OUTLIER] = 40.0
    inits = {
        "g1": gamma,
        "b1": rng.uniform(-0.2, 0.2, WIDTH).astype(np.float32),
        "w1": (rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32),
        "c1": rng.uniform(-0.1, 0.1, HIDDEN).astype(np.float32),
        "w2": (rng.standard_normal((HIDDEN, WIDTH)) / np.sqrt(HIDDEN)).astype(np.float32),
        "c2": rng.uniform(-0.1, 0.1, WIDTH).astype(np.float32),
        "g2": rng.uniform(0.5, 1.5, WIDTH).astype(np.float32),
        "b2": rng.uniform(-0.2, 0.2, WIDTH).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["n1"], axis=-1),
        helper.make_node("MatMul", ["n1", "w1"], ["h"]),
        helper.make_node("Add", ["h", "c1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("Add", ["o", "c2"], ["ob"]),
        helper.make_node("Add", ["ob", "n1"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "g2", "b2"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "post_norm_ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, TOKENS, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, TOKENS, WIDTH])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10

    def batch() -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((2, TOKENS, WIDTH)).astype(np.float32)}

    return model, [batch() for _ in range(8)]


def _recipe(residual_bits: int, per_channel: bool, alpha: float = 1.0) -> Recipe:
    base = load_recipe("w8a8")
    quantize = QuantizeConfig(residual_bits=residual_bits, per_channel_norm_outputs=per_channel, migration_alpha=alpha)
    return Recipe("test", "", base.canonicalize, CalibrationConfig(), quantize, base.lower)


def _float_reference(model, feeds) -> np.ndarray:
    return run_reference(model, feeds)[0]


def test_plan_chooses_wide_residuals_and_per_channel_norm_outputs() -> None:
    model, batches = _post_norm_block()
    qdq, integer, _, shapes = quantize_to_integer(model, calibration=batches, recipe=_recipe(16, True), progress=False)
    quants = {n.inputs[0].name: n for n in qdq.graph if n.op_type == "QuantizeLinear"}
    assert quants["r"].outputs[0].dtype == ir.DataType.INT16  # the residual sum, read only by LN2
    assert quants["n1"].outputs[0].dtype == ir.DataType.INT8
    assert const_array(quants["n1"].inputs[1]).shape == (WIDTH,)  # LN1's output: per channel
    assert quants["a"].attributes.get_int("axis", 1) == -1  # the GELU output too (read by one linear)
    assert const_array(quants["hb"].inputs[1]).size == 1  # the FFN's first output feeds GELU: per tensor
    ops = [n.op_type for n in integer.graph]
    assert float_ops_inside(integer) == [] and "RescaleAdd" in ops and ops.count("IntLayerNorm") == 2
    wide = [v for n in integer.graph for v in n.outputs if v.dtype == ir.DataType.INT16]
    assert wide, "the residual sum is int16 in the integer graph"
    assert_bit_exact(lambda proto: build(proto, shapes), integer, batches[:2])


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_integer_graph_matches_its_qdq_graph(alpha: float) -> None:
    """The folded weights and per-channel rescales are the QDQ graph's arithmetic, not an approximation of it:
    LN1's per-channel int8 output and the first linear's output (which reads it at t0 through folded weights)
    are within one step of the QDQ graph's (the LayerNorm bound; rounding). A wrong fold is tens of steps off."""
    model, batches = _post_norm_block(1)
    qdq, integer, _, _ = quantize_to_integer(
        model, calibration=batches, recipe=_recipe(16, True, alpha), progress=False
    )
    names = ["n1_q", "hb_q"]
    qdq_eval = ReferenceEvaluator(ir.serde.serialize_model(qdq), new_ops=REFERENCE_OPS)
    int_eval = ReferenceEvaluator(ir.serde.serialize_model(integer), new_ops=REFERENCE_OPS)
    for feeds in batches[:3]:
        for want, got in zip(qdq_eval.run(names, feeds), int_eval.run(names, feeds), strict=True):
            assert got.dtype == np.int8
            assert np.abs(want.astype(np.int64) - got.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_and_per_channel_beat_per_tensor_int8_on_outliers(seed: int) -> None:
    """With an outlier channel in the residual stream, the mean error to float drops 3-4x (measured; each of the
    two alone gains 1.2-1.4x)."""
    model, batches = _post_norm_block(seed)
    errors = {}
    for key, recipe in {"per-tensor": _recipe(8, False), "planned": _recipe(16, True)}.items():
        _, integer, _, _ = quantize_to_integer(model, calibration=batches, recipe=recipe, progress=False)
        proto = ir.serde.serialize_model(integer)
        errors[key] = max(
            float(np.abs(run_reference(proto, f)[0] - _float_reference(model, f)).mean()) for f in batches[:3]
        )
    assert errors["planned"] < errors["per-tensor"] / 2.5, errors


def test_config_validates_residual_bits_and_alpha() -> None:
    with pytest.raises(ValueError, match="residual_bits"):
        QuantizeConfig(residual_bits=12)
    with pytest.raises(ValueError, match="migration_alpha"):
        QuantizeConfig(migration_alpha=0.0)


def test_migration_alpha_balances_activation_and_weight_ranges() -> None:
    """alpha < 1: the per-channel scales follow SmoothQuant's s_c = max|x_c|^a / max|W_c|^(1-a) (up to one common
    factor), and the widest channel still fits int8 exactly."""
    model, batches = _post_norm_block(2)
    qdq, _, _, _ = quantize_to_integer(model, calibration=batches, recipe=_recipe(16, True, 0.5), progress=False)
    quant = next(n for n in qdq.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "n1")
    scales = const_array(quant.inputs[1]).astype(np.float64)
    x_max = np.zeros(WIDTH)
    for feeds in batches:
        normed = run_reference(_first_norm(model), feeds)[0]
        x_max = np.maximum(x_max, np.abs(normed).reshape(-1, WIDTH).max(0))
    w_max = np.abs(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w1"))).max(1)
    balance = np.sqrt(x_max) / np.sqrt(w_max)
    np.testing.assert_allclose(scales / scales.max(), balance / balance.max(), rtol=1e-4)
    assert np.max(x_max / scales) == pytest.approx(127.0, rel=1e-4)


def _first_norm(model):
    """The block cut after LN1 (its output n1 as the graph output)."""
    import onnx

    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.output[:]
    cut.graph.output.append(helper.make_tensor_value_info("n1", TensorProto.FLOAT, None))
    return cut


DEPTH = 64  # contracted length of the score product below: bound floor(sqrt((2^31 - 1) / 64)) = 5792


def _score_block(seed: int = 0) -> tuple[object, list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """``(x * Ta) @ (y * Tb)^T``: two computed operands of an activation product (attention's Q K^T, with RoPE's
    table products as their producers), read by nothing else."""
    rng = np.random.default_rng(seed)
    ta = rng.uniform(0.5, 1.5, (TOKENS, DEPTH)).astype(np.float32)
    tb = rng.uniform(0.5, 1.5, (TOKENS, DEPTH)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "ta"], ["a"]),
        helper.make_node("Mul", ["y", "tb"], ["b"]),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "bt"], ["s"]),
    ]
    shape = [1, TOKENS, DEPTH]
    graph = helper.make_graph(
        nodes,
        "scores",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, TOKENS, TOKENS])],
        [numpy_helper.from_array(ta, "ta"), numpy_helper.from_array(tb, "tb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    batches = [{n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "y")} for _ in range(4)]
    return model, batches, ta, tb


def _attention_recipe(bits: int, kv_bits: int = 0) -> Recipe:
    base = load_recipe("w8a8")
    config = QuantizeConfig(attention_bits=bits, kv_bits=kv_bits)
    return Recipe("test", "", base.canonicalize, CalibrationConfig(), config, base.lower)


def test_attention_operands_are_int16_and_clamped_so_scores_cannot_overflow() -> None:
    """attention_bits = 16: both operands of the score product are int16, clamped at 5792 (64 * 5792^2 < 2^31).
    Inputs 1000x beyond calibration drive every operand to its clamp and every sum to 2,147,024,896: the integer
    code (TVM and reference, bit for bit) saturates the output at +127 instead of wrapping to a negative sum."""
    from qcompiler.passes.lower.dyadic import integer_bound

    model, batches, _, _ = _score_block()
    qdq, integer, _, shapes = quantize_to_integer(
        model, calibration=batches, recipe=_attention_recipe(16), progress=False
    )
    clips = [n for n in qdq.graph if n.op_type == "Clip"]
    assert len(clips) == 2  # one clamp per operand, in the QDQ graph too
    product = next(n for n in integer.graph if n.op_type == "MatMul")
    sources = [cast.inputs[0] for cast in (v.producer() for v in product.inputs)]
    assert all(s.dtype == ir.DataType.INT16 for s in sources)
    assert [integer_bound(s) for s in sources] == [5792, 5792]
    high = np.full((1, TOKENS, DEPTH), 1000.0, np.float32)
    extreme, extreme_negative = {"x": high, "y": high}, {"x": high, "y": -high}
    proto = ir.serde.serialize_model(integer)
    assert (run_reference(proto, extreme)[0] == np.float32(run_reference(proto, extreme)[0].max())).all()
    qdq_proto = ir.serde.serialize_model(qdq)
    for feeds in (extreme, extreme_negative):  # saturated: every level is the clamp, in both graphs
        np.testing.assert_array_equal(run_reference(proto, feeds)[0], run_reference(qdq_proto, feeds)[0])
    # in range, the float product and the dyadic requantize may round a tie apart: one step at most (the contract;
    # exact equality held on one machine's BLAS and not on another's)
    assert_within_quantization_step(qdq, integer, batches[:2])
    assert run_reference(proto, extreme)[0].min() > 0 > run_reference(proto, extreme_negative)[0].max()
    assert_bit_exact(lambda p: build(p, shapes), integer, [extreme, extreme_negative, *batches[:2]])


def test_int16_attention_operands_are_finer_than_int8() -> None:
    """The point of attention_bits = 16: the score product's error to float drops by more than 10x."""
    model, batches, _, _ = _score_block(1)
    errors = {}
    for bits in (8, 16):
        _, integer, _, _ = quantize_to_integer(
            model, calibration=batches, recipe=_attention_recipe(bits), progress=False
        )
        proto = ir.serde.serialize_model(integer)
        errors[bits] = np.mean(
            [np.abs(run_reference(proto, f)[0] - _float_reference(model, f)).mean() for f in batches]
        )
    assert errors[16] < errors[8], errors


def test_kv_bits_8_keeps_keys_int8_under_unclamped_int16_queries() -> None:
    """kv_bits = 8: the score product's right operand (the keys, what a cache holds) is int8 and its left (the
    queries) int16 at its full range, no clamp (127 * 32767 * 64 < 2^31); the integer code is bit-exact in TVM,
    and its error to float lies between the all-int8 and the all-int16 products'."""
    from qcompiler.passes.lower.dyadic import integer_bound

    model, batches, _, _ = _score_block(2)
    qdq, integer, _, shapes = quantize_to_integer(
        model, calibration=batches, recipe=_attention_recipe(16, kv_bits=8), progress=False
    )
    assert not [n for n in qdq.graph if n.op_type == "Clip"]
    product = next(n for n in integer.graph if n.op_type == "MatMul")
    sources = [cast.inputs[0] for cast in (v.producer() for v in product.inputs)]
    assert [s.dtype for s in sources] == [ir.DataType.INT16, ir.DataType.INT8]
    assert integer_bound(sources[0]) == 32767
    errors = {}
    for name, recipe in (("kv8", None), ("int8", _attention_recipe(8)), ("int16", _attention_recipe(16))):
        built = (
            integer
            if recipe is None
            else quantize_to_integer(model, calibration=batches, recipe=recipe, progress=False)[1]
        )
        proto = ir.serde.serialize_model(built)
        errors[name] = np.mean(
            [np.abs(run_reference(proto, f)[0] - _float_reference(model, f)).mean() for f in batches]
        )
    assert errors["int16"] < errors["kv8"] < errors["int8"], errors
    high = np.full((1, TOKENS, DEPTH), 1000.0, np.float32)
    assert_bit_exact(lambda p: build(p, shapes), integer, [{"x": high, "y": -high}, *batches[:2]])


def test_config_validates_kv_bits() -> None:
    with pytest.raises(ValueError, match="kv_bits"):
        QuantizeConfig(attention_bits=8, kv_bits=8)
    with pytest.raises(ValueError, match="kv_bits"):
        QuantizeConfig(attention_bits=16, kv_bits=4)


def test_unbounded_int16_activation_product_is_refused() -> None:
    """Two full-range int16 operands of a 64-term product can overflow int32: the lowering names the node."""
    from qcompiler.errors import UnsupportedOpError
    from qcompiler.passes.lower import LowerQDQToIntegerPass

    def scalar(name: str, value: float | int, dtype: type) -> TensorProto:
        return numpy_helper.from_array(np.array(value, dtype), name)

    nodes, inits = [], [scalar("s_s", 1.0, np.float32), scalar("s_z", 0, np.int8)]
    for name in ("a", "b"):
        inits += [scalar(f"{name}_s", 0.01, np.float32), scalar(f"{name}_z", 0, np.int16)]
        params = [f"{name}_s", f"{name}_z"]
        nodes.append(helper.make_node("QuantizeLinear", [name, *params], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", *params], [f"{name}_dq"]))
    nodes += [
        helper.make_node("MatMul", ["a_dq", "b_dq"], ["s"], name="scores"),
        helper.make_node("QuantizeLinear", ["s", "s_s", "s_z"], ["s_q"]),
        helper.make_node("DequantizeLinear", ["s_q", "s_s", "s_z"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, DEPTH]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [DEPTH, 4]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph(nodes, "unbounded", inputs, [output], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    with pytest.raises(UnsupportedOpError, match="scores.*overflow the int32"):
        LowerQDQToIntegerPass()(model)


def test_config_validates_attention_bits() -> None:
    with pytest.raises(ValueError, match="attention_bits"):
        QuantizeConfig(attention_bits=12)
