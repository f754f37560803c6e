"""Integer nonlinearities: exact isqrt on every edge class, documented error bounds against float, worst-case
bit widths, and TVM bit-exact against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler.dialect import DOMAIN
from qcompiler.dialect.nonlinear import (
    gelu_constants,
    int_gelu,
    int_layernorm,
    int_sigmoid,
    int_softmax,
    isqrt,
    isqrt_fixed_iterations,
    layernorm_constants,
    layernorm_frac_bits,
    layernorm_prescale,
    sigmoid_constants,
    softmax_constants,
)
from qcompiler.testing.kernel_models import single_node_model


def _exact(values: np.ndarray) -> np.ndarray:
    return np.array([math.isqrt(int(v)) for v in values], dtype=np.int64)


# --- isqrt ----------------------------------------------------------------------------------------------
def test_isqrt_every_small_n() -> None:
    n = np.arange(0, 1 << 20, dtype=np.int64)
    root = isqrt(n)
    assert np.array_equal(root * root <= n, np.ones_like(n, bool))
    assert np.all((root + 1) * (root + 1) > n)
    assert np.array_equal(isqrt_fixed_iterations(n), root)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_isqrt_squares_and_neighbours(offset: int) -> None:
    m = np.arange(1, 1 << 16, dtype=np.int64)
    n = m * m + offset
    expected = _exact(n)
    assert np.array_equal(isqrt(n), expected)
    assert np.array_equal(isqrt_fixed_iterations(n), expected)


def test_isqrt_extremes_and_random_62_bit() -> None:
    n = np.array([2**32 - 1, 2**32, 2**62 - 1, 2**61, (2**31 - 1) ** 2, 3], dtype=np.int64)
    assert np.array_equal(isqrt(n), _exact(n))
    sample = np.random.default_rng(0).integers(0, 2**62, 200_000)
    assert np.array_equal(isqrt_fixed_iterations(sample), isqrt(sample))
    assert np.array_equal(isqrt(sample[:2000]), _exact(sample[:2000]))
    with pytest.raises(ValueError, match="isqrt"):
        isqrt(np.array([-1]))


# --- softmax --------------------------------------------------------------------------------------------
SOFTMAX_BOUND = "|y / 128 - p| <= 2^-8 + 4e-3 p"


def _float_softmax(x: np.ndarray, scale: float) -> np.ndarray:
    z = x.astype(np.float64) * scale
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@settings(max_examples=150)
@given(
    st.floats(1e-4, 0.69),
    st.integers(1, 1024),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["random", "equal", "one_hot", "extremes"]),
)
def test_softmax_error_bound(scale: float, length: int, seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (3, length))
    if kind == "equal":
        x[:] = rng.integers(-128, 128)
    elif kind == "one_hot":
        x[:] = -128
        x[:, rng.integers(length)] = 127
    elif kind == "extremes":
        x = rng.choice(np.array([-128, 127]), (3, length))
    y = int_softmax(x, **softmax_constants(scale)).astype(np.float64) / 128
    p = _float_softmax(x, scale)
    assert np.all(np.abs(y - p) <= 2**-8 + 4e-3 * p + 1e-12), SOFTMAX_BOUND


def test_softmax_worst_case_bit_widths() -> None:
    # the largest row sum: a long row of equal values at the finest allowed scale
    k = softmax_constants(1e-4)
    y = int_softmax(np.zeros((1, 1 << 16), np.int64), **k)
    assert y.dtype == np.int8 and np.all(y == 0)  # 2^-16 rounds to 0 at 2^-7
    y = int_softmax(np.array([[127, -128]]), **k)
    assert y.tolist() == [[64, 64]] or abs(int(y[0, 0]) - 64) <= 1


@pytest.mark.parametrize("bad", [0.0, 0.7, -1.0])
def test_softmax_rejects_scales_out_of_range(bad: float) -> None:
    with pytest.raises(ValueError, match="softmax input scale"):
        softmax_constants(bad)


# --- LayerNorm / RMSNorm --------------------------------------------------------------------------------
def _float_norm(x: np.ndarray, scale: float, gamma, beta, eps: float, rms: bool) -> np.ndarray:
    xf = x.astype(np.float64) * scale
    if rms:
        return xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + eps) * gamma + beta
    mu = xf.mean(-1, keepdims=True)
    return (xf - mu) / np.sqrt(xf.var(-1, keepdims=True) + eps) * gamma + beta


@settings(max_examples=120)
@given(st.integers(2, 1024), st.floats(1e-3, 1.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_layernorm_error_bound(channels: int, scale: float, rms: bool, seed: int) -> None:
    """Bound: |y - y_float / S_y| <= 1 step + |normalized part| * 2^-9 for rows with std >= 1 input step."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (4, channels))
    gamma = rng.uniform(-2, 2, channels)
    beta = rng.uniform(-1, 1, channels)
    reference = _float_norm(x, scale, gamma, beta, 1e-5, rms)
    out_scale = max(np.abs(reference).max(), 1e-3) / 127
    k = layernorm_constants(scale, out_scale, gamma, beta, 1e-5, channels)
    y = int_layernorm(
        x, k["multiplier"], k["shift"], k["bias"], rms=rms, epsilon_q=int(k["epsilon_q"]), frac_bits=int(k["frac_bits"])
    )
    target = np.clip(reference / out_scale, -128, 127)
    normalized_part = np.abs(target - beta / out_scale)
    std_ok = (x.std(-1) >= 1.0)[:, None] if not rms else np.ones((4, 1), bool)
    err = np.abs(y - target)
    assert np.all(~std_ok | (err <= 1.0 + normalized_part * 2**-9 + 1e-9))


def test_layernorm_constant_row_and_extremes() -> None:
    channels = 4096  # frac_bits drops to keep sum(d^2) 4^f below 2^62
    k = layernorm_constants(0.1, 0.05, np.ones(channels), np.full(channels, 0.5), 1e-5, channels)
    constant = np.full((1, channels), 77)
    extra = {"epsilon_q": int(k["epsilon_q"]), "frac_bits": int(k["frac_bits"])}
    y = int_layernorm(constant, k["multiplier"], k["shift"], k["bias"], **extra)
    assert np.all(y == 10)  # d = 0: only beta / S_y = 10 remains
    extremes = np.where(np.arange(channels) % 2 == 0, 127, -128)[None, :]  # largest sum(d^2)
    y = int_layernorm(extremes, k["multiplier"], k["shift"], k["bias"], **extra)
    reference = _float_norm(extremes, 0.1, 1.0, 0.5, 1e-5, False) / 0.05
    assert np.max(np.abs(y - np.clip(reference, -128, 127))) <= 1.0


def _prescaled_case(channels: int, seed: int):
    """A per-channel int16 RMSNorm input: channel scales spread over 2^10 (a massive-activation channel 1000x the
    finest), and the prescaled constants."""
    rng = np.random.default_rng(seed)
    scales = 2.0 ** rng.uniform(-14, -4, channels)
    scales[0] = 2.0**-14 * 1024  # the full 2^10 spread
    gamma = rng.uniform(-2, 2, channels)
    multipliers, stat = layernorm_prescale(scales)
    out_scale = 4.0 / 127
    k = layernorm_constants(stat, out_scale, gamma, np.zeros(channels), 1e-6, channels, 16, prescaled=True)
    return rng, scales, gamma, multipliers, out_scale, k


@settings(max_examples=60)
@given(st.integers(2, 1024), st.integers(0, 2**31 - 1))
def test_prescaled_rmsnorm_error_bound(channels: int, seed: int) -> None:
    """A per-channel int16 input (each channel at its own scale): within one output step + 2^-9 of the normalized
    part of float RMSNorm on the dequantized input, on random rows and on rows at the int16 extremes."""
    rng, scales, gamma, multipliers, out_scale, k = _prescaled_case(channels, seed)
    x = rng.integers(-32768, 32768, (4, channels))
    x[1] = np.where(np.arange(channels) % 2 == 0, 32767, -32768)
    x[2] = 0
    x[2, 0] = 32767  # one massive channel, the rest zero
    xf = x * scales
    reference = xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-6) * gamma
    y = int_layernorm(x, k["multiplier"], k["shift"], k["bias"], rms=True, epsilon_q=int(k["epsilon_q"]),
                      frac_bits=int(k["frac_bits"]), input_multiplier=multipliers)  # fmt: skip
    target = np.clip(reference / out_scale, -128, 127)
    assert np.all(np.abs(y - target) <= 1.0 + np.abs(target) * 2**-9 + 1e-9)


def test_prescale_refuses_a_spread_above_its_range() -> None:
    with pytest.raises(ValueError, match="span 2048x"):
        layernorm_prescale(np.array([1.0, 1.0 / 2048]))
    with pytest.raises(ValueError, match="rms = 1"):
        int_layernorm(np.zeros((1, 2)), np.ones(2), np.ones(2), np.zeros(2), input_multiplier=np.ones(2))


# --- TVM bit-exact ----------------------------------------------------------------------------------------
def _assert_tvm_matches(model, shape, feeds) -> None:
    from qcompiler.backends.tvm import build
    from qcompiler.testing import assert_bit_exact

    assert_bit_exact(lambda proto: build(proto, {"x": list(shape)}), model, feeds)


@pytest.mark.tvm
@settings(max_examples=12)
@given(st.floats(1e-4, 0.69), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_softmax_tvm_bit_exact(scale: float, length: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (2, 3, length)
    model = single_node_model("IntSoftmax", [], shape, {}, **softmax_constants(scale))
    extremes = rng.choice(np.array([-128, 127], np.int8), shape)
    _assert_tvm_matches(model, shape, [{"x": rng.integers(-128, 128, shape).astype(np.int8)}, {"x": extremes}])


@pytest.mark.tvm
@settings(max_examples=12)
@given(st.integers(1, 512), st.booleans(), st.integers(0, 2**31 - 1))
def test_layernorm_tvm_bit_exact(channels: int, rms: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = layernorm_constants(0.05, 0.03, rng.uniform(-2, 2, channels), rng.uniform(-1, 1, channels), 1e-5, channels)
    shape = (3, channels)
    inits = {"m": k["multiplier"], "s": k["shift"], "b": k["bias"]}
    model = single_node_model(
        "IntLayerNorm",
        ["m", "s", "b"],
        shape,
        inits,
        rms=int(rms),
        epsilon_q=int(k["epsilon_q"]),
        frac_bits=int(k["frac_bits"]),
    )
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x[0] = 5  # constant row
    x[1] = np.where(np.arange(channels) % 2 == 0, 127, -128)  # extremes
    _assert_tvm_matches(model, shape, [{"x": x}])


@pytest.mark.tvm
@settings(max_examples=8)
@given(st.integers(1, 600), st.integers(0, 2**31 - 1))
def test_prescaled_rmsnorm_tvm_bit_exact(channels: int, seed: int) -> None:
    rng, _, _, multipliers, _, k = _prescaled_case(channels, seed)
    shape = (3, channels)
    inits = {"m": k["multiplier"], "s": k["shift"], "b": k["bias"], "p": multipliers}
    model = single_node_model("IntLayerNorm", ["m", "s", "b", "p"], shape, inits, input_dtype=TensorProto.INT16, rms=1,
                              epsilon_q=int(k["epsilon_q"]), frac_bits=int(k["frac_bits"]))  # fmt: skip
    x = rng.integers(-32768, 32768, shape).astype(np.int16)
    x[0] = np.where(np.arange(channels) % 2 == 0, 32767, -32768)  # the largest sum of squares
    x[1] = 0
    x[1, 0] = -32768
    _assert_tvm_matches(model, shape, [{"x": x}])


# --- GELU, sigmoid, SiLU: every int8 input, many scales ---------------------------------------------------
ALL_INT8 = np.arange(-128, 128, dtype=np.int64)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _split(constants: dict) -> tuple[int, int, dict]:
    rest = {k: v for k, v in constants.items() if k not in ("multiplier", "shift")}
    return constants["multiplier"], constants["shift"], rest


GELU_BOUND = 0.0205  # i-GELU's own approximation error is 0.0182 (erf form) / 0.0178 (tanh form) on R


@settings(max_examples=120)
@given(st.floats(1e-3, 1.0), st.sampled_from(["erf", "tanh"]))
def test_gelu_error_bound(scale: float, form: str) -> None:
    """|y S_y - GELU(x)| <= S_y / 2 + 0.0205 for every int8 input."""
    exact = (_gelu_erf if form == "erf" else _gelu_tanh)(ALL_INT8 * scale)
    out_scale = max(np.abs(exact).max(), 1e-6) / 127
    multiplier, shift, rest = _split(gelu_constants(scale, out_scale))
    y = int_gelu(ALL_INT8, multiplier, shift, **rest)
    assert np.all(np.abs(y * out_scale - exact) <= out_scale / 2 + GELU_BOUND)


@settings(max_examples=120)
@given(st.floats(1e-3, 2.0), st.booleans())
def test_sigmoid_and_silu_error_bound(scale: float, silu: bool) -> None:
    """sigmoid: |y S_y - sigmoid(x)| <= S_y / 2 + 4e-3; SiLU: <= S_y / 2 + 4e-3 |x|, for every int8 input."""
    from scipy.special import expit

    xf = ALL_INT8 * scale
    exact = xf * expit(xf) if silu else expit(xf)
    out_scale = max(np.abs(exact).max(), 1e-6) / 127
    multiplier, shift, rest = _split(sigmoid_constants(scale, out_scale, silu))
    y = int_sigmoid(ALL_INT8, multiplier, shift, silu=silu, **{k: v for k, v in rest.items()})
    slack = 4e-3 * (np.abs(xf) if silu else 1.0)
    assert np.all(np.abs(y * out_scale - exact) <= out_scale / 2 + slack + 1e-12)


@pytest.mark.tvm
@settings(max_examples=8)
@given(st.floats(1e-3, 1.0), st.sampled_from(["gelu", "sigmoid", "silu"]))
def test_gelu_sigmoid_silu_tvm_bit_exact(scale: float, op: str) -> None:
    x = ALL_INT8.astype(np.int8).reshape(2, 128)
    if op == "gelu":
        multiplier, shift, rest = _split(gelu_constants(scale, 0.02))
        name = "IntGelu"
    else:
        multiplier, shift, rest = _split(sigmoid_constants(scale, 0.01, op == "silu"))
        rest["silu"] = int(op == "silu")
        name = "IntSigmoid"
    inits = {"m": np.array(multiplier, np.int32), "s": np.array(shift, np.int32)}
    model = single_node_model(name, ["m", "s"], x.shape, inits, **rest)
    _assert_tvm_matches(model, x.shape, [{"x": x}])


def test_masked_softmax_leaves_masked_entries_out() -> None:
    rng = np.random.default_rng(3)
    scale = 0.05
    x = rng.integers(-128, 128, (2, 3, 5, 7))
    mask = rng.random((2, 1, 1, 7)) > 0.4
    mask[1] = False  # batch 1: every key masked -> all-zero rows (float softmax would give NaN)
    y = int_softmax(x, **softmax_constants(scale), mask=mask).astype(np.float64) / 128
    assert np.all(y[np.broadcast_to(~mask, y.shape)] == 0)
    assert np.all(y[1] == 0)
    z = np.where(np.broadcast_to(mask, x.shape), x * scale, -np.inf)[0]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.all(np.abs(y[0] - p) <= 2**-8 + 4e-3 * p + 1e-12)


@pytest.mark.tvm
def test_masked_softmax_tvm_bit_exact() -> None:

    rng = np.random.default_rng(4)
    shape = (2, 3, 4, 9)
    graph = helper.make_graph(
        [helper.make_node("IntSoftmax", ["x", "m"], ["y"], domain=DOMAIN, **softmax_constants(0.08))],
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.INT8, list(shape)),
            helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 1, 1, 9]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    from qcompiler.backends.tvm import build
    from qcompiler.testing import assert_bit_exact

    mask = rng.random((2, 1, 1, 9)) > 0.3
    mask[1] = False
    feeds = [{"x": rng.integers(-128, 128, shape).astype(np.int8), "m": mask}]
    assert_bit_exact(lambda proto: build(proto, {"x": list(shape), "m": [2, 1, 1, 9]}), model, feeds)


# --- wide (int16) inputs and per-channel output scales -------------------------------------------------------
@settings(max_examples=60)
@given(st.sampled_from([8, 64, 384, 576, 1000]), st.floats(1e-4, 1e-2), st.booleans(), st.integers(0, 2**31 - 1))
def test_layernorm_int16_input_error_bound(channels: int, scale: float, rms: bool, seed: int) -> None:
    """int16 input (a wide residual stream) with per-channel output scales: the same bound, per channel."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-32768, 32768, (4, channels))
    x[0, : channels // 8 + 1] = 32767  # an outlier block, as in BERT's residual stream
    gamma = rng.uniform(-2, 2, channels)
    beta = rng.uniform(-1, 1, channels)
    reference = _float_norm(x, scale, gamma, beta, 1e-5, rms)
    out_scales = np.maximum(np.abs(reference).max(0), 1e-3) / 127
    k = layernorm_constants(scale, out_scales, gamma, beta, 1e-5, channels, input_bits=16)
    y = int_layernorm(
        x, k["multiplier"], k["shift"], k["bias"], rms=rms, epsilon_q=int(k["epsilon_q"]), frac_bits=int(k["frac_bits"])
    )
    target = np.clip(reference / out_scales, -128, 127)
    err = np.abs(y - target)
    assert np.all(err <= 1.0 + np.abs(target - beta / out_scales) * 2**-9 + 1e-9)


def test_layernorm_int16_input_refuses_too_many_channels() -> None:
    assert layernorm_frac_bits(1000, input_bits=16) >= 0
    with pytest.raises(ValueError, match="1024 channels of 16-bit input overflow"):
        layernorm_frac_bits(1024, input_bits=16)


def test_layernorm_int16_worst_case_fits_int64() -> None:
    for channels in (384, 576, 1000):
        k = layernorm_constants(1e-3, 0.05, np.ones(channels), np.zeros(channels), 1e-5, channels, input_bits=16)
        f = int(k["frac_bits"])
        extremes = np.where(np.arange(channels) % 2 == 0, 32767, -32768)
        d = channels * extremes - extremes.sum()
        assert int((d.astype(object) ** 2).sum()) << (2 * f) < 2**62


def test_gelu_per_channel_output_scales_match_per_tensor_ones() -> None:
    """A per-channel output rescale gives, channel by channel, what a per-tensor one with that scale gives."""
    scales = np.array([0.01, 0.02, 0.05, 0.2])
    per_channel = gelu_constants(0.05, scales)
    x = np.tile(ALL_INT8[:, None], (1, 4))
    multiplier, shift, rest = _split(per_channel)
    y = int_gelu(x, multiplier, shift, **rest)
    for c, s in enumerate(scales):
        m_c, s_c, rest_c = _split(gelu_constants(0.05, float(s)))
        assert rest_c == rest
        assert np.array_equal(y[:, c], int_gelu(ALL_INT8, m_c, s_c, **rest_c))


@pytest.mark.tvm
@settings(max_examples=8)
@given(st.sampled_from([8, 384, 576]), st.booleans(), st.integers(0, 2**31 - 1))
def test_layernorm_int16_tvm_bit_exact(channels: int, rms: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out_scales = rng.uniform(0.005, 0.05, channels)
    k = layernorm_constants(
        1e-3, out_scales, rng.uniform(-2, 2, channels), rng.uniform(-1, 1, channels), 1e-5, channels, input_bits=16
    )
    shape = (3, channels)
    model = single_node_model(
        "IntLayerNorm",
        ["m", "s", "b"],
        shape,
        {"m": k["multiplier"], "s": k["shift"], "b": k["bias"]},
        input_dtype=TensorProto.INT16,
        rms=int(rms),
        epsilon_q=int(k["epsilon_q"]),
        frac_bits=int(k["frac_bits"]),
    )
    x = rng.integers(-32768, 32768, shape).astype(np.int16)
    x[1] = np.where(np.arange(channels) % 2 == 0, 32767, -32768)  # the largest sum of squares
    _assert_tvm_matches(model, shape, [{"x": x}])


@pytest.mark.tvm
@pytest.mark.parametrize("op", ["gelu", "silu"])
def test_per_channel_output_rescale_tvm_bit_exact(op: str) -> None:
    x = np.tile(ALL_INT8.astype(np.int8)[:, None], (1, 5))
    scales = np.array([0.003, 0.01, 0.02, 0.07, 0.3])
    if op == "gelu":
        multiplier, shift, rest = _split(gelu_constants(0.04, scales))
        name = "IntGelu"
    else:
        multiplier, shift, rest = _split(sigmoid_constants(0.04, scales, silu=True))
        rest["silu"] = 1
        name = "IntSigmoid"
    inits = {"m": np.asarray(multiplier, np.int32), "s": np.asarray(shift, np.int32)}
    _assert_tvm_matches(single_node_model(name, ["m", "s"], x.shape, inits, **rest), x.shape, [{"x": x}])


# --- 16-bit softmax probabilities ----------------------------------------------------------------------------
@settings(max_examples=80)
@given(st.floats(1e-4, 0.69), st.integers(1, 2048), st.integers(0, 2**31 - 1))
def test_softmax_16_bit_error_bound(scale: float, length: int, seed: int) -> None:
    """int16 probabilities at 2^-15: |y - p| <= 2^-15 + 6e-3 p (one step, as 1.0 saturates to 1 - 2^-15, plus the
    i-exp's relative error carried through the normalisation; measured worst 4.5e-3 p over 3,000 rows)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (3, length))
    y = int_softmax(x, **softmax_constants(scale), out_bits=15)
    assert y.dtype == np.int16
    p = _float_softmax(x, scale)
    assert np.all(np.abs(y.astype(np.float64) / 2**15 - p) <= 2**-15 + 6e-3 * p + 1e-12)


def test_softmax_16_bit_keeps_long_rows() -> None:
    """A uniform row of 512: 2^-9 each; int8 at 2^-7 rounds every one to 0, int16 keeps 64 / 2^15 exactly."""
    k = softmax_constants(0.05)
    row = np.zeros((1, 512), np.int64)
    assert np.all(int_softmax(row, **k) == 0)
    assert np.all(int_softmax(row, **k, out_bits=15) == 64)
    with pytest.raises(ValueError, match="out_bits"):
        int_softmax(row, **k, out_bits=8)


@pytest.mark.tvm
@settings(max_examples=6)
@given(st.floats(1e-3, 0.69), st.integers(1, 600), st.integers(0, 2**31 - 1))
def test_softmax_16_bit_tvm_bit_exact(scale: float, length: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (2, length)
    model = single_node_model(
        "IntSoftmax", [], shape, {}, output_dtype=TensorProto.INT16, out_bits=15, **softmax_constants(scale)
    )
    _assert_tvm_matches(model, shape, [{"x": rng.integers(-128, 128, shape).astype(np.int8)}])


# --- int16 scores (softmax_input_bits = 16) ------------------------------------------------------------------
@settings(max_examples=60)
@given(st.floats(float(np.log(2.0) / 16000.0), 0.02), st.integers(1, 1024), st.integers(0, 2**31 - 1))
def test_softmax_of_int16_scores_error_bound(scale: float, length: int, seed: int) -> None:
    """Scores at int16 (steps down to ln2 / 16000, what the quantizer allows): the same bounds as int8 scores,
    for 8- and 16-bit probabilities."""
    from qcompiler.passes.quantize.qdq import WIDE_SCORES_MIN_SCALE

    assert scale >= WIDE_SCORES_MIN_SCALE * (1 - 1e-6)
    rng = np.random.default_rng(seed)
    x = rng.integers(-32767, 32768, (3, length))
    p = _float_softmax(x, scale)
    y8 = int_softmax(x, **softmax_constants(scale))
    assert np.all(np.abs(y8.astype(np.float64) / 128 - p) <= 2**-8 + 4e-3 * p + 1e-12), SOFTMAX_BOUND
    y16 = int_softmax(x, **softmax_constants(scale), out_bits=15)
    assert np.all(np.abs(y16.astype(np.float64) / 2**15 - p) <= 2**-15 + 6e-3 * p + 1e-12)


@pytest.mark.tvm
@settings(max_examples=6)
@given(st.floats(float(np.log(2.0) / 16000.0), 0.02), st.integers(1, 600), st.integers(0, 2**31 - 1))
def test_softmax_of_int16_scores_tvm_bit_exact(scale: float, length: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (2, length)
    model = single_node_model(
        "IntSoftmax", [], shape, {}, input_dtype=TensorProto.INT16, output_dtype=TensorProto.INT16, out_bits=15,
        **softmax_constants(scale),
    )  # fmt: skip
    extremes = rng.choice(np.array([-32767, 32767], np.int16), shape)
    _assert_tvm_matches(model, shape, [{"x": rng.integers(-32767, 32768, shape).astype(np.int16)}, {"x": extremes}])


def test_softmax_exp_runs_in_int32_for_every_valid_scale() -> None:
    """The TVM kernel's exp takes its int32 form (a vectorizable division) for every scale softmax_constants
    accepts, int8 or int16 scores; wider inputs keep the int64 form."""
    from qcompiler.backends.tvm.nonlinear import _exp_fits_int32

    for scale in np.geomspace(math.log(2.0) / 16000.0, 0.69, 200):
        constants = softmax_constants(float(scale))
        assert _exp_fits_int32("int8", **constants) and _exp_fits_int32("int16", **constants), constants
    assert not _exp_fits_int32("int32", **softmax_constants(0.01))
    assert not _exp_fits_int32("int16", input_shift=16, ln2_q=1024, b_q=2000, c_q=1 << 20)


@pytest.mark.tvm
@pytest.mark.parametrize("scale", [math.log(2.0) / 16000.0, 2e-4, 0.69])
@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_softmax_tvm_bit_exact_at_the_extreme_scales(scale: float, dtype) -> None:
    """The largest spans the int32 exp meets: the dtype's full range in one row (x - max = -255 or -65535,
    shifted by input_shift), at the finest and the coarsest scale, with every value in between."""
    info = np.iinfo(dtype)
    onnx_dtype = TensorProto.INT8 if dtype == np.int8 else TensorProto.INT16
    length = 4096 if dtype == np.int16 else 256
    shape = (3, length)
    out = {"output_dtype": TensorProto.INT16, "out_bits": 15} if dtype == np.int16 else {}
    model = single_node_model("IntSoftmax", [], shape, {}, input_dtype=onnx_dtype, **out, **softmax_constants(scale))
    ramp = np.linspace(info.min + 1, info.max, length).astype(dtype)
    rows = np.stack([ramp, ramp[::-1], np.full(length, info.min + 1, dtype)])
    rows[2, 7] = info.max
    _assert_tvm_matches(model, shape, [{"x": rows}])


@pytest.mark.tvm
@pytest.mark.parametrize("scale", [2e-5, 4e-4, 0.01, 0.5])
@pytest.mark.parametrize("silu", [False, True])
def test_sigmoid_of_int16_input_tvm_bit_exact(scale: float, silu: bool) -> None:
    """int16 inputs over their whole range (SiLU's in w8a8-llm), from a fine scale (ln2_q near 2^15) to a coarse
    one."""
    multiplier, shift, rest = _split(sigmoid_constants(scale, 0.01, silu, input_bits=16))
    rest["silu"] = int(silu)
    inits = {"m": np.array(multiplier, np.int32), "s": np.array(shift, np.int32)}
    x = np.concatenate([np.arange(-32768, 32768, 97), [-32768, -1, 0, 1, 32767]]).astype(np.int16).reshape(1, -1)
    model = single_node_model("IntSigmoid", ["m", "s"], x.shape, inits, input_dtype=TensorProto.INT16, **rest)
    _assert_tvm_matches(model, x.shape, [{"x": x}])
