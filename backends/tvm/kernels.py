"""TE definitions of the fused integer kernels and their weight packing.

Every kernel computes exactly the reference semantics of :mod:`qcompiler.dialect.reference`:
int8 x int8 products accumulated in int32, the int32 bias added, then the dyadic requantize
``clamp(((acc * b + 2^(c-1)) >> c) + z, lo, hi)`` in int64. Weights are packed once, at compile time, into
``[Np/L, Kp/KB, L, KB]`` (the layout the dot intrinsics read: L = 8 int32 lanes for AVX2, 16 for AVX-512),
zero-padded to the tile sizes.

On AVX-512 VNNI the activations enter the GEMM as unsigned bytes ``a + 128`` (vpdpbusd multiplies u8 by s8 and
adds four products straight into int32, with no intermediate saturation), and the offset is taken back out
through the bias: ``sum_k (a + 128) w = sum_k a w + 128 sum_k w``, so the packed bias is ``bias - 128 sum_k w``,
computed at compile time. Exact for every int8 weight, -128 included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from tvm import te, tirx

from qcompiler.dialect import storage_dtype
from qcompiler.dialect.int4 import pack_int4, unpack_int4

LANES = 8  # int32 lanes of one AVX2 accumulator register
ZMM_LANES = 16  # int32 lanes of one AVX-512 accumulator register
U8_OFFSET = 128  # the activation offset of the u8 x s8 (VNNI) GEMM


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """Padding and tiling decided at compile time from the weight's shape and values."""

    n: int  # output features
    k: int  # reduction length
    kb: int  # reduction elements per intrinsic call (4: psign path, 2: int16 path)
    nr: int  # accumulator registers per row of the register tile
    hi32_epilogue: bool = False  # every shift >= 31: use the vectorizable requantize form
    lanes: int = LANES  # int32 lanes of one accumulator register (the packed weight's inner block)
    u8_activations: bool = False  # activations offset to u8 (a + 128), compensated in the bias (VNNI)
    group: int = 0  # int4 codes on the int8 dot, summed per group of this many (K padded to whole groups); 0: none
    wide_activations: bool = False  # int16 activations (W8A16) in pairs against int16-widened weights (KB 2)
    #: grouped int4 plans on an x86 dot: the codes stored ``code + 8``, the dot's unsigned operand (the u4
    #: intrinsics); elsewhere (generic: the GPU builds, whose dp4a takes signed bytes) two's complement
    unsigned_codes: bool = False

    @property
    def n_padded(self) -> int:
        tile = self.nr * self.lanes
        return -(-self.n // tile) * tile

    @property
    def k_padded(self) -> int:
        block = self.group or self.kb
        return -(-self.k // block) * block


def plan_gemm(
    weight_nk: np.ndarray,
    shifts: np.ndarray | None = None,
    exact_psign: bool | None = None,
    isa: str = "avx2",
    nr: int | None = None,
    wide_activations: bool = False,
) -> GemmPlan:
    """Choose the intrinsic, the register tile and the epilogue for ``isa`` (:func:`int8_dot_isa`): on AVX-512
    VNNI the u8 x s8 zmm kernel (exact for every weight); else psign (exact only if no weight is -128) or the
    int16 pair kernel. ``nr``: accumulator registers per tile row (a tuned tile), else the default.
    ``wide_activations``: int16 activations (W8A16) against the weights widened to int16, two products per
    int32 lane per instruction (vpdpwssd on 16 lanes with VNNI, vpmaddwd on 8 without)."""
    n, k = weight_nk.shape
    hi32 = shifts is not None and int(np.min(shifts)) >= HI32_MIN_SHIFT
    if wide_activations:
        lanes = ZMM_LANES if isa == "avx512vnni" else LANES
        nr = nr or default_nr(n, lanes)
        return GemmPlan(n=n, k=k, kb=2, nr=nr, hi32_epilogue=hi32, lanes=lanes, wide_activations=True)
    if isa == "avx512vnni":
        nr = nr or default_nr(n, ZMM_LANES)
        return GemmPlan(n=n, k=k, kb=4, nr=nr, hi32_epilogue=hi32, lanes=ZMM_LANES, u8_activations=True)
    psign_ok = bool(weight_nk.min(initial=0) >= -127) if exact_psign is None else exact_psign
    nr = nr or default_nr(n, LANES)
    return GemmPlan(n=n, k=k, kb=4 if psign_ok else 2, nr=nr, hi32_epilogue=hi32)


def default_nr(n: int, lanes: int) -> int:
    """Accumulator registers per row of the default register tile: 4, or fewer where N needs fewer."""
    return max(1, min(4, -(-n // lanes)))


def pack_weight(weight_nk: np.ndarray, plan: GemmPlan) -> np.ndarray:
    """[N, K] int8 -> zero-padded ``[Np/(L nr), Kp/KB, nr, L, KB]`` (int16 for a plan of int16 activations): the
    ``L x KB`` blocks of the dot, the ``nr`` blocks of a register tile side by side, so that a tile's step reads
    one run of ``nr L KB`` bytes and a thread streams its tiles in one sequence (:func:`gemm_weight` reads it;
    cold from DRAM, SmolLM2's decode GEMVs at 576 x 576 took 9.4 us against 14.3 from ``nr`` separate streams, at
    192 x 576 4.1 against 5.1, the larger ones already at the streaming bandwidth)."""
    padded = np.zeros((plan.n_padded, plan.k_padded), dtype=np.int16 if plan.wide_activations else np.int8)
    padded[: plan.n, : plan.k] = weight_nk
    tiles = padded.reshape(plan.n_padded // (plan.lanes * plan.nr), plan.nr, plan.lanes, plan.k_padded // plan.kb,
                           plan.kb)  # fmt: skip
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2, 4))


def gemm_weight(packed: te.Tensor, j: tirx.PrimExpr, k: tirx.PrimExpr, plan: GemmPlan) -> tirx.PrimExpr:
    """Weight ``[j, k]`` (output column, input channel) of a packed GEMM operand: :func:`pack_weight`'s
    tile-interleaved bytes, or a ``[Np/L, Kp/KB, L, KB]`` block layout (int4 codes expanded in the kernel)."""
    lanes, kb = plan.lanes, plan.kb
    if len(packed.shape) == 5:
        return packed[j // lanes // plan.nr, k // kb, j // lanes % plan.nr, j % lanes, k % kb]
    return packed[j // lanes, k // kb, j % lanes, k % kb]


def pack_bias(bias: np.ndarray, weight_nk: np.ndarray, plan: GemmPlan) -> np.ndarray:
    """The int32 bias padded to ``Np``; for u8 activations less ``128 sum_k w`` (the offset's contribution)."""
    n = weight_nk.shape[0]
    values = np.broadcast_to(np.asarray(bias, dtype=np.int64).reshape(-1), (n,))
    if plan.u8_activations:
        values = values - U8_OFFSET * weight_nk.astype(np.int64).sum(axis=1)
    if values.min(initial=0) < -(2**31) or values.max(initial=0) >= 2**31:
        raise ValueError("the compensated bias overflows int32")
    return pad_channels(values.astype(np.int32), plan, 0)


def pad_channels(values: np.ndarray, plan: GemmPlan, fill: int) -> np.ndarray:
    """Scalar or [N] int32 epilogue parameter -> [Np] (padding columns are computed and dropped)."""
    out = np.full((plan.n_padded,), fill, dtype=np.int32)
    out[: plan.n] = np.broadcast_to(np.asarray(values, dtype=np.int32).reshape(-1), (plan.n,))
    return out


def requantize_expr(
    acc: tirx.PrimExpr, multiplier: tirx.PrimExpr, shift: tirx.PrimExpr, zero_point: int, lo: int, hi: int
) -> tirx.PrimExpr:
    """The dialect's rounding rule in int64: ``clamp(((acc*b + 2^(c-1)) >> c) + z, lo, hi)`` as int8 (int16 for a
    wide clamp, :func:`qcompiler.dialect.storage_dtype`)."""
    one = tirx.const(1, "int64")
    wide = acc.astype("int64") * multiplier.astype("int64")
    c = shift.astype("int64")
    rounded = ((wide + (one << (c - one))) >> c) + tirx.const(zero_point, "int64")
    clamped = te.max(te.min(rounded, tirx.const(hi, "int64")), tirx.const(lo, "int64"))
    return clamped.astype(storage_dtype(lo, hi).name)


#: shifts from which :func:`requantize_expr_hi32` applies (every rescale factor below 1)
HI32_MIN_SHIFT = 31


def requantize_expr_hi32(
    acc: tirx.PrimExpr, multiplier: tirx.PrimExpr, shift: tirx.PrimExpr, zero_point: int, lo: int, hi: int
) -> tirx.PrimExpr:
    """The same rounding rule for shifts c >= 31, written so AVX2 vectorizes it (no 64-bit arithmetic shift).

    With ``Q = acc*b + 2^(c-1)`` (|Q| < 2^62): ``floor(Q / 2^c) = floor(floor(Q*2^s1 / 2^32) / 2^s2)`` with
    ``s1 = max(0, 32-c)`` (0 or 1, so ``Q*2^s1`` still fits int64) and ``s2 = max(0, c-32)``. The inner floor is
    the high 32 bits of a 64-bit value (vpmuldq, vpsllvq, a shuffle); the outer one an int32 arithmetic shift
    (vpsravd). Nested floors by positive powers of two compose exactly, so this equals :func:`requantize_expr`.
    """
    c = shift.astype("int32")
    s1 = te.max(tirx.const(32, "int32") - c, tirx.const(0, "int32")).astype("int64")
    s2 = te.max(c - tirx.const(32, "int32"), tirx.const(0, "int32"))
    rounding = tirx.const(1, "int64") << (c.astype("int64") - tirx.const(1, "int64"))
    wide = acc.astype("int64") * multiplier.astype("int64") + rounding
    high = ((wide << s1) >> tirx.const(32, "int64")).astype("int32")
    rounded = (high >> s2) + tirx.const(zero_point, "int32")
    return te.max(te.min(rounded, tirx.const(hi, "int32")), tirx.const(lo, "int32")).astype(storage_dtype(lo, hi).name)


def qgemm_compute(
    a: te.Tensor,
    packed: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    shift: te.Tensor,
    row_exponent: te.Tensor | None = None,
    *,
    plan: GemmPlan,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    """``requant(a[M, K] @ W^T + bias)`` with ``W`` packed; returns int8 [M, N]. ``row_exponent`` (int8 [M, 1]):
    row i's shift is ``shift - e_i`` (qcompiler.RowExponent's rows)."""
    m = a.shape[0]
    return _gemm_requant(
        _pad_reduction(a, plan), packed, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent
    )


def _pad_reduction(a: te.Tensor, plan: GemmPlan) -> te.Tensor:
    """``a[M, K]`` zero-padded to ``K_padded`` columns (a multiple of the intrinsic's reduction block); offset to
    u8 where the plan says so."""
    if plan.k_padded == plan.k and not plan.u8_activations:
        return a
    return te.compute(
        (a.shape[0], plan.k_padded),
        lambda i, k: gemm_activation(tirx.if_then_else(k < plan.k, a[i, k], tirx.const(0, a.dtype)), plan),
        name="A_pad",
    )


def gemm_activation(value: tirx.PrimExpr, plan: GemmPlan) -> tirx.PrimExpr:
    """An int8 activation as the GEMM reads it: itself, or ``value + 128`` as uint8 (u8 x s8 plans)."""
    return as_u8(value) if plan.u8_activations else value


def as_u8(value: tirx.PrimExpr) -> tirx.PrimExpr:
    """An int8 value offset to the u8 operand of vpdpbusd: ``value + 128``."""
    return (value.astype("int32") + tirx.const(U8_OFFSET, "int32")).astype("uint8")


#: the expanded int4 weight (code times group scale) fits int16 when every group scale is at most this
INT4_INT16_MAX_SCALE = 32767 // 8


def plan_int4_gemm(
    n: int, k: int, shifts: np.ndarray | None = None, group_size: int | None = None, isa: str = "avx2"
) -> GemmPlan:
    """Tiling of an int4 GEMM, the register tile of :func:`plan_gemm`. Where the group size is a multiple of 4
    (every recipe's), the codes themselves go through the int8 dot of ``isa`` (:func:`int8_dot_isa`), on x86 as its
    unsigned operand, ``code + 8`` in [0, 15], against the int8 activations (AVX2 vpmaddubsw on 8 lanes, AVX-512
    VNNI vpdpbusd on 16), each group's int32 sum corrected by ``8 sum a``; signed on ``generic`` (the GPU builds:
    dp4a's signed bytes); each group's sum scaled by its group scale; otherwise
    int16 weight pairs, code times group scale, on the AVX2 ``s8s16`` intrinsic (both in
    :func:`qgemm_int4_compute`)."""
    hi32 = shifts is not None and int(np.min(shifts)) >= HI32_MIN_SHIFT
    if group_size is not None and group_size % 4 == 0:
        if isa == "avx512vnni":
            # two registers per tile row: the tile holds both the running sum and the group's partial sums (2 x 8
            # of 32 zmm at 4 rows); measured against 4 (default_nr): 1.7x at 512x576x1536, 1.9x at 16x4096x4096
            nr = min(2, default_nr(n, ZMM_LANES))
            return GemmPlan(n, k, 4, nr, hi32, lanes=ZMM_LANES, group=group_size, unsigned_codes=True)
        return GemmPlan(n=n, k=k, kb=4, nr=default_nr(n, LANES), hi32_epilogue=hi32, group=group_size,
                        unsigned_codes=isa == "avx2")  # fmt: skip
    return GemmPlan(n=n, k=k, kb=2, nr=default_nr(n, LANES), hi32_epilogue=hi32)


def int4_codes(packed: np.ndarray, k: int, plan: GemmPlan) -> np.ndarray:
    """The dialect's int4 bytes ``[N, ceil(K/2)]`` -> int8 codes ``[Np, Kp]``, zero-padded (the input of
    :func:`pack_int4_panels`)."""
    codes = np.zeros((plan.n_padded, plan.k_padded), np.int8)
    codes[: packed.shape[0], :k] = unpack_int4(packed)[:, :k]
    return codes


def pack_int4_panels(codes: np.ndarray, plan: GemmPlan) -> np.ndarray:
    """Padded codes (:func:`int4_codes`) -> the kernel's ``[Np/L, Kp/KB, L KB / 2]`` bytes.

    The expansion writes each block ``(jo, ko)`` of the packed GEMM as ``L KB`` values (16 int16 for KB = 2, 32 int8
    codes for KB = 4), ``p = KB ji + ki`` (column ``L jo + ji``, input channel ``KB ko + ki``); byte ``b`` holds
    position ``b`` in its low nibble and ``b + L KB / 2`` in its high one, so either half of a block is one
    contiguous load (a vector, not a gather). The int16 form stores each code as the dialect does (two's
    complement). Grouped plans (``plan.group``) store it unsigned, ``code + 8`` (the dot's unsigned operand as it
    is loaded), where ``plan.unsigned_codes``, and interleave the ``nr`` blocks of a register tile:
    ``[Np/(L nr), Kp/KB, nr, L KB / 2]``, so that a tile's step of the dot reads one run of ``nr L KB / 2`` bytes
    (a cache line at nr = 2 on 16 lanes) and a thread streams its tiles' bytes in one sequence (SmolLM2's GEMVs
    cold from DRAM, VNNI: 576 x 576 14.2 -> 7.2 us, 1536 x 576 25 -> 14 us, the 49152 x 576 LM head 621 -> 394 us,
    36 GB/s; two half lines from two streams per step left the prefetchers behind)."""
    panels, kb = plan.n_padded // plan.lanes, plan.kb
    blocks = codes.reshape(panels, plan.lanes, plan.k_padded // kb, kb).transpose(0, 2, 1, 3)
    positions = blocks.reshape(panels, plan.k_padded // kb, kb * plan.lanes)
    half = kb * plan.lanes // 2
    packed = pack_int4(np.stack([positions[..., :half], positions[..., half:]], axis=-1))[..., 0]  # [..h, 2] -> [..h]
    if not plan.group:
        return packed
    tiles = np.ascontiguousarray(
        packed.reshape(panels // plan.nr, plan.nr, plan.k_padded // kb, half).transpose(0, 2, 1, 3)
    )
    # a two's-complement nibble with its top bit flipped is the code plus 8
    return tiles ^ np.uint8(0x88) if plan.unsigned_codes else tiles


def _per_column_block(values: np.ndarray, plan: GemmPlan, dtype: type) -> np.ndarray:
    """Per-column, per-group values ``[N, G]`` -> ``[Np/L, G, L]`` (one vector of lanes per column block and
    group), zero for the padding columns (their codes are zero too)."""
    groups = values.shape[1]
    out: np.ndarray = np.zeros((plan.n_padded, groups), dtype)
    out[: values.shape[0]] = values
    return np.ascontiguousarray(out.reshape(plan.n_padded // plan.lanes, plan.lanes, groups).transpose(0, 2, 1))


def int4_group_scales(group_scale: np.ndarray, plan: GemmPlan) -> np.ndarray:
    """Group scales ``[N, G]`` -> ``[Np/L, G, L]`` int16 (each at most :data:`INT4_INT16_MAX_SCALE`), for the
    grouped kernel (``plan.group``: K is padded to whole groups, so G = Kp / group)."""
    return _per_column_block(group_scale, plan, np.int16)


def int4_panel_scales(group_scale: np.ndarray, group_size: int, plan: GemmPlan) -> np.ndarray:
    """Group scales ``[N, G]`` -> ``[Np/8, Gp, 16]`` int16 in the order of the int16 kernel's block positions
    (:func:`pack_int4_panels` with KB = 2: each column's scale twice), zero for padding columns and for groups
    past K."""
    groups = np.zeros((group_scale.shape[0], -(-plan.k_padded // group_size)), np.int16)
    groups[:, : group_scale.shape[1]] = group_scale
    return np.repeat(_per_column_block(groups, plan, np.int16), 2, axis=-1)


def _int4_code(packed: te.Tensor, jo: tirx.PrimExpr, ko: tirx.PrimExpr, position: tirx.PrimExpr, half: int):
    """The int8 code at ``position`` of block ``(jo, ko)`` of :func:`pack_int4_panels`' bytes: the low nibble of
    byte ``position`` or the high one of byte ``position - half``; ``(n ^ 8) - 8`` sign-extends a nibble ``n``,
    all in bytes."""
    return _signed(_nibble(packed[jo, ko, position % half], position, half))


def _nibble(byte: tirx.PrimExpr, position: tirx.PrimExpr, half: int) -> tirx.PrimExpr:
    """The low nibble of ``byte`` for positions below ``half``, else the high one."""
    return (byte >> ((position // half) * 4).astype("uint8")) & tirx.const(15, "uint8")


def _signed(nibble: tirx.PrimExpr) -> tirx.PrimExpr:
    """A two's-complement nibble sign-extended in bytes: ``(n ^ 8) - 8``."""
    return (nibble ^ tirx.const(8, "uint8")).astype("int8") - tirx.const(8, "int8")


def _int4_tile_code(packed: te.Tensor, jo: tirx.PrimExpr, ko: tirx.PrimExpr, position: tirx.PrimExpr, half: int,
                    unsigned: bool):  # fmt: skip
    """The code at ``position`` of block ``(jo, ko)`` of a grouped plan's tile-interleaved bytes
    (:func:`pack_int4_panels`): unsigned, ``code + 8``, the nibble itself (a shift and a mask); else the signed
    code, sign-extended in bytes."""
    nr = int(packed.shape[2])
    nibble = _nibble(packed[jo // nr, ko, jo % nr, position % half], position, half)
    return nibble if unsigned else _signed(nibble)


def qgemm_int4_compute(
    a: te.Tensor,
    packed: te.Tensor,
    group_scale: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    shift: te.Tensor,
    row_exponent: te.Tensor | None = None,
    *,
    plan: GemmPlan,
    group_size: int,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    """``requant(a[M, K] @ (codes * group_scale)^T + bias)``, ``packed`` (:func:`pack_int4_panels`) and
    ``group_scale`` in the kernel's layouts, built at compile time. Two forms, by :func:`plan_int4_gemm`:

    - grouped (``plan.group``): ``sum_g s[j, g] (sum_{k in g} a[i, k] (code[j, k] + 8) - 8 sum_{k in g} a[i, k])``,
      the same integers (int32 sums of exact products, regrouped), the inner sums on the int8 dot with the
      unsigned codes (a nibble, shifted and masked: nothing else) as its unsigned operand, the activations' group
      sums ``A_sum`` computed once per row (``plan.unsigned_codes``; else the signed codes and no correction),
      the scale applied once per group; ``group_scale`` from
      :func:`int4_group_scales`.
    - int16 (a group size that is not a multiple of 4): the codes expanded times their group scale into the int16
      ``[Np/8, Kp/2, 8, 2]`` layout of the packed GEMM, which runs on int16 weight pairs; ``group_scale`` from
      :func:`int4_panel_scales`.

    Where the codes are unpacked (per dot step, per column panel, or the whole matrix) is the schedule's choice
    (schedules.schedule_gemm); only the packed bytes come from memory."""
    m = a.shape[0]
    a = _pad_reduction(a, plan)
    lanes, kb = plan.lanes, plan.kb
    half = lanes * kb // 2
    shape = (plan.n_padded // lanes, plan.k_padded // kb, lanes, kb)
    if not plan.group:

        def expand(jo, ko, ji, ki):
            code = _int4_code(packed, jo, ko, ji * kb + ki, half).astype("int32")
            # k // group_size with k = 2 ko + ki; for an even group ki never crosses a group, and dropping it
            # keeps the scale load one contiguous vector over the block's positions
            group = ko // (group_size // 2) if group_size % 2 == 0 else (ko * 2 + ki) // group_size
            return (code * group_scale[jo, group, ji * kb + ki].astype("int32")).astype("int16")

        weights = te.compute(shape, expand, name="W_expand")
        return _gemm_requant(a, weights, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent)

    if plan.u8_activations:
        raise ValueError("qgemm_int4_compute: a grouped plan reads its activations as int8 (no u8 offset)")
    size, groups = plan.group, plan.k_padded // plan.group
    unsigned = plan.unsigned_codes
    codes = te.compute(
        shape, lambda jo, ko, ji, ki: _int4_tile_code(packed, jo, ko, ji * kb + ki, half, unsigned), name="W_expand"
    )
    kk = te.reduce_axis((0, size), name="kk")
    partial = te.compute(
        (m, groups, plan.n_padded),  # columns innermost: a tile row of P is one dot's lanes
        lambda i, g, j: te.sum(
            a[i, g * size + kk].astype("int32")
            * codes[j // lanes, g * (size // kb) + kk // kb, j % lanes, kk % kb].astype("int32"),
            axis=kk,
        ),
        name="P",
    )
    ka = te.reduce_axis((0, size), name="ka")
    gr = te.reduce_axis((0, groups), name="g")
    if unsigned:
        sums = te.compute((m, groups), lambda i, g: te.sum(a[i, g * size + ka].astype("int32"), axis=ka), name="A_sum")
        eight = tirx.const(8, "int32")  # the codes' +8, taken back out of each group's sum

        def group_sum(i, g, j):
            return partial[i, g, j] - sums[i, g] * eight
    else:

        def group_sum(i, g, j):
            return partial[i, g, j]

    acc = te.compute(
        (m, plan.n_padded),
        lambda i, j: te.sum(group_sum(i, gr, j) * group_scale[j // lanes, gr, j % lanes].astype("int32"), axis=gr),
        name="C",
    )
    return _requant(acc, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent)


def _gemm_requant(a, packed, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent=None):
    k = te.reduce_axis((0, plan.k_padded), name="k")
    acc = te.compute(
        (m, plan.n_padded),
        lambda i, j: te.sum(a[i, k].astype("int32") * gemm_weight(packed, j, k, plan).astype("int32"), axis=k),
        name="C",
    )
    return _requant(acc, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent)


def _requant(acc, bias, multiplier, shift, m, plan, zero_point, lo, hi, row_exponent=None):
    """The fused epilogue on the int32 accumulators ``acc[M, Np]``: bias, requantize (per row shifted by the row
    exponents, if any), the padding columns dropped."""
    epilogue = requantize_expr_hi32 if plan.hi32_epilogue else requantize_expr

    def row_shift(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
        if row_exponent is None:
            return shift[j]
        return shift[j] - row_exponent[i, 0].astype("int32")

    out = te.compute(
        (m, plan.n_padded),
        lambda i, j: epilogue(acc[i, j] + bias[j], multiplier[j], row_shift(i, j), zero_point, lo, hi),
        name="requant",
    )
    if plan.n_padded == plan.n:
        return out
    return te.compute((m, plan.n), lambda i, j: out[i, j], name="unpad")


def row_exponent_compute(x: te.Tensor, *, qmax: int = 127, max_exponent: int = 9) -> te.Tensor:
    """Per row of int16 ``x [R, C]``: the smallest ``e in [0, max_exponent]`` with ``max |x| <= qmax 2^e``
    (``max_exponent`` where none is), int8 ``[R, 1]``."""
    rows, cols = x.shape
    c = te.reduce_axis((0, cols), name="c")
    peak = te.compute((rows,), lambda r: te.max(te.abs(x[r, c].astype("int32")), axis=c), name="peak")

    def exponent(r: tirx.PrimExpr, _: tirx.PrimExpr) -> tirx.PrimExpr:
        total = tirx.const(0, "int32")
        for j in range(max_exponent):
            total = total + tirx.Select(peak[r] > tirx.const(qmax << j, "int32"), 1, 0)
        return total.astype("int8")

    return te.compute((rows, 1), exponent, name="exponent")


def row_shift_compute(x: te.Tensor, exponent: te.Tensor, *, qmax: int = 127, clamp: bool = False) -> te.Tensor:
    """``round_shift(x, e)`` per row (x itself where e = 0: the half ``(1 << e) >> 1`` is then 0), int8, clamped
    to ``[-qmax, qmax]`` below 127 or with ``clamp`` (exponents chosen for a bound above ``qmax``; int16 input
    reaches at most 64 at the largest exponent for plain int8 codes)."""

    def body(r: tirx.PrimExpr, c: tirx.PrimExpr) -> tirx.PrimExpr:
        e = exponent[r, 0].astype("int32")
        half = (tirx.const(1, "int32") << e) >> tirx.const(1, "int32")
        shifted = (x[r, c].astype("int32") + half) >> e
        if qmax < 127 or clamp:
            shifted = tirx.max(tirx.min(shifted, tirx.const(qmax, "int32")), tirx.const(-qmax, "int32"))
        return shifted.astype("int8")

    return te.compute(tuple(x.shape), body, name="row_shift")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    batch: int
    channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]

    @property
    def out_h(self) -> int:
        span = (self.kernel_h - 1) * self.dilations[0] + 1
        return (self.height + self.pads[0] + self.pads[2] - span) // self.strides[0] + 1

    @property
    def out_w(self) -> int:
        span = (self.kernel_w - 1) * self.dilations[1] + 1
        return (self.width + self.pads[1] + self.pads[3] - span) // self.strides[1] + 1

    def patch_source(self, r: tirx.PrimExpr, tap: tirx.PrimExpr) -> tuple[tirx.PrimExpr, ...]:
        """Where im2col row ``r`` (an output pixel) reads tap ``tap`` (``ky * KW + kx``): ``(n, iy, ix, inside)``,
        ``inside`` false in the padding."""
        oh, ow = self.out_h, self.out_w
        n, rest = r // (oh * ow), r % (oh * ow)
        y, xo = rest // ow, rest % ow
        ky, kx = tap // self.kernel_w, tap % self.kernel_w
        iy = y * self.strides[0] + ky * self.dilations[0] - self.pads[0]
        ix = xo * self.strides[1] + kx * self.dilations[1] - self.pads[1]
        return n, iy, ix, tirx.all(iy >= 0, iy < self.height, ix >= 0, ix < self.width)


def qconv_compute(
    x: te.Tensor,
    packed: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    shift: te.Tensor,
    *,
    geometry: ConvGeometry,
    plan: GemmPlan,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    """2-D NCHW convolution as im2col + the packed GEMM kernel, written back as NCHW int8."""
    g = geometry
    oh, ow = g.out_h, g.out_w
    taps = g.kernel_h * g.kernel_w
    rows = g.batch * oh * ow

    def patch(r, kk):
        n, iy, ix, inside = g.patch_source(r, kk % taps)
        value = tirx.if_then_else(tirx.all(kk < plan.k, inside), x[n, kk // taps, iy, ix], tirx.const(0, x.dtype))
        return gemm_activation(value, plan)

    cols = te.compute((rows, plan.k_padded), patch, name="im2col")
    gemm = _gemm_requant(cols, packed, bias, multiplier, shift, rows, plan, zero_point, lo, hi)
    return te.compute(
        (g.batch, plan.n, oh, ow),
        lambda n, c, y, xo: gemm[(n * oh + y) * ow + xo, c],
        name="to_nchw",
    )


def qconv_nhwc_compute(
    x: te.Tensor,
    packed: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    shift: te.Tensor,
    *,
    geometry: ConvGeometry,
    plan: GemmPlan,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    """2-D NHWC convolution as im2col + the packed GEMM kernel on ``x[B, H*W, C]`` (NHWC, pixels flattened);
    returns the GEMM's int8 ``[B*OH*OW, N]``, which is the NHWC output row-major (a reshape, no write-back).

    The patch columns are ordered ``kk = (ky * KW + kx) * C + c`` (the weight is packed in that order,
    :func:`nhwc_weight`), so each patch row is ``KH * KW`` contiguous runs of ``C`` channels read from one input
    pixel each, instead of :func:`qconv_compute`'s scalar gather. The patch matrix is a whole number of runs wide
    (the GEMM reads its first ``K_padded`` columns), so the schedule can split its columns into (tap, channel)
    with no division left per element, and every bounds test is per tap."""
    g = geometry
    oh, ow = g.out_h, g.out_w
    rows = g.batch * oh * ow

    def patch(r, kk):
        # no kk < K test: the padding columns meet the packed weight's zero padding, whatever they hold
        n, iy, ix, inside = g.patch_source(r, kk // g.channels)
        pixel = x[n, iy * g.width + ix, kk % g.channels]
        return gemm_activation(tirx.if_then_else(inside, pixel, tirx.const(0, x.dtype)), plan)

    width = -(-plan.k_padded // g.channels) * g.channels
    cols = te.compute((rows, width), patch, name="im2col")
    return _gemm_requant(cols, packed, bias, multiplier, shift, rows, plan, zero_point, lo, hi)


def nhwc_weight(weight: np.ndarray) -> np.ndarray:
    """``[N, C, KH, KW]`` -> ``[N, KH * KW * C]`` in the patch order of :func:`qconv_nhwc_compute`: the same values
    per output channel (so :func:`pack_bias`'s ``128 sum_k w`` and :func:`plan_gemm`'s -128 check are unchanged)."""
    out_channels = weight.shape[0]
    return np.ascontiguousarray(weight.transpose(0, 2, 3, 1)).reshape(out_channels, -1)


def nchw_to_pixels_compute(x: te.Tensor) -> te.Tensor:
    """NCHW ``x[B, C, H*W]`` -> the pixel rows ``[B, H*W, C]`` an NHWC convolution reads (the graph's layout into
    the convolution's; a kernel of its own so it gets the tiled transpose schedule)."""
    batch, channels, pixels = (int(d) for d in x.shape)
    return te.compute((batch, pixels, channels), lambda n, p, c: x[n, c, p], name="transpose")


def pixels_to_nchw_compute(x: te.Tensor, *, height: int, width: int) -> te.Tensor:
    """Pixel rows ``x[B, H*W, C]`` (an NHWC convolution's output) -> NCHW ``[B, C, H, W]`` for the graph."""
    batch, _, channels = (int(d) for d in x.shape)
    return te.compute((batch, channels, height, width), lambda n, c, h, w: x[n, h * width + w, c], name="transpose")


def qconv_direct_compute(
    x: te.Tensor,
    weight: te.Tensor,
    bias: te.Tensor,
    multiplier: te.Tensor,
    shift: te.Tensor,
    *,
    geometry: ConvGeometry,
    group: int,
    zero_point: int,
    lo: int,
    hi: int,
) -> te.Tensor:
    """Grouped (or any) convolution, direct form: the generic path without the GEMM kernel."""
    g = geometry
    out_channels, in_per_group = int(weight.shape[0]), int(weight.shape[1])
    out_per_group = out_channels // group
    rc = te.reduce_axis((0, in_per_group), name="rc")
    ry = te.reduce_axis((0, g.kernel_h), name="ry")
    rx = te.reduce_axis((0, g.kernel_w), name="rx")

    def tap(n, oc, y, xo):
        c = (oc // out_per_group) * in_per_group + rc
        iy = y * g.strides[0] + ry * g.dilations[0] - g.pads[0]
        ix = xo * g.strides[1] + rx * g.dilations[1] - g.pads[1]
        inside = tirx.all(iy >= 0, iy < g.height, ix >= 0, ix < g.width)
        value = tirx.if_then_else(inside, x[n, c, iy, ix], tirx.const(0, x.dtype))
        return te.sum(value.astype("int32") * weight[oc, rc, ry, rx].astype("int32"), axis=[rc, ry, rx])

    acc = te.compute((g.batch, out_channels, g.out_h, g.out_w), tap, name="C")
    return te.compute(
        acc.shape,
        lambda n, c, y, xo: requantize_expr(acc[n, c, y, xo] + bias[c], multiplier[c], shift[c], zero_point, lo, hi),
        name="requant",
    )


def hadamard_compute(x: te.Tensor, h: te.Tensor) -> te.Tensor:
    """``x @ (S_{2^m} (x) h)`` on ``[rows, n]`` in int32 (qcompiler.dialect.hadamard): the K x K block product
    on each run of K channels, then one butterfly stage per bit of the run index (``n (K + m)`` adds)."""
    rows, n = (int(d) for d in x.shape)
    k = int(h.shape[0])
    runs = n // k
    if k == 1:
        t = te.compute((rows, n), lambda r, i: x[r, i].astype("int32") * h[0, 0].astype("int32"), name="hadamard_block")
    else:
        red = te.reduce_axis((0, k), name="kk")
        t = te.compute(
            (rows, n),
            lambda r, i: te.sum(
                x[r, tirx.floordiv(i, k) * k + red].astype("int32") * h[red, tirx.floormod(i, k)].astype("int32"),
                axis=red,
            ),
            name="hadamard_block",
        )
    half = 1
    while half < runs:
        t = te.compute((rows, n), _butterfly(t, half * k), name=f"hadamard_stage{half}")
        half *= 2
    return t


def _butterfly(t: te.Tensor, stride: int) -> Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]:
    """One Sylvester stage on channels ``stride`` apart: ``(a, b) -> (a + b, a - b)``."""

    def body(r: tirx.PrimExpr, i: tirx.PrimExpr) -> tirx.PrimExpr:
        upper = tirx.floormod(tirx.floordiv(i, stride), 2) == 1
        low = t[r, tirx.if_then_else(upper, i - stride, i)]
        high = t[r, tirx.if_then_else(upper, i, i + stride)]
        return tirx.if_then_else(upper, low - high, low + high)

    return body


def batch_matmul_compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """``a[..., M, K] @ b[..., K, N]`` of two integer activations (attention's products: int8 x int8, or int16
    probabilities times int8 values arriving widened to int32) summed in int32; the batch dimensions equal."""
    *batch, _, k_len = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    k = te.reduce_axis((0, k_len), name="k")

    def body(*idx):
        *bi, i, j = idx
        return te.sum(a[(*bi, i, k)].astype("int32") * b[(*bi, k, j)].astype("int32"), axis=k)

    return te.compute((*batch, int(a.shape[-2]), n), body, name="C")


def batch_matmul_rows_compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """:func:`batch_matmul_compute` for a ``b`` stored transposed (keys ``[..., N, K]`` read as ``K^T``, a view
    whose K axis is contiguous): each output is a dot product along K, summed in ``lanes`` int32 partial sums
    (``C_lanes``, vector registers) then across them; exact in int32 as the plain sum is."""
    *batch, m, k_len = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    lanes = 16 if k_len % 16 == 0 else 8
    ko = te.reduce_axis((0, k_len // lanes), name="ko")

    def partial(*idx):
        *bi, i, j, lane = idx
        k = ko * lanes + lane
        return te.sum(a[(*bi, i, k)].astype("int32") * b[(*bi, k, j)].astype("int32"), axis=ko)

    sums = te.compute((*batch, m, n, lanes), partial, name="C_lanes")
    lane = te.reduce_axis((0, lanes), name="lane")
    return te.compute((*batch, m, n), lambda *idx: te.sum(sums[(*idx, lane)], axis=lane), name="C")


def batch_column_offset_compute(b: te.Tensor) -> te.Tensor:
    """``-128 sum_k b[z, k, n]`` per batch and column, zero-padded to the 16-lane tile: the correction of the u8
    offset in :func:`batch_matmul_vnni_compute` (a kernel of its own so the product's epilogue can read it)."""
    batch, k_len, n = (int(d) for d in b.shape)
    np_ = -(-n // ZMM_LANES) * ZMM_LANES
    r = te.reduce_axis((0, k_len), name="r")
    zero8 = tirx.const(0, "int8")
    return te.compute(
        (batch, np_),
        lambda z, j: te.sum(
            tirx.if_then_else(j < n, b[z, r, j], zero8).astype("int32") * tirx.const(-U8_OFFSET, "int32"), axis=r
        ),
        name="B_offset",
    )


def batch_matmul_vnni_compute(a: te.Tensor, b: te.Tensor, offset: te.Tensor | None = None) -> te.Tensor:
    """``a[B, M, K] @ b[B, K, N]`` of two activations on a 512-bit VNNI dot instruction, ``b`` packed per call into
    the GEMM layout ``[Np/16, Kp/KB, 16, KB]``; exact in int32.

    With ``offset`` (:func:`batch_column_offset_compute`): int8 operands on the u8 x s8 instruction (KB = 4), ``a``
    offset to u8 and the offset's contribution added back from ``offset`` in the epilogue. Without: int16 (or
    int8) operands on the int16 pair instruction (KB = 2), the int32 sum exactly as an int32 MatMul computes it
    (what the lowering bounds for probabilities times values)."""
    batch, m, k_len = (int(d) for d in a.shape)
    n = int(b.shape[-1])
    u8 = offset is not None
    lanes, kb = ZMM_LANES, 4 if u8 else 2
    b_dtype = "int8" if u8 else "int16"
    kp, np_ = -(-k_len // kb) * kb, -(-n // lanes) * lanes

    def a_value(z, i, kk):
        value = tirx.if_then_else(kk < k_len, a[z, i, kk], tirx.const(0, a.dtype))
        return as_u8(value) if u8 else value.astype("int16")

    a_padded = te.compute((batch, m, kp), a_value, name="A_pad")
    packed = te.compute(
        (batch, np_ // lanes, kp // kb, lanes, kb),
        lambda z, jo, ko, ji, ki: tirx.if_then_else(
            tirx.all(jo * lanes + ji < n, ko * kb + ki < k_len),
            b[z, ko * kb + ki, jo * lanes + ji].astype(b_dtype),
            tirx.const(0, b_dtype),
        ),
        name="B_pack",
    )
    kr = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (batch, m, np_),
        lambda z, i, j: te.sum(
            a_padded[z, i, kr].astype("int32") * packed[z, j // lanes, kr // kb, j % lanes, kr % kb].astype("int32"),
            axis=kr,
        ),
        name="C",
    )
    out = te.compute(
        (batch, m, np_),
        lambda z, i, j: acc[z, i, j] + offset[z, j] if offset is not None else acc[z, i, j],
        name="requant",
    )
    if np_ == n:
        return out
    return te.compute((batch, m, n), lambda z, i, j: out[z, i, j], name="unpad")
