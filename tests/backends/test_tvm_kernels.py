"""Every TVM kernel is bit-exact against the reference semantics: odd shapes, extremes, rounding ties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qcompiler.backends.tvm import build, resolve_target
from qcompiler.backends.tvm.build import host_cpu_features
from qcompiler.dialect import DOMAIN, run_reference
from qcompiler.dialect.hadamard import split_sylvester
from qcompiler.passes.transform.hadamard import online_hadamard
from qcompiler.testing import assert_bit_exact, float_functions
from qcompiler.testing.assertions import llvm_functions
from qcompiler.testing.kernel_models import int4_gemm_model, single_node_model

pytestmark = pytest.mark.tvm


def _single(op, inputs, x_shape, inits, out_dtype=TensorProto.INT8, x_dtype=TensorProto.INT8, domain=DOMAIN, **attrs):
    return single_node_model(
        op, inputs, x_shape, inits, input_dtype=x_dtype, output_dtype=out_dtype, domain=domain, **attrs
    )


def _builder(shape):
    return lambda proto: build(proto, {"x": list(shape)})


def _epilogue_params(rng, n, per_channel):
    count = n if per_channel else 1
    mult = rng.integers(1 << 30, 1 << 31, count).astype(np.int32)
    shift = rng.integers(36, 44, count).astype(np.int32)
    return mult.reshape(-1) if per_channel else mult.reshape(()), shift.reshape(-1) if per_channel else shift.reshape(
        ()
    )


@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (1, 10, 256), (3, 33, 5), (17, 64, 130), (8, 40, 64), (2, 7, 3)])
@pytest.mark.parametrize("weights_with_minus_128", [False, True])
def test_qgemm_bit_exact(m: int, n: int, k: int, weights_with_minus_128: bool) -> None:
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    low = -128 if weights_with_minus_128 else -127
    w = rng.integers(low, 128, (n, k)).astype(np.int8)
    if weights_with_minus_128:
        w.flat[0] = -128  # forces the exact int16 path instead of psign
    mult, shift = _epilogue_params(rng, n, per_channel=bool(n % 2))
    inits = {"w": w, "b": rng.integers(-5000, 5000, n).astype(np.int32), "m": mult, "s": shift}
    model = _single("QGemm", ["w", "b", "m", "s"], (m, k), inits, lo=-100, hi=120)
    feeds = [
        {"x": rng.integers(-128, 128, (m, k)).astype(np.int8)},
        {"x": np.full((m, k), -128, np.int8)},  # extreme: largest-magnitude accumulators
        {"x": np.full((m, k), 127, np.int8)},
    ]
    assert_bit_exact(_builder((m, k)), model, feeds)


def test_qgemm_on_3d_input() -> None:
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (24, 16)).astype(np.int8)
    inits = {
        "w": w,
        "b": np.zeros(24, np.int32),
        "m": np.array(1 << 30, np.int32),
        "s": np.array(38, np.int32),
    }
    model = _single("QGemm", ["w", "b", "m", "s"], (2, 5, 16), inits)
    assert_bit_exact(_builder((2, 5, 16)), model, [{"x": rng.integers(-128, 128, (2, 5, 16)).astype(np.int8)}])


@pytest.mark.parametrize(
    ("shape", "w_shape", "attrs"),
    [
        ((1, 1, 28, 28), (8, 1, 5, 5), {"pads": [2, 2, 2, 2]}),
        ((2, 3, 9, 7), (5, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ((1, 4, 8, 8), (6, 4, 1, 1), {}),
        ((1, 3, 10, 9), (4, 3, 3, 2), {"dilations": [2, 1], "pads": [0, 1, 2, 0]}),
        ((1, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
        # depthwise rows of 8+ pixels: the vectorized direct schedule (16 lanes with a partial tile; 8; stride 2)
        ((1, 6, 5, 20), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),
        ((2, 4, 3, 8), (4, 1, 5, 5), {"group": 4, "pads": [2, 2, 2, 2]}),
        ((1, 8, 6, 35), (8, 1, 3, 3), {"group": 8, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ],
)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_qconv_bit_exact(shape, w_shape, attrs, layout: str) -> None:
    model, feeds = _qconv_case(shape, w_shape, attrs)
    assert_bit_exact(lambda proto: build(proto, {"x": list(shape)}, conv_layout=layout), model, feeds)


def _qconv_case(shape, w_shape, attrs, *, minus_128: bool = False):
    """A QConv (ReLU clamp, per-channel requantize) and feeds: random, and every activation at each extreme."""
    rng = np.random.default_rng(sum(shape) + sum(w_shape))
    w = rng.integers(-128 if minus_128 else -127, 128, w_shape).astype(np.int8)
    if minus_128:
        w.flat[::7] = -128  # the psign kernel's one inexact weight: the AVX2 build must take the int16 path
    out_c = w_shape[0]
    inits = {
        "w": w,
        "b": rng.integers(-3000, 3000, out_c).astype(np.int32),
        "m": rng.integers(1 << 30, 1 << 31, out_c).astype(np.int32),
        "s": np.full(out_c, 37, np.int32),
    }
    model = _single("QConv", ["w", "b", "m", "s"], shape, inits, lo=0, **attrs)
    feeds = [{"x": rng.integers(-128, 128, shape).astype(np.int8)}, {"x": np.full(shape, -128, np.int8)},
             {"x": np.full(shape, 127, np.int8)}]  # fmt: skip
    return model, feeds


def test_requantize_and_rescale_add_at_ties() -> None:
    # multiplier 2^30 with shift 31 halves: odd accumulators land exactly on .5 ties
    x = np.arange(-255, 256, dtype=np.int32).reshape(1, 511)
    model = _single(
        "Requantize",
        ["m", "s"],
        x.shape,
        {"m": np.array(1 << 30, np.int32), "s": np.array(31, np.int32)},
        x_dtype=TensorProto.INT32,
        axis=1,
    )
    assert_bit_exact(_builder(x.shape), model, [{"x": x}])
    a = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    graph = helper.make_graph(
        [helper.make_node("RescaleAdd", ["x", "x2", "ma", "mb", "s"], ["y"], domain=DOMAIN, lo=0)],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [
            numpy_helper.from_array(a[:, ::-1].copy(), "x2"),
            numpy_helper.from_array(np.array(1 << 30, np.int32), "ma"),
            numpy_helper.from_array(np.array(3 << 28, np.int32), "mb"),
            numpy_helper.from_array(np.array(31, np.int32), "s"),
        ],
    )
    add = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    # a/2 + 3b/8 hits exact .5 ties for many (a, b) pairs
    assert_bit_exact(_builder((1, 256)), add, [{"x": a}])


def test_quantize_linear_rounds_half_to_even_like_onnx() -> None:
    x = (np.arange(-300, 300, dtype=np.float32) * 0.5).reshape(1, 600)  # every other value is a tie
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert_bit_exact(_builder((1, 600)), model, [{"x": x}])


def test_unknown_target_is_rejected() -> None:
    from qcompiler.errors import TargetError

    with pytest.raises(TargetError, match="unknown target 'riscv'"):
        resolve_target("riscv")
    with pytest.raises(TargetError, match="kind 'c' is not supported"):
        resolve_target({"kind": "c"})


def test_compiled_integer_kernels_contain_no_float_instruction() -> None:
    """Acceptance 4: the int8 -> int8 core of a compiled CNN has no floating-point instruction at all."""
    rng = np.random.default_rng(7)
    inits = {
        "w": rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8),
        "b": np.zeros(8, np.int32),
        "m": np.full(8, 1 << 30, np.int32),
        "s": np.full(8, 38, np.int32),
        "w2": rng.integers(-127, 128, (10, 8 * 4 * 4)).astype(np.int8),
        "b2": np.zeros(10, np.int32),
        "m2": np.full(10, 1 << 30, np.int32),
        "s2": np.full(10, 38, np.int32),
        "shape": np.array([1, 128], np.int64),
    }
    graph = helper.make_graph(
        [
            helper.make_node("QConv", ["x", "w", "b", "m", "s"], ["c"], domain=DOMAIN, pads=[1, 1, 1, 1], lo=0),
            helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("RescaleAdd", ["p", "p", "m", "m", "s"], ["r"], domain=DOMAIN),
            helper.make_node("Reshape", ["r", "shape"], ["f"]),
            helper.make_node("QGemm", ["f", "w2", "b2", "m2", "s2"], ["y"], domain=DOMAIN),
        ],
        "core",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    graph.initializer[2].CopyFrom(numpy_helper.from_array(np.full(8, 1 << 30, np.int32), "m"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.graph.node[2].input[2] = "ma"
    model.graph.node[2].input[3] = "ma"
    model.graph.node[2].input[4] = "sa"
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1 << 30, np.int32), "ma"),
            numpy_helper.from_array(np.array(31, np.int32), "sa"),
        ]
    )
    module = build(model, {"x": [1, 3, 8, 8]})
    functions = llvm_functions(module.llvm_ir())
    assert any("qconv" in name for name in functions), "kernel functions not found in the LLVM IR"
    offenders = float_functions(module.llvm_ir())
    assert not offenders, f"float instructions in integer kernels: {offenders}"
    if "avx2" in host_cpu_features():  # one of the int8 dot intrinsics (AVX2 vpmaddubsw, or VNNI vpdpbusd)
        ir_text = module.llvm_ir()
        assert "llvm.x86.avx2.pmadd" in ir_text or "vpdpbusd" in ir_text, "no int8 dot intrinsic was used"


@pytest.mark.parametrize("shifts", [(31, 31), (31, 32), (32, 33), (31, 62), (30, 40), (5, 9)])
def test_qgemm_epilogue_forms_agree_at_every_shift(shifts: tuple[int, int]) -> None:
    """Shifts >= 31 take the vectorizable high-32-bit epilogue, smaller ones the plain int64 one; both must
    match the reference at ties and extremes (bias chosen to reach the int32 accumulator's edges)."""
    rng = np.random.default_rng(sum(shifts))
    n, k = 16, 8
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    shift = rng.integers(shifts[0], shifts[1] + 1, n).astype(np.int32)
    mult = np.where(np.arange(n) % 2 == 0, 1 << 30, rng.integers(1 << 30, 1 << 31, n)).astype(np.int32)
    bias = rng.integers(-(2**30), 2**30, n).astype(np.int32)
    bias[:4] = [2**31 - 1 - k * 128 * 128, -(2**31) + k * 128 * 128, 0, 1]
    model = _single("QGemm", ["w", "b", "m", "s"], (4, k), {"w": w, "b": bias, "m": mult, "s": shift})
    feeds = [
        {"x": rng.integers(-128, 128, (4, k)).astype(np.int8)},
        {"x": np.full((4, k), -128, np.int8)},
        {"x": np.full((4, k), 127, np.int8)},
        {"x": np.eye(4, k, dtype=np.int8)},  # small accumulators: many exact .5 ties with b = 2^30
    ]
    assert_bit_exact(_builder((4, k)), model, feeds)


def test_rescale_add_wide_and_per_channel_bit_exact() -> None:
    """int16 + per-channel-scaled int8 -> int16 (the residual stream of a post-norm transformer), at ties."""
    rng = np.random.default_rng(5)
    channels = 37
    a = rng.integers(-32768, 32768, (2, 6, channels)).astype(np.int16)
    a[0, 0] = 32767
    a[0, 1] = -32768
    b = rng.integers(-128, 128, (2, 6, channels)).astype(np.int8)
    mult_b = rng.integers(1 << 20, 1 << 31, channels).astype(np.int32)
    graph = helper.make_graph(
        [helper.make_node("RescaleAdd", ["x", "b", "ma", "mb", "s"], ["y"], domain=DOMAIN, lo=-32768, hi=32767)],
        "wide_add",
        [helper.make_tensor_value_info("x", TensorProto.INT16, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT16, None)],
        [
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array(1 << 30, np.int32), "ma"),
            numpy_helper.from_array(mult_b, "mb"),
            numpy_helper.from_array(np.array(31, np.int32), "s"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    assert_bit_exact(_builder(a.shape), model, [{"x": a}])
    assert run_reference(model, {"x": a})[0].dtype == np.int16


@pytest.mark.parametrize("per_channel", [False, True])
def test_qgemm_int16_output_bit_exact(per_channel: bool) -> None:
    """A wide clamp makes the GEMM write int16 (an output projection into the residual stream)."""
    rng = np.random.default_rng(11)
    m, n, k = 9, 21, 70
    mult, shift = _epilogue_params(rng, n, per_channel)
    shift = (shift - 8).astype(np.int32)  # rescales large enough to use the int16 range
    inits = {
        "w": rng.integers(-127, 128, (n, k)).astype(np.int8),
        "b": rng.integers(-5000, 5000, n).astype(np.int32),
        "m": mult,
        "s": shift,
    }
    model = _single("QGemm", ["w", "b", "m", "s"], (m, k), inits, out_dtype=TensorProto.INT16, lo=-32768, hi=32767)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    x[0] = 127
    assert_bit_exact(_builder((m, k)), model, [{"x": x}])
    y = run_reference(model, {"x": x})[0]
    assert y.dtype == np.int16 and np.abs(y).max() > 127


@pytest.mark.parametrize(
    ("shape", "n"),
    [((1, 2), 2), ((3, 64), 64), ((2, 5, 12), 12), ((4, 24), 24), ((7, 80), 80), ((2, 576), 576), ((3, 1536), 1536),
     ((64, 576), 576), ((2, 16, 128), 128)],  # rows in parallel; K = 36 as 3 vectors of 12; K = 1, 7 stages
)  # fmt: skip
@pytest.mark.parametrize("x_dtype", [TensorProto.INT8, TensorProto.INT16])
def test_hadamard_bit_exact(shape: tuple[int, ...], n: int, x_dtype: int) -> None:
    """The integer Hadamard (block product, then butterflies) against the reference, at the extremes: the
    signs of H's first column make ``|y_0| = n max|x|``, the largest sum it can reach."""
    block = split_sylvester(online_hadamard(n))
    assert block is not None
    rng = np.random.default_rng(n)
    model = _single("Hadamard", ["h"], shape, {"h": block}, out_dtype=TensorProto.INT32, x_dtype=x_dtype)
    info = np.iinfo(np.int16 if x_dtype == TensorProto.INT16 else np.int8)
    dtype = np.int16 if x_dtype == TensorProto.INT16 else np.int8
    feeds = [
        {"x": rng.integers(info.min, info.max + 1, shape).astype(dtype)},
        {"x": np.full(shape, info.min, dtype)},
        {"x": (online_hadamard(n)[:, 0] * info.max * np.ones(shape)).astype(dtype)},
    ]
    assert_bit_exact(_builder(shape), model, feeds)
    got = run_reference(model, feeds[2])[0]
    assert got.dtype == np.int32 and int(np.abs(got).max()) == n * int(info.max)


# --- int4 weights (QGemmInt4) ------------------------------------------------------------------------------------


def _int4_model(rng, m, n, k, group, *, extreme_codes=False, max_scale=256):
    """Codes over the whole int4 range (-8 included), random per-channel (odd N) or per-tensor epilogues, a wide
    int16 clamp."""
    mult, shift = _epilogue_params(rng, n, per_channel=bool(n % 2))
    return int4_gemm_model(rng, m, n, k, group, multiplier=mult, shift=shift, bias_bound=5000, codes=(-8, 7),
                           max_scale=max_scale, extreme=extreme_codes, output_dtype=TensorProto.INT16,
                           lo=-20000, hi=20000)  # fmt: skip


@pytest.mark.parametrize(
    ("m", "n", "k", "group"),
    [
        (1, 1, 2, 2),
        (1, 10, 256, 128),
        (3, 33, 5, 2),
        (17, 64, 130, 32),
        (2, 7, 3, 3),
        (5, 24, 300, 128),
        (1, 9, 64, 64),
        (1, 256, 256, 128),  # from 4 column panels on, each expanded in its thread (PANEL_MIN_BLOCKS)
        (3, 130, 70, 32),
        (33, 200, 301, 128),
    ],
)
def test_qgemm_int4_bit_exact(m: int, n: int, k: int, group: int) -> None:
    """Odd K (a padding nibble), K not a multiple of the group, N not a multiple of the tile, M = 1, whole-matrix
    and per-panel expansion; random and extreme codes (-8 everywhere at the largest group scale) and extreme
    activations."""
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    for extreme in (False, True):
        model = _int4_model(rng, m, n, k, group, extreme_codes=extreme)
        feeds = [
            {"x": rng.integers(-128, 128, (m, k)).astype(np.int8)},
            {"x": np.full((m, k), -128, np.int8)},
            {"x": np.full((m, k), 127, np.int8)},
        ]
        assert_bit_exact(_builder((m, k)), model, feeds)


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(1, 9), n=st.integers(1, 300), k=st.integers(1, 200), group=st.sampled_from([2, 8, 32, 128]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_qgemm_int4_bit_exact_on_generated_shapes(m: int, n: int, k: int, group: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = _int4_model(rng, m, n, k, group)
    assert_bit_exact(_builder((m, k)), model, [{"x": rng.integers(-128, 128, (m, k)).astype(np.int8)}])


@pytest.mark.parametrize(
    ("target", "group", "instruction"),
    [
        ("avx2", 128, "llvm.x86.avx2.pmadd.ub.sw"),  # unsigned codes x int8 on vpmaddubsw, summed per group
        ("avx512vnni", 64, "llvm.x86.avx512.vpdpbusd.512"),  # the same on 16 lanes
        ("avx2", 6, "llvm.x86.avx2.pmadd.wd"),  # a group size that is not a multiple of 4: int16 weights
    ],
)
def test_qgemm_int4_kernel_uses_the_targets_dot_and_no_float(target: str, group: int, instruction: str) -> None:
    """Compiles on any host (the code is not run): the int8 dot of the target on the int4 codes where the group
    size allows, the int16 pair kernel otherwise; no float instruction either way. The grouped form reads the
    unsigned codes as they are unpacked: no sign fix-up (vpsignb) of either operand."""
    chosen = _AVX2_TARGET if target == "avx2" else _VNNI_TARGET
    module = build(_int4_model(np.random.default_rng(1), 16, 64, 256, group), {"x": [16, 256]}, target=chosen)
    assert instruction in module.llvm_ir()
    assert "psign" not in module.llvm_ir()
    assert not float_functions(module.llvm_ir())


@pytest.mark.parametrize("target", ["avx2", "avx512vnni", "generic"])
@pytest.mark.parametrize(
    ("m", "n", "k", "group"),
    [(1, 300, 256, 128), (4, 40, 130, 32), (9, 17, 70, 8), (16, 300, 256, 128)],
    ids=["unpacked-per-step", "per-step-odd-k", "whole-matrix", "per-panel"],  # where the codes are unpacked
)
def test_qgemm_int4_bit_exact_on_each_int8_isa(target: str, m: int, n: int, k: int, group: int) -> None:
    """Where the host runs the target's code: the grouped kernel of each ISA (generic: x86-64 without a dot
    instruction, LLVM's vectors), bit-exact with the reference on random and extreme codes and activations (-8
    codes times -128 activations at the largest group scale: the largest group sums; the u8 x s8 kernel takes
    the offset out of each group's sum before scaling, so its intermediates are the reference's)."""
    chosen = {"avx2": _AVX2_TARGET, "avx512vnni": _VNNI_TARGET, "generic": _GENERIC_X86_TARGET}[target]
    if target != "generic":
        _skip_unless_host_runs(chosen)
    rng = np.random.default_rng(m + n + k)
    for extreme in (False, True):
        model = _int4_model(rng, m, n, k, group, extreme_codes=extreme, max_scale=4095 if extreme else 256)
        feeds = [{"x": rng.integers(-128, 128, (m, k)).astype(np.int8)}, {"x": np.full((m, k), -128, np.int8)}]
        assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}, target=chosen), model, feeds)


def test_qgemm_int4_reference_rejects_mismatched_shapes() -> None:
    rng = np.random.default_rng(2)
    model = _int4_model(rng, 2, 4, 64, 32)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 70  # K = 70: 35 bytes per row expected
    with pytest.raises(ValueError, match="packed weights hold 64 codes per row, the input has K = 70"):
        run_reference(model, {"x": np.zeros((2, 70), np.int8)})


# --- int8 dot instruction per target (AVX2 psign, AVX-512 VNNI) ---------------------------------------------------

_VNNI_TARGET = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2}
_AVX2_TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def _skip_unless_host_runs(target: dict) -> None:
    needed = {"avx2"} if target is _AVX2_TARGET else {"avx2", "avx512_vnni", "avx512vl"}
    if not needed <= host_cpu_features():
        pytest.skip(f"this CPU cannot run {target['mcpu']} code")


def test_int8_dot_isa_follows_the_target() -> None:
    import tvm

    from qcompiler.backends.tvm import int8_dot_isa

    assert int8_dot_isa(tvm.target.Target(_VNNI_TARGET)) == "avx512vnni"
    # AMX CPUs get the 512-bit VNNI kernel (they all have AVX-512 VNNI; no AMX tile kernel is generated)
    assert int8_dot_isa(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})) == "avx512vnni"
    assert int8_dot_isa(tvm.target.Target(_AVX2_TARGET)) == "avx2"
    assert int8_dot_isa(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})) == "generic"


def _qgemm_case(m: int, n: int, k: int):
    rng = np.random.default_rng(m * 7 + n + k)
    mult, shift = _epilogue_params(rng, n, per_channel=True)
    inits = {"w": rng.integers(-127, 128, (n, k)).astype(np.int8), "b": rng.integers(-5000, 5000, n).astype(np.int32),
             "m": mult, "s": shift}  # fmt: skip
    model = _single("QGemm", ["w", "b", "m", "s"], (m, k), inits)
    feeds = [{"x": rng.integers(-128, 128, (m, k)).astype(np.int8)}, {"x": np.full((m, k), -128, np.int8)}]
    return model, feeds


def test_vnni_gemm_compiles_for_a_vnni_cpu_on_any_host() -> None:
    """The VNNI kernel is emitted for a VNNI mcpu (vpdpbusd in the LLVM IR, no float instruction)."""
    model, _ = _qgemm_case(4, 40, 64)
    module = build(model, {"x": [4, 64]}, target=_VNNI_TARGET)
    assert "llvm.x86.avx512.vpdpbusd.512" in module.llvm_ir()
    assert not float_functions(module.llvm_ir())


@pytest.mark.parametrize("target", [_AVX2_TARGET, _VNNI_TARGET], ids=["avx2", "avx512vnni"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 9, 5), (5, 40, 130), (16, 64, 256)])
def test_qgemm_bit_exact_on_each_int8_isa(target: dict, m: int, n: int, k: int) -> None:
    """Where the host can run the target's code: bit-exact with the reference, weights down to -127 and
    activations at -128 (the psign extremes) included."""
    _skip_unless_host_runs(target)
    model, feeds = _qgemm_case(m, n, k)
    assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}, target=target), model, feeds)


# --- attention's int8 x int8 batched products (MatMulInteger of two activations) ---------------------------------


def _matmul_integer_model(shape_a, shape_b, zero_point: int | None = None):
    inputs = ["a", "b"] + (["", "bz"] if zero_point is not None else [])
    inits = [numpy_helper.from_array(np.array(zero_point, np.int8), "bz")] if zero_point is not None else []
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", inputs, ["y"])],
        "mmi",
        [helper.make_tensor_value_info("a", TensorProto.INT8, list(shape_a)),
         helper.make_tensor_value_info("b", TensorProto.INT8, list(shape_b))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((8, 12, 32, 32), (8, 12, 32, 32)), ((2, 3, 5, 7), (2, 3, 7, 9)), ((1, 3, 128, 64), (1, 3, 64, 96)),
     ((1, 1), (1, 1)), ((4, 5), (5, 3)), ((3, 33, 16), (3, 16, 48)), ((2, 6, 8), (2, 8, 80))],
)  # fmt: skip
@pytest.mark.parametrize("target", [_AVX2_TARGET, _VNNI_TARGET], ids=["avx2", "avx512vnni"])
def test_batched_matmul_integer_bit_exact(shape_a, shape_b, target) -> None:
    """The scheduled batched kernels (int32 lanes; VNNI: per-call packing, u8 offset) on odd M, K, N, N above
    the 64-column tile, no batch, against int64 numpy, where the host runs the target's code."""
    _skip_unless_host_runs(target)
    shapes = {"a": list(shape_a), "b": list(shape_b)}
    module = build(_matmul_integer_model(shape_a, shape_b), shapes, target=target)
    rng = np.random.default_rng(sum(shape_a) + sum(shape_b))
    for a, b in [
        (rng.integers(-128, 128, shape_a), rng.integers(-128, 128, shape_b)),
        (np.full(shape_a, -128), np.full(shape_b, -128)),  # the largest accumulators
        (np.full(shape_a, -128), np.full(shape_b, 127)),
    ]:
        a, b = a.astype(np.int8), b.astype(np.int8)
        got = module.run({"a": a, "b": b})[0]
        np.testing.assert_array_equal(got, np.matmul(a.astype(np.int64), b.astype(np.int64)))


def test_batched_matmul_integer_kernel_is_scheduled_and_zero_points_fall_back() -> None:
    """No zero point: our tagged kernels (int32 lanes; vpdpbusd on a VNNI target); a zero point: TVM's
    converter, exact."""
    model, shapes = _matmul_integer_model((4, 16, 32), (4, 32, 32)), {"a": [4, 16, 32], "b": [4, 32, 32]}
    lanes = build(model, shapes, target=_AVX2_TARGET).llvm_ir()
    assert "qbatch_matmul" in lanes and "<16 x i32>" in lanes and "vpdpbusd" not in lanes
    vnni = build(model, shapes, target=_VNNI_TARGET).llvm_ir()
    assert "qbatch_gemm" in vnni and "llvm.x86.avx512.vpdpbusd.512" in vnni and not float_functions(vnni)
    model = _matmul_integer_model((2, 3, 5), (2, 5, 4), zero_point=3)
    module = build(model, {"a": [2, 3, 5], "b": [2, 5, 4]})
    rng = np.random.default_rng(5)
    a, b = rng.integers(-128, 128, (2, 3, 5)).astype(np.int8), rng.integers(-128, 128, (2, 5, 4)).astype(np.int8)
    expected = np.matmul(a.astype(np.int64), b.astype(np.int64) - 3)
    np.testing.assert_array_equal(module.run({"a": a, "b": b})[0], expected)


@pytest.mark.parametrize("target", [_AVX2_TARGET, _VNNI_TARGET], ids=["avx2", "avx512vnni"])
@pytest.mark.parametrize(("shape_a", "shape_b"), [((1, 3, 40, 24), (1, 3, 24, 16)), ((2, 5, 7), (2, 7, 33))])
def test_int32_matmul_and_output_dequantize_kernels_match_onnx(shape_a, shape_b, target) -> None:
    """The lowering's widened int16 x int8 product (an int32 MatMul; on VNNI the int16 pair kernel on the
    un-widened operands) and the per-tensor output DequantizeLinear: our scheduled kernels, equal to numpy (int32
    sums; float32 ``(x - z) * s``)."""
    _skip_unless_host_runs(target)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["a"], ["a32"], to=TensorProto.INT32),
         helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.INT32),
         helper.make_node("MatMul", ["a32", "b32"], ["p"]),
         helper.make_node("Cast", ["p"], ["p8"], to=TensorProto.INT8),
         helper.make_node("DequantizeLinear", ["p8", "s", "z"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("a", TensorProto.INT16, list(shape_a)),
         helper.make_tensor_value_info("b", TensorProto.INT8, list(shape_b))],
        [helper.make_tensor_value_info("p", TensorProto.INT32, None),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(0.0371, np.float32), "s"),
         numpy_helper.from_array(np.array(-3, np.int8), "z")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    module = build(model, {"a": list(shape_a), "b": list(shape_b)}, target=target)
    text = module.llvm_ir()
    assert "dequantize_output" in text
    if target is _VNNI_TARGET:
        assert "qbatch_gemm" in text and "llvm.x86.avx512.vpdpwssd.512" in text
    else:
        assert "qbatch_matmul" in text
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2**15, shape_a).astype(np.int16)
    b = rng.integers(-128, 128, shape_b).astype(np.int8)
    product, y = module.run({"a": a, "b": b})
    expected = np.matmul(a.astype(np.int64), b.astype(np.int64))
    np.testing.assert_array_equal(product, expected)
    wrapped = expected.astype(np.int32).astype(np.int8)  # ONNX Cast int32 -> int8 wraps
    np.testing.assert_array_equal(y, (wrapped.astype(np.float32) - np.float32(-3)) * np.float32(0.0371))


# --- targets without an x86 int8 dot instruction -------------------------------------------------------------

_GENERIC_X86_TARGET = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}
_AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2}


@pytest.mark.parametrize(("m", "n", "k"), [(1, 9, 5), (5, 40, 130), (16, 64, 256)])
def test_qgemm_generic_path_bit_exact(m: int, n: int, k: int) -> None:
    """No dot intrinsic (plain x86-64): the vectorized int32 lanes, bit-exact, -128 weights included."""
    model, feeds = _qgemm_case(m, n, k)
    assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}, target=_GENERIC_X86_TARGET), model, feeds)


def test_aarch64_target_compiles_to_neon_without_x86_intrinsics() -> None:
    """A NEON target: the generic kernels, compiled (not run here: another architecture), vector int32 code in the
    LLVM IR, no x86 intrinsic, no float in the integer kernels."""
    import tvm

    from qcompiler.backends.tvm import int8_dot_isa

    assert int8_dot_isa(tvm.target.Target(_AARCH64_TARGET)) == "generic"
    model, _ = _qgemm_case(5, 40, 130)
    module = build(model, {"x": [5, 130]}, target=_AARCH64_TARGET)
    text = module.llvm_ir()
    assert "aarch64" in text and "llvm.x86" not in text
    assert "<4 x i32>" in text or "<8 x i32>" in text
    assert not float_functions(text)


def test_float_check_names_the_kernel_that_launches_a_parallel_loop() -> None:
    """A parallel loop's body is its own LLVM function: the check reports it under the kernel that launches it
    (the output dequantize may use float; an integer kernel's loop body may not), and it is never fooled by a
    lambda whose name extends another's."""
    text = """
define i32 @dequantize_output_compute_(ptr %0) {
  %r = call i32 @TVMBackendParallelLaunch(ptr @__tvm_parallel_lambda, ptr %0, i32 0)
  ret i32 %r
}
define i32 @qgemm_compute_(ptr %0) {
  %r = call i32 @TVMBackendParallelLaunch(ptr @__tvm_parallel_lambda.7, ptr %0, i32 0)
  ret i32 %r
}
define i32 @__tvm_parallel_lambda(i32 %0) {
  %f = sitofp i32 %0 to float
  ret i32 0
}
define i32 @__tvm_parallel_lambda.7(i32 %0) {
  %f = fmul float 1.0, 2.0
  ret i32 0
}
"""
    assert float_functions(text) == {
        "dequantize_output_compute_/__tvm_parallel_lambda": ["float", "sitofp"],
        "qgemm_compute_/__tvm_parallel_lambda.7": ["float", "fmul"],
    }


# --- convolution layouts: NHWC im2col (contiguous channel runs) against NCHW ------------------------------------

_CONV_CASES = [
    ((1, 3, 9, 7), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),  # C not a multiple of 4: the patch rows padded
    ((2, 5, 11, 10), (7, 5, 3, 3), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),  # batch 2, stride 2, uneven pads
    ((1, 6, 10, 9), (4, 6, 3, 2), {"dilations": [2, 1], "pads": [0, 1, 2, 0]}),
    ((1, 32, 7, 7), (40, 32, 1, 1), {}),  # 1x1: the patch matrix is the input's pixel rows
    ((1, 16, 8, 12), (20, 16, 5, 5), {"pads": [2, 2, 2, 2]}),  # 16-channel runs: vector copies
    ((2, 1, 9, 9), (6, 1, 3, 3), {"strides": [2, 1]}),  # one channel
]


@pytest.mark.parametrize(("shape", "w_shape", "attrs"), _CONV_CASES)
@pytest.mark.parametrize(
    "target", [_AVX2_TARGET, _VNNI_TARGET, _GENERIC_X86_TARGET], ids=["avx2", "avx512vnni", "generic"]
)
def test_qconv_nhwc_bit_exact_on_each_int8_isa(shape, w_shape, attrs, target: dict) -> None:
    """The NHWC im2col on every GEMM path this host runs (AVX2 psign and, with -128 weights, int16 pairs; VNNI
    u8 x s8; generic int32 lanes), activations at both extremes, against the reference."""
    if target is not _GENERIC_X86_TARGET:
        _skip_unless_host_runs(target)
    for minus_128 in (False, True):
        model, feeds = _qconv_case(shape, w_shape, attrs, minus_128=minus_128)
        builder = lambda proto: build(proto, {"x": list(shape)}, target=target, conv_layout="NHWC")  # noqa: E731
        assert_bit_exact(builder, model, feeds)


def _conv_chain(*, second_output: bool):
    """x -> QConv(4 -> 8) -> QConv(8 -> 6), both 3x3; ``second_output``: the first convolution's result is a graph
    output too (the permute back to NCHW between them must then stay)."""
    rng = np.random.default_rng(21)
    inits, nodes = {}, []
    for i, (cin, cout) in enumerate([(4, 8), (8, 6)]):
        inits |= {
            f"w{i}": rng.integers(-128, 128, (cout, cin, 3, 3)).astype(np.int8),
            f"b{i}": rng.integers(-2000, 2000, cout).astype(np.int32),
            f"m{i}": rng.integers(1 << 30, 1 << 31, cout).astype(np.int32),
            f"s{i}": np.full(cout, 38, np.int32),
        }
        inputs = ["x" if i == 0 else "c0", f"w{i}", f"b{i}", f"m{i}", f"s{i}"]
        nodes.append(helper.make_node("QConv", inputs, [f"c{i}"], domain=DOMAIN, pads=[1, 1, 1, 1], lo=-20))
    outputs = ["c1", "c0"] if second_output else ["c1"]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 4, 6, 5])],
        [helper.make_tensor_value_info(name, TensorProto.INT8, None) for name in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    feeds = [{"x": rng.integers(-128, 128, (2, 4, 6, 5)).astype(np.int8)}, {"x": np.full((2, 4, 6, 5), -128, np.int8)}]
    return model, feeds


def _layout_transposes(model, layout: str) -> int:
    """How many layout-transpose kernels the imported module calls."""
    from qcompiler.backends.tvm import importer

    with warnings.catch_warnings():  # TVM warns about every initializer that is not a graph input
        warnings.simplefilter("ignore", UserWarning)
        mod = importer.import_onnx(model, {"x": [2, 4, 6, 5]}, isa="avx2", conv_layout=layout)
    return str(mod["main"]).count("R.call_tir(layout_transpose")


@pytest.mark.parametrize("second_output", [False, True])
def test_consecutive_nhwc_convolutions_skip_the_permutes_between_them(second_output: bool) -> None:
    """Two NHWC convolutions in a row: one permute in, one out, none between (4 without the skip); where the first
    result is also a graph output its permute back stays. Bit-exact either way."""
    model, feeds = _conv_chain(second_output=second_output)
    assert _layout_transposes(model, "NHWC") == (3 if second_output else 2)
    assert _layout_transposes(model, "NCHW") == 0
    assert_bit_exact(lambda proto: build(proto, {"x": [2, 4, 6, 5]}, conv_layout="NHWC"), model, feeds)


def test_auto_layout_is_nhwc_except_for_a_single_input_channel() -> None:
    from qcompiler.backends.tvm import importer
    from qcompiler.backends.tvm.kernels import ConvGeometry

    def geometry(channels: int) -> ConvGeometry:
        return ConvGeometry(1, channels, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1))

    assert importer.conv_layout_for(geometry(1), "auto") == "NCHW"
    assert importer.conv_layout_for(geometry(3), "auto") == "NHWC"
    assert importer.conv_layout_for(geometry(3), "NCHW") == "NCHW"
    assert importer.conv_layout_for(geometry(1), "NHWC") == "NHWC"
    model, _ = _conv_chain(second_output=False)
    assert _layout_transposes(model, "auto") == 2


def test_nhwc_convolution_is_integer_only_and_uses_the_dot_instruction() -> None:
    model, _ = _qconv_case((1, 16, 8, 8), (32, 16, 3, 3), {"pads": [1, 1, 1, 1]})
    text = build(model, {"x": [1, 16, 8, 8]}, target=_VNNI_TARGET, conv_layout="NHWC").llvm_ir()
    assert "qconv_nhwc" in text and "layout_transpose" in text
    assert "llvm.x86.avx512.vpdpbusd.512" in text
    assert not float_functions(text)


def test_unknown_conv_layout_is_rejected() -> None:
    model, _ = _qconv_case((1, 3, 5, 5), (4, 3, 3, 3), {})
    with pytest.raises(ValueError, match="conv_layout: 'NCWH' is not one of auto, NCHW, NHWC"):
        build(model, {"x": [1, 3, 5, 5]}, conv_layout="NCWH")


# --- per-kernel profile ------------------------------------------------------------------------------------------


def test_profile_has_a_row_per_kernel_with_its_calls() -> None:
    """One QGemm: its kernel is called once per run and takes most of the time of a large enough GEMM; shares sum
    to one; a non-positive repeat is refused."""
    model, feeds = _qgemm_case(64, 256, 512)
    module = build(model, {"x": [64, 512]})
    rows = module.profile(feeds[0], repeat=3)
    gemm = next(row for row in rows if row["kernel"].startswith("qgemm"))
    assert gemm["calls"] == 1 and gemm is rows[0]
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)
    assert all(row["ms"] >= 0 and row["calls"] >= 1 for row in rows)
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        module.profile(feeds[0], repeat=0)


def test_constant_nodes_of_any_attribute_form_build() -> None:
    """A Reshape whose shape is a Constant node with ``value_ints`` (what folding leaves) builds: TVM's importer
    reads only ``value``, so the build lifts every Constant node to an initializer first."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["shape"], value_ints=[2, 3]),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.INT8, [6])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.arange(6, dtype=np.int8)
    np.testing.assert_array_equal(build(model, {"x": [6]}).run({"x": x})[0], x.reshape(2, 3))
    assert model.graph.node[0].op_type == "Constant"  # the caller's model is left as it was


def test_gather_reads_like_onnx_and_an_index_out_of_range_does_not_fault(capfd) -> None:
    """Gather of an int8 table by int64 ids (an embedding lookup): negative ids count from the end as ONNX says,
    and an id out of range (a bad token id) reads a clamped row instead of reading out of bounds; the build is
    silent (TVM's ``fast`` take warned at every build)."""
    table = np.arange(-60, 60, dtype=np.int8).reshape(10, 12)
    node = helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)
    graph = helper.make_graph(
        [node],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 3, 12])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    module = build(model, {"ids": [2, 3]})
    assert "Fast mode" not in capfd.readouterr().err
    ids = np.array([[0, 9, -1], [-10, 4, 3]], np.int64)
    np.testing.assert_array_equal(module.run({"ids": ids})[0], table[ids])
    bad = np.array([[0, 10, 1 << 40], [-11, 4, 3]], np.int64)
    np.testing.assert_array_equal(module.run({"ids": bad})[0], table[[[0, 9, 9], [0, 4, 3]]])


# --- W8A16: int16 activations against int16-widened weights (QGemm and QConv) -------------------------------------


def _wide_feeds(rng, shape, bound: int):
    """Random int16 levels within ``bound`` and the extremes ``-bound``, ``+bound`` (the largest sums)."""
    return [
        {"x": rng.integers(-bound, bound + 1, shape).astype(np.int16)},
        {"x": np.full(shape, -bound, np.int16)},
        {"x": np.full(shape, bound, np.int16)},
    ]


@pytest.mark.parametrize("target", [_AVX2_TARGET, _VNNI_TARGET], ids=["avx2", "avx512vnni"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 9, 5), (5, 40, 130), (16, 64, 256)])
def test_int16_activation_qgemm_bit_exact_on_each_isa(target: dict, m: int, n: int, k: int) -> None:
    """W8A16's QGemm (int16 x int8 weights on the int16 pair instruction): bit-exact with the reference, weights at
    -128 and +127 and activations at the largest level the int32 sum allows."""
    _skip_unless_host_runs(target)
    rng = np.random.default_rng(m * 7 + n + k + 1)
    mult, shift = _epilogue_params(rng, n, per_channel=True)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w[0, :] = -128
    inits = {"w": w, "b": rng.integers(-5000, 5000, n).astype(np.int32), "m": mult, "s": shift}
    model = _single("QGemm", ["w", "b", "m", "s"], (m, k), inits, x_dtype=TensorProto.INT16)
    bound = min(32767, (2**31 - 1 - 5000) // (128 * k))
    feeds = _wide_feeds(rng, (m, k), bound)
    assert_bit_exact(lambda proto: build(proto, {"x": [m, k]}, target=target), model, feeds)


@pytest.mark.parametrize("target", [_AVX2_TARGET, _VNNI_TARGET], ids=["avx2", "avx512vnni"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("group", [1, 6])
def test_int16_activation_qconv_bit_exact_on_each_isa(target: dict, layout: str, group: int) -> None:
    """W8A16's QConv: im2col of int16 pixels into the int16 pair GEMM (either layout), or the direct form for a
    grouped convolution; bit-exact with the reference."""
    _skip_unless_host_runs(target)
    rng = np.random.default_rng(group + len(layout))
    channels, out, side = 6, 12, 19  # rows of 19 pixels: a full and a partial 16-pixel tile when grouped
    mult, shift = _epilogue_params(rng, out, per_channel=True)
    inits = {"w": rng.integers(-127, 128, (out, channels // group, 3, 3)).astype(np.int8),
             "b": rng.integers(-5000, 5000, out).astype(np.int32), "m": mult, "s": shift}  # fmt: skip
    shape = (1, channels, side, side)
    model = _single("QConv", ["w", "b", "m", "s"], shape, inits, x_dtype=TensorProto.INT16, pads=[1, 1, 1, 1],
                    group=group, lo=-32768, hi=32767, out_dtype=TensorProto.INT16)  # fmt: skip
    build_it = lambda proto: build(proto, {"x": list(shape)}, target=target, conv_layout=layout)  # noqa: E731
    assert_bit_exact(build_it, model, _wide_feeds(rng, shape, 32767))


def test_int16_activation_gemm_uses_the_int16_pair_instructions() -> None:
    """Compiles on any host: vpdpwssd for a VNNI CPU, vpmaddwd for AVX2, no float instruction."""
    rng = np.random.default_rng(3)
    mult, shift = _epilogue_params(rng, 40, per_channel=True)
    inits = {"w": rng.integers(-127, 128, (40, 64)).astype(np.int8), "b": np.zeros(40, np.int32), "m": mult,
             "s": shift}  # fmt: skip
    model = _single("QGemm", ["w", "b", "m", "s"], (4, 64), inits, x_dtype=TensorProto.INT16)
    for target, instruction in (
        (_VNNI_TARGET, "llvm.x86.avx512.vpdpwssd.512"),
        (_AVX2_TARGET, "llvm.x86.avx2.pmadd.wd"),
    ):
        module = build(model, {"x": [4, 64]}, target=target)
        assert instruction in module.llvm_ir()
        assert not float_functions(module.llvm_ir())
