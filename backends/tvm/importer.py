"""Import integer ONNX (standard ops + the ``qcompiler`` domain) into Relax.

TVM's ONNX importer does the standard ops; this module adds converters for our domain (and ConvInteger,
which TVM lacks) in one place, and replaces QuantizeLinear with a version that rounds half to even like
ONNX (TVM's ``relax.op.quantize`` rounds differently at ties). The converters emit our TE kernels with
pre-packed weights, tagged so :mod:`qcompiler.backends.tvm.schedules` can schedule them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.frontend.onnx import onnx_frontend as OF

from qcompiler.backends.tvm import kernels, nonlinear
from qcompiler.backends.tvm.schedules import (
    ACTIVATION_DTYPE_ATTR,
    CHANNEL_RUN_ATTR,
    KB_ATTR,
    KERNEL_ATTR,
    LANES_ATTR,
    MR_ATTR,
    NR_ATTR,
    ROW_TILE_ATTR,
    WEIGHT_DTYPE_ATTR,
)
from qcompiler.backends.tvm.tuning import Tile
from qcompiler.dialect import storage_dtype
from qcompiler.dialect.dyadic import ROW_EXPONENT_MAX
from qcompiler.errors import UnsupportedOpError
from qcompiler.ir.graph import ALIGNMENT


def _const_numpy(expr: relax.Expr, what: str, op: str) -> np.ndarray:
    value = getattr(expr, "value", None)
    if not isinstance(value, tvm.runtime.Tensor):
        raise UnsupportedOpError("?", op, f"its {what} must be a constant initializer for the TVM backend")
    return value.numpy()


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype.dtype) if hasattr(expr.ty.dtype, "dtype") else str(expr.ty.dtype)


def _rank(expr: relax.Expr) -> int:
    return int(expr.ty.ndim)


def _static_shape(expr: relax.Expr, op: str) -> list[int]:
    shape = expr.ty.shape
    if shape is None:
        raise UnsupportedOpError("?", op, "the TVM backend needs static input shapes; pass input shapes")
    dims = []
    for d in shape:
        if not isinstance(d, tvm.tirx.IntImm | int):
            raise UnsupportedOpError("?", op, "the TVM backend needs static input shapes; pass input shapes")
        dims.append(int(d))
    return dims


def _epilogue(attr: dict) -> dict[str, int]:
    return {
        "zero_point": int(attr.get("zero_point", 0)),
        "lo": int(attr.get("lo", -128)),
        "hi": int(attr.get("hi", 127)),
    }


def _gemm_attrs(plan: kernels.GemmPlan, tile: Tile | None = None) -> dict[str, object]:
    attrs: dict[str, object] = {KERNEL_ATTR: "gemm", KB_ATTR: plan.kb, NR_ATTR: plan.nr, LANES_ATTR: plan.lanes}
    if plan.wide_activations:
        attrs[ACTIVATION_DTYPE_ATTR] = "int16"
    if tile is not None:
        attrs[MR_ATTR] = tile.mr
    return attrs


@dataclasses.dataclass
class _ImportState:
    """What the converters of the import in progress read and record (:func:`import_onnx` sets it)."""

    isa: str = "avx2"
    tiles: Mapping[tuple[int, int, int], Tile] = dataclasses.field(default_factory=dict)  # (M, N, K) -> tile
    gemms: set[tuple[int, int, int, int]] = dataclasses.field(default_factory=set)  # (M, N, K, kb) planned
    conv_layout: str = "auto"  # "NCHW", "NHWC" or "auto" (:func:`conv_layout_for`) for group-1 convolutions
    nhwc_outputs: list[tuple[relax.Var, relax.Var]] = dataclasses.field(default_factory=list)  # (NCHW, pixel rows)
    skipped_permutes: int = 0  # NHWC convolutions that read their producer's pixel rows (dead permutes to remove)


_STATE = _ImportState()


def _plan_int8_gemm(
    weight_nk: np.ndarray, shift: np.ndarray, rows: int, wide: bool = False
) -> tuple[kernels.GemmPlan, Tile | None]:
    """The GEMM plan for this import's instruction set and tuned tiles; records the shape for tuning. ``wide``:
    int16 activations (W8A16), planned on the int16 pair instructions with the default tile."""
    n, k = weight_nk.shape
    if wide:
        return kernels.plan_gemm(weight_nk, shift, isa=_STATE.isa, wide_activations=True), None
    tile = _STATE.tiles.get((rows, n, k))
    plan = kernels.plan_gemm(weight_nk, shift, isa=_STATE.isa, nr=tile.nr if tile else None)
    _STATE.gemms.add((rows, n, k, plan.kb))
    return plan, tile


def _packed(weight_nk: np.ndarray, plan: kernels.GemmPlan) -> relax.Constant:
    """The packed weight as a constant: int8, or int16 for int16 activations."""
    packed = kernels.pack_weight(weight_nk, plan)
    return relax.const(packed, str(packed.dtype))


class QGemm(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        weight = _const_numpy(inputs[1], "weight", "QGemm")
        shape = _static_shape(x, "QGemm")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        shifts = _const_numpy(inputs[4], "shift", "QGemm")
        rows_in = len(inputs) > 5 and inputs[5] is not None
        # with row exponents a row's shift can drop by up to ROW_EXPONENT_MAX: plan the epilogue for that
        wide = _dtype(x) == "int16"
        plan, tile = _plan_int8_gemm(weight, shifts - ROW_EXPONENT_MAX if rows_in else shifts, rows, wide)
        x2 = bb.normalize(relax.op.reshape(x, [rows, plan.k])) if len(shape) != 2 else x
        args = [
            _packed(weight, plan),
            relax.const(kernels.pack_bias(_const_numpy(inputs[2], "bias", "QGemm"), weight, plan), "int32"),
            relax.const(kernels.pad_channels(_const_numpy(inputs[3], "multiplier", "QGemm"), plan, 1 << 30), "int32"),
            relax.const(kernels.pad_channels(shifts, plan, 31), "int32"),
        ]
        if rows_in:
            args.append(bb.normalize(relax.op.reshape(inputs[5], [rows, 1])))
        out = bb.emit_te(
            functools.partial(kernels.qgemm_compute, plan=plan, **_epilogue(attr)),
            x2,
            *args,
            primfunc_name_hint="qgemm",
            primfunc_attrs=_gemm_attrs(plan, tile),
        )
        if len(shape) != 2:
            return relax.op.reshape(out, [*shape[:-1], plan.n])
        return out


class RowExponent(OF.OnnxOpConverter):
    """int16 rows -> (int8 codes, int8 exponents): the exponents per row (a row-wise kernel), then the shift."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        shape = _static_shape(x, "RowExponent")
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        x2 = bb.normalize(relax.op.reshape(x, [rows, shape[-1]])) if len(shape) != 2 else x
        qmax = int(attr.get("qmax", 127))
        bound = int(attr.get("bound", 0)) or qmax
        exponent = bb.emit_te(
            kernels.row_exponent_compute, x2, qmax=bound, primfunc_name_hint="row_exponent",
            primfunc_attrs={KERNEL_ATTR: "rowwise"},
        )  # fmt: skip
        codes = bb.emit_te(
            kernels.row_shift_compute, x2, exponent, qmax=qmax, clamp=bound > qmax, primfunc_name_hint="row_shift",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )  # fmt: skip
        if len(shape) != 2:
            codes = bb.normalize(relax.op.reshape(codes, shape))
            exponent = bb.normalize(relax.op.reshape(exponent, [*shape[:-1], 1]))
        return relax.Tuple([codes, exponent])


class QGemmInt4(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        packed = _const_numpy(inputs[1], "packed weight", "QGemmInt4").astype(np.uint8)
        group_scale = _const_numpy(inputs[2], "group_scale", "QGemmInt4")
        shift = _const_numpy(inputs[5], "shift", "QGemmInt4")
        shape = _static_shape(x, "QGemmInt4")
        n, k = packed.shape[0], shape[-1]
        if int(group_scale.max(initial=1)) > kernels.INT4_INT16_MAX_SCALE or int(group_scale.min(initial=1)) < 1:
            raise UnsupportedOpError(
                "?", "QGemmInt4", f"group scales must lie in [1, {kernels.INT4_INT16_MAX_SCALE}] for int16 weights"
            )
        rows_in = len(inputs) > 6 and inputs[6] is not None  # row exponents: shifts drop by up to 9 per row
        group_size = int(attr.get("group_size", 128))
        plan = kernels.plan_int4_gemm(n, k, shift - ROW_EXPONENT_MAX if rows_in else shift, group_size, _STATE.isa)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        x2 = bb.normalize(relax.op.reshape(x, [rows, k])) if len(shape) != 2 else x
        codes = kernels.int4_codes(packed, k, plan)  # unpacked once, into the kernel's layout
        if plan.group:  # int4 codes on the int8 dot, scaled per group
            scales = relax.const(kernels.int4_group_scales(group_scale.astype(np.int16), plan), "int16")
            attrs = _gemm_attrs(plan)
        else:  # int16 weights: codes times group scales
            scales = relax.const(kernels.int4_panel_scales(group_scale.astype(np.int16), group_size, plan), "int16")
            attrs = {**_gemm_attrs(plan), WEIGHT_DTYPE_ATTR: "int16"}
        compute = functools.partial(kernels.qgemm_int4_compute, plan=plan, group_size=group_size, **_epilogue(attr))
        args = [
            relax.const(kernels.pack_int4_panels(codes, plan), "uint8"),  # the kernel's layouts, once
            scales,
            relax.const(kernels.pad_channels(_const_numpy(inputs[3], "bias", "QGemmInt4"), plan, 0), "int32"),
            relax.const(
                kernels.pad_channels(_const_numpy(inputs[4], "multiplier", "QGemmInt4"), plan, 1 << 30), "int32"
            ),
            relax.const(kernels.pad_channels(shift, plan, 31), "int32"),
        ]
        if rows_in:
            args.append(bb.normalize(relax.op.reshape(inputs[6], [rows, 1])))
        out = bb.emit_te(compute, x2, *args, primfunc_name_hint="qgemm_int4", primfunc_attrs=attrs)
        if len(shape) != 2:
            return relax.op.reshape(out, [*shape[:-1], n])
        return out


class QConv(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        weight = _const_numpy(inputs[1], "weight", "QConv")
        batch, channels, height, width = _static_shape(x, "QConv")
        out_channels, in_per_group, kh, kw = weight.shape
        geometry = kernels.ConvGeometry(
            batch=batch,
            channels=channels,
            height=height,
            width=width,
            kernel_h=kh,
            kernel_w=kw,
            strides=tuple(attr.get("strides", (1, 1))),
            pads=tuple(attr.get("pads", (0, 0, 0, 0))),
            dilations=tuple(attr.get("dilations", (1, 1))),
        )
        group = int(attr.get("group", 1))
        bias = _const_numpy(inputs[2], "bias", "QConv")
        mult = _const_numpy(inputs[3], "multiplier", "QConv")
        shift = _const_numpy(inputs[4], "shift", "QConv")
        if group == 1 and conv_layout_for(geometry, _STATE.conv_layout) == "NHWC":
            return _qconv_nhwc(bb, x, weight, bias, mult, shift, geometry, attr)
        if group == 1:
            flat = weight.reshape(out_channels, in_per_group * kh * kw)
            rows = batch * geometry.out_h * geometry.out_w
            plan, tile = _plan_int8_gemm(flat, shift, rows, _dtype(x) == "int16")
            return bb.emit_te(
                functools.partial(kernels.qconv_compute, geometry=geometry, plan=plan, **_epilogue(attr)),
                x,
                _packed(flat, plan),
                relax.const(kernels.pack_bias(bias, flat, plan), "int32"),
                relax.const(kernels.pad_channels(mult, plan, 1 << 30), "int32"),
                relax.const(kernels.pad_channels(shift, plan, 31), "int32"),
                primfunc_name_hint="qconv",
                primfunc_attrs={**_gemm_attrs(plan, tile), ROW_TILE_ATTR: geometry.out_w},
            )
        per_channel = [np.broadcast_to(v.reshape(-1), (out_channels,)).astype(np.int32) for v in (bias, mult, shift)]
        direct = functools.partial(kernels.qconv_direct_compute, geometry=geometry, group=group, **_epilogue(attr))
        return bb.emit_te(
            direct,
            x,
            relax.const(weight, "int8"),
            *[relax.const(v, "int32") for v in per_channel],
            primfunc_name_hint="qconv_grouped",
            primfunc_attrs={KERNEL_ATTR: "direct"},
        )


CONV_LAYOUTS = ("auto", "NCHW", "NHWC")


def conv_layout_for(geometry: kernels.ConvGeometry, requested: str) -> str:
    """The im2col layout of a group-1 convolution: ``requested``, or for ``"auto"`` NHWC unless the input has a
    single channel.

    Measured (``benchmarks/bench_cnn_mlp.py --conv-layouts``, docs/results.md: one convolution built both ways,
    NHWC including its two boundary transposes, 2 threads on a Zen 4 with VNNI, NCHW / NHWC us): MNIST conv1
    1x1x28x28 5x5 -> 8: 11.0 / 11.9; MNIST conv2 1x8x14x14 5x5 -> 16: 23 / 17; ResNet stem 1x3x224x224 7x7/2
    -> 64: 2719 / 2370; 1x64x56x56 3x3 -> 64: 1564 / 683; 1x128x28x28 3x3 -> 128: 1318 / 610; 1x256x14x14 1x1
    -> 256: 119 / 97 (NHWC 1.15-2.6x faster over three runs from three channels on, 0.92x with one). With one
    input channel both layouts build the same patch matrix with the same loops, so NHWC only adds its two
    transposes; from three channels on its contiguous channel runs win, by more the more channels.
    """
    if requested != "auto":
        return requested
    return "NCHW" if geometry.channels == 1 else "NHWC"


def _qconv_nhwc(
    bb: relax.BlockBuilder,
    x: relax.Expr,
    weight: np.ndarray,
    bias: np.ndarray,
    mult: np.ndarray,
    shift: np.ndarray,
    geometry: kernels.ConvGeometry,
    attr: dict,
) -> relax.Expr:
    """A group-1 convolution in NHWC (kernels.qconv_nhwc_compute) inside the NCHW graph. Its input: the pixel rows
    ``[B, H*W, C]`` of the NHWC convolution that produced ``x``, if one did (the permute pair between them is
    skipped, the unused permute back removed as dead code), else ``x`` permuted. Its output: the GEMM's rows
    viewed as ``[B, OH*OW, N]``, permuted back to NCHW for the graph, the pair recorded for the next
    convolution. Both permutes are our tiled transpose kernel; the reshapes are views."""
    flat = kernels.nhwc_weight(weight)
    g = geometry
    plan, tile = _plan_int8_gemm(flat, shift, g.batch * g.out_h * g.out_w, _dtype(x) == "int16")
    pixels = next((rows for nchw, rows in _STATE.nhwc_outputs if nchw.same_as(x)), None)
    if pixels is not None:
        _STATE.skipped_permutes += 1
    else:
        flat_x = bb.emit(relax.op.reshape(x, [g.batch, g.channels, g.height * g.width]))
        pixels = _emit_transpose(bb, kernels.nchw_to_pixels_compute, flat_x)
    rows = bb.emit_te(
        functools.partial(kernels.qconv_nhwc_compute, geometry=g, plan=plan, **_epilogue(attr)),
        pixels,
        _packed(flat, plan),
        relax.const(kernels.pack_bias(bias, flat, plan), "int32"),
        relax.const(kernels.pad_channels(mult, plan, 1 << 30), "int32"),
        relax.const(kernels.pad_channels(shift, plan, 31), "int32"),
        primfunc_name_hint="qconv_nhwc",
        primfunc_attrs={**_gemm_attrs(plan, tile), ROW_TILE_ATTR: g.out_w, CHANNEL_RUN_ATTR: g.channels},
    )
    out_pixels = bb.emit(relax.op.reshape(rows, [g.batch, g.out_h * g.out_w, plan.n]))
    to_nchw = functools.partial(kernels.pixels_to_nchw_compute, height=g.out_h, width=g.out_w)
    nchw = _emit_transpose(bb, to_nchw, out_pixels)
    _STATE.nhwc_outputs.append((nchw, out_pixels))
    return nchw


#: TVM's "opaque" operator pattern: FuseOps then leaves the kernel alone (it would fuse the reshapes around a
#: transpose into it, and their index arithmetic into its tiles)
OPAQUE_PATTERN = 8


def _emit_transpose(bb: relax.BlockBuilder, compute: Callable[[te.Tensor], te.Tensor], x: relax.Expr) -> relax.Var:
    return bb.emit_te(
        compute,
        x,
        primfunc_name_hint="layout_transpose",
        primfunc_attrs={KERNEL_ATTR: "transpose", "op_pattern": OPAQUE_PATTERN},
    )


def _requantize_te(
    x: te.Tensor, mult: te.Tensor, shift: te.Tensor, *, axis: int, zero_point: int, lo: int, hi: int
) -> te.Tensor:
    rank = len(x.shape)
    axis = axis % rank if rank else 0
    per_channel = int(mult.shape[0]) > 1

    def body(*idx):
        c = idx[axis] if per_channel else 0
        return kernels.requantize_expr(x(*idx), mult[c], shift[c], zero_point, lo, hi)

    return te.compute(x.shape, body, name="requant")


class Requantize(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        mult = _const_numpy(inputs[1], "multiplier", "Requantize").reshape(-1).astype(np.int32)
        shift = _const_numpy(inputs[2], "shift", "Requantize").reshape(-1).astype(np.int32)
        body = functools.partial(_requantize_te, axis=int(attr.get("axis", 1)), **_epilogue(attr))
        return bb.emit_te(
            body,
            inputs[0],
            relax.const(mult, "int32"),
            relax.const(shift, "int32"),
            primfunc_name_hint="requantize",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )


def _rescale_add_te(
    a: te.Tensor,
    b: te.Tensor,
    mult_a: te.Tensor,
    mult_b: te.Tensor,
    *,
    shift: int,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    one = tirx.const(1, "int64")
    c = tirx.const(shift, "int64")
    out_shape = [int(d) for d in np.broadcast_shapes(tuple(int(d) for d in a.shape), tuple(int(d) for d in b.shape))]

    def multiplier(mult: te.Tensor, idx: tuple) -> tirx.PrimExpr:
        return mult[idx[-1] if int(mult.shape[0]) > 1 else 0].astype("int64")

    def body(*idx):
        wide_a = nonlinear.broadcast_read(a, out_shape, idx).astype("int64")
        wide_b = nonlinear.broadcast_read(b, out_shape, idx).astype("int64")
        total = wide_a * multiplier(mult_a, idx) + wide_b * multiplier(mult_b, idx)
        rounded = ((total + (one << (c - one))) >> c) + tirx.const(zero_point, "int64")
        clamped = te.max(te.min(rounded, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
        return clamped.astype(storage_dtype(lo, hi).name)

    return te.compute(out_shape, body, name="rescale_add")


class RescaleAdd(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        _static_shape(a, "RescaleAdd"), _static_shape(b, "RescaleAdd")
        mults = [
            relax.const(_const_numpy(inputs[i], name, "RescaleAdd").reshape(-1).astype(np.int32), "int32")
            for i, name in ((2, "multiplier_a"), (3, "multiplier_b"))
        ]
        shift = int(_const_numpy(inputs[4], "shift", "RescaleAdd").reshape(()))
        body = functools.partial(_rescale_add_te, shift=shift, **_epilogue(attr))
        return bb.emit_te(
            body,
            a,
            b,
            *mults,
            primfunc_name_hint="rescale_add",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )


def _int_div_te(
    a: te.Tensor, b: te.Tensor, *, multiplier: int, shift: int, zero_point: int, lo: int, hi: int
) -> te.Tensor:
    """IntDiv (qcompiler.dialect.reference.int_div): floor((2n + d) / (2d)) with the signs made d > 0."""
    out_shape = [int(d) for d in np.broadcast_shapes(tuple(int(d) for d in a.shape), tuple(int(d) for d in b.shape))]
    zero, one, two = tirx.const(0, "int64"), tirx.const(1, "int64"), tirx.const(2, "int64")
    low, high, z = tirx.const(lo, "int64"), tirx.const(hi, "int64"), tirx.const(zero_point, "int64")

    def body(*idx):
        # the signs come from b itself: TVM's simplifier rewrites a comparison of (b << c) with zero wrongly
        divisor = nonlinear.broadcast_read(b, out_shape, idx).astype("int64")
        sign = tirx.Select(divisor < zero, -one, one)
        n = nonlinear.broadcast_read(a, out_shape, idx).astype("int64") * tirx.const(multiplier, "int64") * sign
        d = (divisor * sign) * tirx.const(1 << shift, "int64")
        quotient = tirx.floordiv(two * n + d, two * te.max(d, one)) + z
        saturated = tirx.Select(n > zero, high, tirx.Select(n < zero, low, z))
        value = tirx.Select(divisor == zero, saturated, quotient)
        return te.max(te.min(value, high), low).astype(storage_dtype(lo, hi).name)

    return te.compute(out_shape, body, name="int_div")


class IntDiv(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        _static_shape(inputs[0], "IntDiv"), _static_shape(inputs[1], "IntDiv")
        body = functools.partial(
            _int_div_te,
            multiplier=int(_const_numpy(inputs[2], "multiplier", "IntDiv").reshape(())),
            shift=int(_const_numpy(inputs[3], "shift", "IntDiv").reshape(())),
            **_epilogue(attr),
        )
        return bb.emit_te(
            body, inputs[0], inputs[1], primfunc_name_hint="int_div", primfunc_attrs={KERNEL_ATTR: "elementwise"}
        )


class ISqrt(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return bb.emit_te(
            nonlinear.isqrt_stages, inputs[0], primfunc_name_hint="isqrt", primfunc_attrs={KERNEL_ATTR: "elementwise"}
        )


class ConvInteger(OF.OnnxOpConverter):
    """Unfused int8 convolution (a graph lowered without the fuse pass)."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        if len(inputs) > 2 and any(i is not None for i in inputs[2:]):
            raise UnsupportedOpError("?", "ConvInteger", "zero points are not supported (symmetric only)")
        pads = list(attr.get("pads", (0, 0, 0, 0)))
        return relax.op.nn.conv2d(
            inputs[0],
            inputs[1],
            strides=attr.get("strides", (1, 1)),
            padding=pads,
            dilation=attr.get("dilations", (1, 1)),
            groups=int(attr.get("group", 1)),
            out_dtype="int32",
        )


class MatMulInteger(OF.OnnxOpConverter):
    """int8 x int8 products of two activations (attention) without zero points: the scheduled batched kernel;
    anything else (zero points, broadcast batch dimensions, dynamic shapes) TVM's own converter."""

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        zero_points = [z for z in inputs[2:] if z is not None]
        if zero_points or not _dtype(a) == _dtype(b) == "int8" or not _same_batch(a, b):
            return OF.MatMulInteger._impl_v10(bb, inputs, attr, params)
        if _STATE.isa == "avx512vnni" and not _few_rows(a):
            return _vnni_batched(bb, a, b, u8=True)
        return _lanes_batched(bb, a, b)


class MatMul(OF.OnnxOpConverter):
    """An int32 MatMul (the lowering's int16 probabilities times int8 values, both widened): the scheduled batched
    kernel; float and broadcast MatMuls: TVM's converter."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        a, b = inputs
        if _dtype(a) == _dtype(b) == "int32" and _same_batch(a, b):
            narrow_a, narrow_b = _widened_from(bb, a), _widened_from(bb, b)
            if narrow_a is not None and narrow_b is not None:
                if _STATE.isa == "avx512vnni" and not _few_rows(a):
                    return _vnni_batched(bb, narrow_a, narrow_b, u8=False)
                return _lanes_batched(bb, narrow_a, narrow_b)  # widened in registers, not in memory
            return _lanes_batched(bb, a, b)
        return OF.MatMul._impl_v13(bb, inputs, attr, params)

    _impl_v1 = _impl_v13
    _impl_v9 = _impl_v13


def _widened_from(bb: relax.BlockBuilder, value: relax.Expr) -> relax.Expr | None:
    """The int8 or int16 tensor ``value`` was cast from (the lowering widens products' operands), else None."""
    binding = bb.lookup_binding(value) if isinstance(value, relax.Var) else value
    if isinstance(binding, relax.Call) and binding.op == tvm.ir.Op.get("relax.astype"):
        source = binding.args[0]
        if _dtype(source) in ("int8", "int16"):
            return source
    return None


#: a batched product of fewer rows (a decode step's attention: one query per head) runs on int32 lanes, reading
#: ``b`` once in place: the VNNI kernel packs all of ``b`` (the whole KV cache) on every call to reuse it over rows
VNNI_MIN_ROWS = 4


def _few_rows(a: relax.Expr) -> bool:
    rows = _static_shape(a, "MatMul")[-2]
    return rows < VNNI_MIN_ROWS


def _lanes_batched(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    """The batched product on int32 lanes (any target). With few rows (a decode step's attention), ``b`` is read
    through the layout ops that made it (:func:`_view_of`: the cache Concat, the grouped-query head broadcast, the
    keys' transpose) inside the kernel, from the tensors they read: no copy of the cache per step; keys that arrive
    transposed are read along their rows (:func:`kernels.batch_matmul_rows_compute`)."""
    if not _few_rows(a):
        return bb.emit_te(
            kernels.batch_matmul_compute, a, b, primfunc_name_hint="qbatch_matmul",
            primfunc_attrs={KERNEL_ATTR: "batch_matmul"},
        )  # fmt: skip
    roots, replay, transposed = _view_of(bb, b)
    depth = _static_shape(a, "MatMul")[-1]
    rows_kernel = transposed and depth % 8 == 0

    def body(a_te: te.Tensor, *root_te: te.Tensor) -> te.Tensor:
        view = replay(list(root_te))
        if rows_kernel:
            return kernels.batch_matmul_rows_compute(a_te, view)
        return kernels.batch_matmul_compute(a_te, view)

    kind = "batch_matmul_rows" if rows_kernel else "batch_matmul"
    return bb.emit_te(body, a, *roots, primfunc_name_hint=f"q{kind}", primfunc_attrs={KERNEL_ATTR: kind})


def _replay_reshape(parts: list[te.Tensor], call: relax.Call, shape: list[int]) -> te.Tensor:
    return topi.reshape(parts[0], shape)


def _replay_permute(parts: list[te.Tensor], call: relax.Call, shape: list[int]) -> te.Tensor:
    axes = call.attrs.axes
    return topi.transpose(parts[0], None if axes is None else [int(x) for x in axes])


def _replay_slice(parts: list[te.Tensor], call: relax.Call, shape: list[int]) -> te.Tensor:
    """A strided slice with constant bounds (a step's span of the whole KV cache)."""
    axes, begins, _, strides = ([int(f.value) for f in arg.fields] for arg in call.args[1:5])
    rank = len(shape)
    start = {a % rank: b for a, b in zip(axes, begins, strict=True)}
    step = {a % rank: s for a, s in zip(axes, strides, strict=True)}
    return te.compute(shape, lambda *i: parts[0](*(start.get(a, 0) + step.get(a, 1) * i[a] for a in range(rank))),
                      name="slice")  # fmt: skip


#: layout ops a few-row product reads through (:func:`_view_of`), each replayed in TE on the tensors it reads:
#: Relax op -> (its TE form, given the parts, the call and the output shape)
_VIEW_REPLAYS: dict[str, Callable[[list[te.Tensor], relax.Call, list[int]], te.Tensor]] = {
    "relax.reshape": _replay_reshape,
    "relax.expand_dims": _replay_reshape,
    "relax.squeeze": _replay_reshape,
    "relax.permute_dims": _replay_permute,
    "relax.broadcast_to": lambda parts, call, shape: topi.broadcast_to(parts[0], shape),
    "relax.concat": lambda parts, call, shape: topi.concatenate(parts, axis=int(call.attrs.axis)),
    "relax.strided_slice": _replay_slice,
}
#: how many layout ops a view may stack (a KV cache's: its span, concat, unsqueeze, expand, reshapes, transpose)
_VIEW_DEPTH = 12


def _view_of(
    bb: relax.BlockBuilder, value: relax.Expr, depth: int = 0
) -> tuple[list[relax.Expr], Callable[[list[te.Tensor]], te.Tensor], bool]:
    """``value`` as layout ops (:data:`_VIEW_REPLAYS`) over the tensors they read: those tensors, a function that
    rebuilds ``value`` in TE from them, and whether a transpose moved its last axis (keys read transposed)."""
    leaf: tuple[list[relax.Expr], Callable[[list[te.Tensor]], te.Tensor], bool] = ([value], lambda p: p[0], False)
    binding = bb.lookup_binding(value) if isinstance(value, relax.Var) else None
    op = binding.op.name if isinstance(binding, relax.Call) and isinstance(binding.op, tvm.ir.Op) else None
    if op not in _VIEW_REPLAYS or depth >= _VIEW_DEPTH:
        return leaf
    assert isinstance(binding, relax.Call)
    try:
        shape = _static_shape(value, "MatMul")
    except UnsupportedOpError:
        return leaf
    sources = [binding.args[0]]
    if op == "relax.concat":
        fields = bb.lookup_binding(sources[0]) if isinstance(sources[0], relax.Var) else sources[0]
        if not isinstance(fields, relax.Tuple):
            return leaf
        sources = list(fields.fields)
    views = [_view_of(bb, source, depth + 1) for source in sources]
    roots = [root for view in views for root in view[0]]
    counts = [len(view[0]) for view in views]
    moved = op == "relax.permute_dims" and (
        binding.attrs.axes is None or int(binding.attrs.axes[-1]) != len(binding.attrs.axes) - 1
    )
    transposed = moved != any(view[2] for view in views)  # two transposes of the last axis undo each other

    def replay(parts: list[te.Tensor]) -> te.Tensor:
        rebuilt, start = [], 0
        for view, count in zip(views, counts, strict=True):
            rebuilt.append(view[1](parts[start : start + count]))
            start += count
        return _VIEW_REPLAYS[op](rebuilt, binding, shape)

    return roots, replay, transposed


def _vnni_batched(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr, *, u8: bool) -> relax.Expr:
    """The batched product on a VNNI dot instruction (kernels.batch_matmul_vnni_compute), on ``[batch, M, K] x
    [batch, K, N]`` views: int8 operands on u8 x s8 with the offset's column sums from a kernel of their own
    (``u8``), else int16 pairs. Scheduled as a GEMM whose batch loop joins the parallel one."""
    shape_a, shape_b = _static_shape(a, "MatMul"), _static_shape(b, "MatMul")
    batch = int(np.prod(shape_a[:-2]))
    a3 = bb.normalize(relax.op.reshape(a, [batch, *shape_a[-2:]]))
    b3 = bb.normalize(relax.op.reshape(b, [batch, *shape_b[-2:]]))
    args = [a3, b3]
    if u8:
        args.append(
            bb.emit_te(
                kernels.batch_column_offset_compute,
                b3,
                primfunc_name_hint="qbatch_gemm_offset",
                primfunc_attrs={KERNEL_ATTR: "column_sums"},
            )
        )
    columns = -(-shape_b[-1] // kernels.ZMM_LANES)
    attrs = {KERNEL_ATTR: "gemm", KB_ATTR: 4 if u8 else 2, LANES_ATTR: kernels.ZMM_LANES,
             NR_ATTR: next(v for v in (4, 2, 1) if columns % v == 0)}  # fmt: skip
    out = bb.emit_te(kernels.batch_matmul_vnni_compute, *args, primfunc_name_hint="qbatch_gemm", primfunc_attrs=attrs)
    return relax.op.reshape(out, [*shape_a[:-1], shape_b[-1]])


def _same_batch(a: relax.Expr, b: relax.Expr) -> bool:
    """Both operands static, of one rank >= 2, with equal batch dimensions and matching K."""
    if _rank(a) != _rank(b) or _rank(a) < 2:
        return False
    try:
        shape_a, shape_b = (_static_shape(x, "MatMul") for x in (a, b))
    except UnsupportedOpError:
        return False
    return shape_a[:-2] == shape_b[:-2] and shape_a[-1] == shape_b[-2]


def _dequantize_te(x: te.Tensor, scale: te.Tensor, zero: te.Tensor) -> te.Tensor:
    def body(*idx):
        return (x(*idx).astype("float32") - zero[()].astype("float32")) * scale[()]

    return te.compute(x.shape, body, name="dequantize")


class DequantizeLinear(OF.OnnxOpConverter):
    """The output's per-tensor DequantizeLinear, ``(x - z) * s`` in float32 as ONNX computes it, scheduled (the
    logits head's output is the largest tensor of an LLM); every other form: TVM's converter."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x, scale = inputs[0], inputs[1]
        zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else relax.const(0, _dtype(x))
        per_tensor = _rank(scale) == 0 and _rank(zero) == 0 and _dtype(scale) == "float32"
        if not per_tensor or attr.get("block_size", 0):
            return OF.DequantizeLinear._impl_v21(bb, inputs, attr, params)
        return bb.emit_te(
            _dequantize_te, x, scale, zero, primfunc_name_hint="dequantize_output",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )  # fmt: skip

    _impl_v10 = _impl_v13
    _impl_v19 = _impl_v13
    _impl_v21 = _impl_v13


def _quantize_te(x: te.Tensor, scale: te.Tensor, zero: te.Tensor) -> te.Tensor:
    def body(*idx):
        level = tirx.nearbyint(x(*idx) / scale[()]) + zero[()].astype(x.dtype)
        return te.max(te.min(level, tirx.const(127.0, x.dtype)), tirx.const(-128.0, x.dtype)).astype("int8")

    return te.compute(x.shape, body, name="quantize")


class QuantizeLinear(OF.OnnxOpConverter):
    """Per-tensor int8 QuantizeLinear, rounding half to even exactly as ONNX specifies."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        zero = inputs[2] if len(inputs) > 2 else None
        if zero is None or _dtype(zero) != "int8" or _rank(zero) != 0:
            return OF.QuantizeLinear._impl_v13(bb, inputs, attr, params)
        if _rank(inputs[1]) != 0:
            return OF.QuantizeLinear._impl_v13(bb, inputs, attr, params)
        return bb.emit_te(
            _quantize_te,
            inputs[0],
            inputs[1],
            zero,
            primfunc_name_hint="quantize_input",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )

    _impl_v19 = _impl_v13
    _impl_v21 = _impl_v13


class IntSoftmax(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        body = functools.partial(
            nonlinear.softmax_compute,
            ln2_q=int(attr["ln2_q"]),
            b_q=int(attr["b_q"]),
            c_q=int(attr["c_q"]),
            input_shift=int(attr.get("input_shift", 0)),
            out_bits=int(attr.get("out_bits", 7)),
        )
        args = [inputs[0]] + ([inputs[1]] if len(inputs) > 1 and inputs[1] is not None else [])
        return bb.emit_te(body, *args, primfunc_name_hint="int_softmax", primfunc_attrs={KERNEL_ATTR: "rowwise"})


class IntLayerNorm(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        params_ = [
            relax.const(_const_numpy(inputs[i], name, "IntLayerNorm").reshape(-1).astype(np.int32), "int32")
            for i, name in ((1, "multiplier"), (2, "shift"), (3, "bias"))
        ]
        if len(inputs) > 4 and inputs[4] is not None:  # a prescaled RMSNorm of a per-channel input
            prescale = _const_numpy(inputs[4], "input_multiplier", "IntLayerNorm").reshape(-1).astype(np.int32)
            params_.append(relax.const(prescale, "int32"))

        def body(x, multiplier, shift, bias, input_multiplier=None):
            return nonlinear.layernorm_compute(
                x, multiplier, shift, bias,
                rms=bool(attr.get("rms", 0)),
                epsilon_q=int(attr.get("epsilon_q", 0)),
                frac_bits=int(attr.get("frac_bits", 0)),
                input_multiplier=input_multiplier,
                **_epilogue(attr),
            )  # fmt: skip

        return bb.emit_te(
            body, inputs[0], *params_, primfunc_name_hint="int_layernorm", primfunc_attrs={KERNEL_ATTR: "rowwise"}
        )


def _output_rescale(inputs, op: str) -> list[relax.Expr]:
    """The output multiplier and shift (one, or one per channel of the last axis) as int32 constants."""
    return [
        relax.const(_const_numpy(inputs[i], name, op).reshape(-1).astype(np.int32), "int32")
        for i, name in ((1, "multiplier"), (2, "shift"))
    ]


class IntGelu(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        body = functools.partial(
            nonlinear.gelu_compute,
            input_shift=int(attr.get("input_shift", 0)),
            b_q=int(attr["b_q"]),
            c_q=int(attr["c_q"]),
            pre_shift=int(attr.get("pre_shift", 0)),
            **_epilogue(attr),
        )
        return bb.emit_te(
            body,
            inputs[0],
            *_output_rescale(inputs, "IntGelu"),
            primfunc_name_hint="int_gelu",
            primfunc_attrs={KERNEL_ATTR: "elementwise"},
        )


class IntSigmoid(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        exp = {name: int(attr[name]) for name in ("ln2_q", "b_q", "c_q", "one_q")}
        input_shift = int(attr.get("input_shift", 0))
        body = functools.partial(
            nonlinear.sigmoid_compute,
            input_shift=input_shift,
            **exp,
            silu=bool(attr.get("silu", 0)),
            pre_shift=int(attr.get("pre_shift", 0)),
            **_epilogue(attr),
        )
        args = [inputs[0], *_output_rescale(inputs, "IntSigmoid")]
        table = nonlinear.sigmoid_low_table(_dtype(inputs[0]), input_shift=input_shift, **exp)
        if table is not None:  # the per-element division as a lookup at |x|
            args.append(relax.const(table, "int32"))
        return bb.emit_te(body, *args, primfunc_name_hint="int_sigmoid", primfunc_attrs={KERNEL_ATTR: "elementwise"})


class Hadamard(OF.OnnxOpConverter):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        block = _const_numpy(inputs[1], "block h", "Hadamard").astype(np.int8)
        shape = _static_shape(inputs[0], "Hadamard")
        n, k = shape[-1], block.shape[0]
        runs = n // k if k else 0
        if block.ndim != 2 or block.shape != (k, k) or n % k or runs & (runs - 1):
            raise UnsupportedOpError("?", "Hadamard", f"width {n} is not the block order {k} times a power of two")
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        flat = bb.emit(relax.op.reshape(inputs[0], (rows, n)))
        out = bb.emit_te(
            kernels.hadamard_compute,
            flat,
            relax.const(block, "int8"),
            primfunc_name_hint="hadamard",
            primfunc_attrs={KERNEL_ATTR: "hadamard"},
        )
        return bb.emit(relax.op.reshape(out, shape))


class Gather(OF.Gather):
    """ONNX Gather as TVM imports it (negative indices made positive first), with the take in ``clip`` mode: TVM's
    default, ``fast``, reads out of bounds for an index out of range (a crash on a bad token id) and warns at every
    build. Indices in range read the same; one out of range reads the last row instead of faulting."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        out = super()._impl_v13(bb, inputs, attr, params)
        if isinstance(out, relax.Call) and out.op.same_as(tvm.ir.Op.get("relax.take")):
            return relax.op.take(out.args[0], out.args[1], out.attrs.axis, mode="clip")
        return out


_CONVERTERS = {
    "Gather": Gather,
    "Hadamard": Hadamard,
    "IntDiv": IntDiv,
    "IntGelu": IntGelu,
    "IntSigmoid": IntSigmoid,
    "ISqrt": ISqrt,
    "IntSoftmax": IntSoftmax,
    "IntLayerNorm": IntLayerNorm,
    "QGemm": QGemm,
    "RowExponent": RowExponent,
    "QGemmInt4": QGemmInt4,
    "QConv": QConv,
    "Requantize": Requantize,
    "RescaleAdd": RescaleAdd,
    "ConvInteger": ConvInteger,
    "MatMulInteger": MatMulInteger,
    "MatMul": MatMul,
    "DequantizeLinear": DequantizeLinear,
    "QuantizeLinear": QuantizeLinear,
}


@contextlib.contextmanager
def _extended_convert_map() -> Iterator[None]:
    """TVM's importer looks converters up by op type only: extend its map for the duration of one import."""
    original = OF._get_convert_map
    OF._get_convert_map = lambda: {**original(), **_CONVERTERS}
    try:
        yield
    finally:
        OF._get_convert_map = original


def _outputs_early(graph: onnx.GraphProto) -> None:
    """Place each node that computes a graph output right after the last producer of its inputs (the nodes
    reordered in place: a topological order still, the same computation)."""
    outputs = {o.name for o in graph.output}
    producer: dict[str, tuple[int, ...]] = {}
    keys: dict[tuple[str, ...], tuple[int, ...]] = {}  # a node's outputs -> its sort key
    for index, node in enumerate(graph.node):
        key: tuple[int, ...] = (index,)
        if outputs.intersection(node.output):  # after its last input's producer (first of all, if none)
            key = (*max((producer[name] for name in node.input if name in producer), default=(-1,)), index)
        keys[tuple(node.output)] = key
        producer.update({name: key for name in node.output if name})
    if any(len(key) > 1 for key in keys.values()):
        graph.node.sort(key=lambda node: keys[tuple(node.output)])


@contextlib.contextmanager
def _outputs_where_computed(model: onnx.ModelProto) -> Iterator[None]:
    """Compute each graph output as soon as its inputs are (the caller's nodes reordered: :func:`_outputs_early`)
    and emit it there. TVM's importer binds an op's result when a later op first reads it, so a graph output was
    computed after the whole model, and what it reads held until then: a causal LM's step returns each layer's new
    keys and values as slices of the attention's cache Concat, and every layer's concatenation lived to the end
    (SmolLM2: 30 x 1.8 MB at a 512-position span, 4x that at 2048)."""
    if any(node.op_type == "If" for node in model.graph.node):  # converted apart, not one call per node
        yield
        return
    _outputs_early(model.graph)
    outputs = {o.name for o in model.graph.output}
    # the importer converts the nodes in order, one call each (a miscount would only bind some op early: still
    # after its inputs, so still correct)
    computes_output = iter([bool(outputs.intersection(node.output)) for node in model.graph.node])
    original = OF.ONNXGraphImporter._convert_operator

    def convert(importer: Any, op_name: str, inputs: Any, attrs: dict[str, Any], opset: int) -> Any:
        result = original(importer, op_name, inputs, attrs, opset)
        if next(computes_output, False) and isinstance(result, relax.Call):
            return importer.bb.emit(result)
        return result

    OF.ONNXGraphImporter._convert_operator = convert
    try:
        yield
    finally:
        OF.ONNXGraphImporter._convert_operator = original


@contextlib.contextmanager
def _initializers_from(weights: Mapping[str, np.ndarray] | None) -> Iterator[None]:
    """TVM's importer makes a constant of every initializer from the proto's bytes (a copy of all the weights,
    on top of the proto's own): for the model's external initializers it takes the arrays in ``weights``
    instead, adopting their memory where they are C-contiguous and 64-byte aligned (DLPack), else copying."""
    if not weights:
        yield
        return
    original = OF.ONNXGraphImporter._parse_array

    def parse(importer: Any, tensor: onnx.TensorProto) -> Any:
        array = weights.get(tensor.name) if tensor.data_location == onnx.TensorProto.EXTERNAL else None
        if array is None:
            return original(importer, tensor)
        return _tvm_tensor(array)

    OF.ONNXGraphImporter._parse_array = parse
    try:
        yield
    finally:
        OF.ONNXGraphImporter._parse_array = original


def _tvm_tensor(array: np.ndarray) -> tvm.runtime.Tensor:
    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0 and array.size:
        return tvm.runtime.from_dlpack(array)  # holds the array: no copy (DLPack cannot export a read-only one)
    return tvm.runtime.tensor(np.ascontiguousarray(array))


def import_onnx(
    model: onnx.ModelProto,
    shapes: dict[str, list[int]],
    isa: str = "avx2",
    tiles: Mapping[tuple[int, int, int], Tile] | None = None,
    gemms: set[tuple[int, int, int, int]] | None = None,
    conv_layout: str = "auto",
    weights: Mapping[str, np.ndarray] | None = None,
) -> tvm.IRModule:
    """Relax module of an integer ONNX model with static input ``shapes``; the GEMMs planned for ``isa``
    (:func:`qcompiler.backends.tvm.int8_dot_isa`) with the register ``tiles`` given per (M, N, K) (tuning.py), the
    others the default. ``gemms``: filled with the (M, N, K, kb) of every int8 GEMM planned. ``conv_layout``: the
    im2col layout of group-1 convolutions (:data:`CONV_LAYOUTS`, :func:`conv_layout_for`). ``weights``: the
    arrays of the model's external initializers (:func:`qcompiler.ir.ort_session.serialize_sharing_weights`:
    the IR's own, no proto of the weights)."""
    if conv_layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout: {conv_layout!r} is not one of {', '.join(CONV_LAYOUTS)}")
    global _STATE
    dtypes = {
        i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input
    }
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    with _extended_convert_map(), _initializers_from(weights), _outputs_where_computed(model):
        _STATE = _ImportState(
            isa=isa, tiles=dict(tiles or {}), gemms=gemms if gemms is not None else set(), conv_layout=conv_layout
        )
        try:
            mod = OF.from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, opset=opset, keep_params_in_input=False)
            if _STATE.skipped_permutes:  # the permutes back to NCHW nothing reads any more
                mod = relax.transform.DeadCodeElimination()(mod)
            return mod
        finally:
            _STATE = _ImportState()
