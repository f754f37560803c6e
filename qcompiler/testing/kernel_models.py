"""Tiny hand-made models for kernel tests: one node of the ``qcompiler`` domain (or a standard op).

(Not ``models.py``: that name would shadow the ``qcompiler.testing.models`` strategy.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.dialect import DOMAIN, OPSET_VERSION


def single_node_model(
    op: str,
    constant_inputs: Sequence[str],
    input_shape: Sequence[int],
    constants: Mapping[str, np.ndarray],
    *,
    input_dtype: int = TensorProto.INT8,
    output_dtype: int = TensorProto.INT8,
    domain: str = DOMAIN,
    **attributes: Any,
) -> onnx.ModelProto:
    """``y = op(x, *constant_inputs)`` with graph input ``x`` of ``input_shape`` and the named ``constants``."""
    graph = helper.make_graph(
        [helper.make_node(op, ["x", *constant_inputs], ["y"], domain=domain, **attributes)],
        op,
        [helper.make_tensor_value_info("x", input_dtype, list(input_shape))],
        [helper.make_tensor_value_info("y", output_dtype, None)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in constants.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    return helper.make_model(graph, opset_imports=opsets)


def int4_gemm_model(
    rng: np.random.Generator,
    m: int,
    n: int,
    k: int,
    group: int,
    *,
    multiplier: np.ndarray,
    shift: np.ndarray,
    bias_bound: int = 1000,
    codes: tuple[int, int] = (-7, 7),
    max_scale: int = 256,
    extreme: bool = False,
    output_dtype: int = TensorProto.INT8,
    **attributes: Any,
) -> onnx.ModelProto:
    """One ``QGemmInt4`` on input ``x [m, k]``: random codes in ``codes`` (the weight quantizer writes [-7, 7]),
    packed two per byte (a zero padding nibble for an odd K), group scales in [1, ``max_scale``] per ``group``
    input channels, a bias in ``(-bias_bound, bias_bound)``, the given epilogue. ``extreme``: every code -8 at
    the largest group scale (the largest products)."""
    from qcompiler.dialect.int4 import pack_int4

    values = rng.integers(codes[0], codes[1] + 1, (n, k + k % 2)).astype(np.int8)
    values[:, k:] = 0
    scales = rng.integers(1, max_scale + 1, (n, -(-k // group))).astype(np.int16)
    if extreme:
        values[:, :k] = -8
        scales[:] = max_scale
    constants = {
        "w": pack_int4(values),
        "g": scales,
        "b": rng.integers(-bias_bound + 1, bias_bound, n).astype(np.int32),
        "m": multiplier,
        "s": shift,
    }
    return single_node_model(
        "QGemmInt4", ["w", "g", "b", "m", "s"], (m, k), constants, output_dtype=output_dtype, group_size=group,
        **attributes,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One kernel of the integer dialect with the inputs that test it: a model, its input shapes, feeds."""

    name: str
    model: onnx.ModelProto
    shapes: dict[str, list[int]]
    feeds: list[dict[str, np.ndarray]]


def _epilogue(rng: np.random.Generator, n: int, shifts: tuple[int, int]) -> dict[str, np.ndarray]:
    return {
        "b": rng.integers(-5000, 5000, n).astype(np.int32),
        "m": rng.integers(1 << 30, 1 << 31, n).astype(np.int32),
        "s": rng.integers(*shifts, n).astype(np.int32),
    }


def _int8_feeds(rng: np.random.Generator, shape: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Random int8, then every element at each extreme (the largest accumulators of either sign)."""
    return [
        {"x": rng.integers(-128, 128, shape).astype(np.int8)},
        {"x": np.full(shape, -128, np.int8)},
        {"x": np.full(shape, 127, np.int8)},
    ]


def kernel_cases() -> list[KernelCase]:
    """The integer dialect's kernels (QGemm, QConv, QGemmInt4, Hadamard, Requantize, RescaleAdd, QuantizeLinear)
    at odd shapes, extremes and rounding ties: the GPU backends' bit-exact set
    (tests/backends/test_gpu.py on OpenCL, benchmarks/bench_gpu.py on a CUDA device)."""
    cases = []
    for m, n, k in [(1, 10, 256), (3, 33, 5), (17, 64, 130)]:
        for minus_128 in (False, True):
            rng = np.random.default_rng(m * 1000 + n * 10 + k)
            w = rng.integers(-128 if minus_128 else -127, 128, (n, k)).astype(np.int8)
            if minus_128:
                w.flat[0] = -128
            model = single_node_model("QGemm", ["w", "b", "m", "s"], (m, k), {"w": w, **_epilogue(rng, n, (36, 44))},
                                      lo=-100, hi=120)  # fmt: skip
            cases.append(KernelCase(f"qgemm {m}x{n}x{k}{' w-128' if minus_128 else ''}", model, {"x": [m, k]},
                                    _int8_feeds(rng, (m, k))))  # fmt: skip
    rng = np.random.default_rng(5)
    inits = {"w": rng.integers(-128, 128, (24, 40)).astype(np.int8), **_epilogue(rng, 24, (30, 31))}
    wide = single_node_model("QGemm", ["w", "b", "m", "s"], (5, 40), inits, output_dtype=TensorProto.INT16,
                             lo=-32768, hi=32767)  # fmt: skip
    cases.append(KernelCase("qgemm int16 out", wide, {"x": [5, 40]}, _int8_feeds(rng, (5, 40))))
    for shape, w_shape, attrs in [
        ((1, 1, 28, 28), (8, 1, 5, 5), {"pads": [2, 2, 2, 2]}),
        ((2, 3, 9, 7), (5, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ]:
        inits = {"w": rng.integers(-128, 128, w_shape).astype(np.int8), **_epilogue(rng, w_shape[0], (37, 38))}
        conv = single_node_model("QConv", ["w", "b", "m", "s"], shape, inits, lo=0, **attrs)  # type: ignore[arg-type]
        cases.append(KernelCase(f"qconv {shape}", conv, {"x": list(shape)}, _int8_feeds(rng, shape)))
    x = np.arange(-255, 256, dtype=np.int32).reshape(1, 511)  # multiplier 2^30, shift 31: every odd x is a tie
    requantize = single_node_model("Requantize", ["m", "s"], x.shape, {"m": np.array(1 << 30, np.int32),
                                   "s": np.array(31, np.int32)}, input_dtype=TensorProto.INT32, axis=1)  # fmt: skip
    cases.append(KernelCase("requantize ties", requantize, {"x": [1, 511]}, [{"x": x}]))
    a = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)  # a/2 + 3b/8: exact .5 ties for many (a, b)
    add = single_node_model("RescaleAdd", ["x2", "ma", "mb", "s"], (1, 256), {"x2": a[:, ::-1].copy(),
                            "ma": np.array(1 << 30, np.int32), "mb": np.array(3 << 28, np.int32),
                            "s": np.array(31, np.int32)}, lo=0)  # fmt: skip
    cases.append(KernelCase("rescale-add ties", add, {"x": [1, 256]}, [{"x": a}]))
    ties = (np.arange(-300, 300, dtype=np.float32) * 0.5).reshape(1, 600)
    quantize = single_node_model("QuantizeLinear", ["s", "z"], (1, 600), {"s": np.array(1.0, np.float32),
                                 "z": np.array(0, np.int8)}, input_dtype=TensorProto.FLOAT, domain="")  # fmt: skip
    cases.append(KernelCase("quantize ties (half to even)", quantize, {"x": [1, 600]}, [{"x": ties}]))
    for m, n, k, group in [(1, 24, 64, 32), (3, 33, 5, 2), (5, 17, 130, 32)]:
        for extreme in (False, True):
            rng = np.random.default_rng(m + n + k)
            model = int4_gemm_model(rng, m, n, k, group, multiplier=rng.integers(1 << 30, 1 << 31, n).astype(np.int32),
                                    shift=np.full(n, 40, np.int32), bias_bound=5000, codes=(-8, 7), extreme=extreme,
                                    output_dtype=TensorProto.INT16, lo=-20000, hi=20000)  # fmt: skip
            cases.append(KernelCase(f"qgemm-int4 {m}x{n}x{k} g{group}{' -8' if extreme else ''}", model,
                                    {"x": [m, k]}, _int8_feeds(rng, (m, k))[:2]))  # fmt: skip
    from qcompiler.dialect.hadamard import split_sylvester
    from qcompiler.passes.transform.hadamard import online_hadamard

    for rows, n in [((3, 64), 64), ((2, 5, 12), 12), ((2, 576), 576)]:
        block = split_sylvester(online_hadamard(n))
        assert block is not None
        for dtype, onnx_dtype in ((np.int8, TensorProto.INT8), (np.int16, TensorProto.INT16)):
            info = np.iinfo(dtype)
            model = single_node_model("Hadamard", ["h"], rows, {"h": block}, input_dtype=onnx_dtype,
                                      output_dtype=TensorProto.INT32)  # fmt: skip
            rng = np.random.default_rng(n)
            feeds = [  # H's first column's signs make |y_0| = n max|x|, the largest sum
                {"x": rng.integers(info.min, info.max + 1, rows).astype(dtype)},
                {"x": np.full(rows, info.min, dtype)},
                {"x": (online_hadamard(n)[:, 0] * info.max * np.ones(rows)).astype(dtype)},
            ]
            cases.append(KernelCase(f"hadamard {rows} {np.dtype(dtype).name}", model, {"x": list(rows)}, feeds))
    return cases
