"""AVX2 int8 dot-product tensor intrinsics (TVM ships only AVX-512/VNNI ones).

``psign``: ``|a| * (b * sign(a))`` through vpsignb / vpmaddubsw / vpmaddwd. vpmaddubsw saturates its int16
pair sums, which can only happen when a weight is -128; it is exact for weights in [-127, 127] (what the
symmetric weight quantizer produces). ``i16``: sign-extend to int16 then vpmaddwd, exact for every int8.
``s8s16``: the same against int16 weights (int4 codes times their integer group scale: ``QGemmInt4``).
``s16s16``: int16 activations (W8A16) against int16-widened weights, vpmaddwd on int16 pairs.
``vnni``: one 512-bit vpdpbusd (AVX-512 VNNI): sixteen lanes, each plus four u8 x s8 products, straight into
int32 with no int16 pair sums to saturate; the activations arrive offset to u8 (``a + 128``) and the offset is
compensated in the bias (kernels.py), so it is exact for every int8 weight. ``vnni s16``: one 512-bit vpdpwssd,
two int16 x int16 products per lane into int32 (attention's int16 probabilities times values).
``u4``: unsigned int4 codes (``code + 8``, in [0, 15]) as the unsigned operand against int8 activations, the
activations broadcast: one vpdpbusd (VNNI) or vpmaddubsw + vpmaddwd (AVX2; a pair sum is at most 2 * 15 * 128,
so nothing saturates): exact for every int8 activation, with no offset on either operand.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from qcompiler.backends.tvm.schedules import ACCUMULATOR_SCOPE  # the accumulators' buffers, as scheduled

AVX2_DOT_8X4_PSIGN = "qcompiler_avx2_dot_8x4_s8s8s32_psign"
AVX2_DOT_8X2_I16 = "qcompiler_avx2_dot_8x2_s8s8s32_i16"
AVX2_DOT_8X2_S8S16 = "qcompiler_avx2_dot_8x2_s8s16s32"
AVX2_DOT_8X2_S16S16 = "qcompiler_avx2_dot_8x2_s16s16s32"
VNNI_DOT_16X4_U8S8 = "qcompiler_avx512vnni_dot_16x4_u8s8s32"
VNNI_DOT_16X2_S16S16 = "qcompiler_avx512vnni_dot_16x2_s16s16s32"
AVX2_DOT_8X4_U4 = "qcompiler_avx2_dot_8x4_s8u4s32"
VNNI_DOT_16X4_U4 = "qcompiler_avx512vnni_dot_16x4_s8u4s32"


def _dot_desc(lanes: int, kb: int, a_dtype: str, b_dtype: str) -> tirx.PrimFunc:
    """What every dot intrinsic computes: ``C[i] += sum_k A[k] * B[i, k]`` in int32, ``lanes`` x ``kb``."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((kb,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, kb), b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kb], B[0:lanes, 0:kb])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, kb):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _vnni_impl(instruction: str, kb: int, a_dtype: str, b_dtype: str) -> tirx.PrimFunc:
    """One 512-bit VNNI dot (``vpdpbusd``: u8 x s8 groups of 4; ``vpdpwssd``: int16 pairs): sixteen int32 lanes,
    each plus the ``kb`` products of its group, no saturation; ``A``'s group broadcast to every lane."""
    a_group, b_block = f"{a_dtype}x{kb}", f"{b_dtype}x{16 * kb}"  # A's group is broadcast as a B-typed vector

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((kb,), a_dtype, offset_factor=1),
        B: T.Buffer((16, kb), b_dtype, offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:kb], B[0:16, 0:kb])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction),
                C[T.ramp(T.int32(0), 1, 16)],
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], a_group), dtype="int32"), 16), dtype=b_block),
                B.vload([0, 0], dtype=b_block),
                dtype="int32x16",
            )

    return impl


@T.prim_func(s_tir=True)
def _dot8x4_psign_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((8, 4), "int8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
) -> None:
    # One expression on purpose: a TVMScript assignment becomes a local buffer, which TVM allocates with
    # TVMBackendAllocWorkspace inside parallel loops (five heap allocations per call, measured 5x slower).
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                T.call_llvm_pure_intrin(  # |a|
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"
                    ),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"
                    ),
                    dtype="int8x32",
                ),
                T.call_llvm_pure_intrin(  # b * sign(a)
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"),
                    B.vload([0, 0], dtype="int8x32"),
                    T.reinterpret(
                        T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"
                    ),
                    dtype="int8x32",
                ),
                dtype="int16x16",
            ),
            T.int16x16(1),
            dtype="int32x8",
        )


@T.prim_func(s_tir=True)
def _vnni_u4_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "uint8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
) -> None:
    # unsigned int4 codes (one per byte) as vpdpbusd's unsigned operand, the int8 activations broadcast as its
    # signed one
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C[T.ramp(T.int32(0), 1, 16)],
            B.vload([0, 0], dtype="uint8x64"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 16), dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _avx2_u4_impl(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((8, 4), "uint8", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
) -> None:
    # vpmaddubsw's pair sums are at most 2 * 15 * 128: unsigned int4 codes never saturate them
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                B.vload([0, 0], dtype="uint8x32"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32"),
                dtype="int16x16",
            ),
            T.int16x16(1),
            dtype="int32x8",
        )


def _pmaddwd_impl(a_dtype: str, b_dtype: str) -> tirx.PrimFunc:
    """One vpmaddwd on eight int32 lanes: ``A``'s pair and ``B``'s eight pairs sign-extended to int16 (int8
    operands; int16 ones as they are), two exact int16 x int16 products per lane summed into ``C``. ``i16``:
    int8 x int8; ``s8s16``: int8 activations against int16 weights (int4 codes times their group scale);
    ``s16s16``: int16 activations (W8A16) against int16-widened weights."""

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2,), a_dtype, offset_factor=1),
        B: T.Buffer((8, 2), b_dtype, offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=ACCUMULATOR_SCOPE),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(
                    T.broadcast(T.reinterpret(T.cast(A.vload([0], f"{a_dtype}x2"), "int16x2"), dtype="int32"), 8),
                    dtype="int16x16",
                ),
                T.cast(B.vload([0, 0], dtype=f"{b_dtype}x16"), "int16x16"),
                dtype="int32x8",
            )

    return impl


TensorIntrin.register(AVX2_DOT_8X4_PSIGN, _dot_desc(8, 4, "int8", "int8"), _dot8x4_psign_impl, override=True)
for _name, _a, _b in ((AVX2_DOT_8X2_I16, "int8", "int8"), (AVX2_DOT_8X2_S8S16, "int8", "int16"),
                      (AVX2_DOT_8X2_S16S16, "int16", "int16")):  # fmt: skip
    TensorIntrin.register(_name, _dot_desc(8, 2, _a, _b), _pmaddwd_impl(_a, _b), override=True)
TensorIntrin.register(
    VNNI_DOT_16X4_U8S8,
    _dot_desc(16, 4, "uint8", "int8"),
    _vnni_impl("llvm.x86.avx512.vpdpbusd.512", 4, "uint8", "int8"),
    override=True,
)
TensorIntrin.register(AVX2_DOT_8X4_U4, _dot_desc(8, 4, "int8", "uint8"), _avx2_u4_impl, override=True)
TensorIntrin.register(VNNI_DOT_16X4_U4, _dot_desc(16, 4, "int8", "uint8"), _vnni_u4_impl, override=True)
TensorIntrin.register(
    VNNI_DOT_16X2_S16S16,
    _dot_desc(16, 2, "int16", "int16"),
    _vnni_impl("llvm.x86.avx512.vpdpwssd.512", 2, "int16", "int16"),
    override=True,
)
