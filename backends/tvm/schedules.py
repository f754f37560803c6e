"""Hand schedules for the fused integer kernels, applied to PrimFuncs tagged by the importer.

The GEMM schedule (also the core of the im2col convolutions, NCHW and NHWC): an ``mr x (nr*L)`` register tile of
int32 accumulators streamed over K, the inner ``L x KB`` block tensorized with a dot intrinsic (AVX2: L = 8;
AVX-512 VNNI: L = 16), the requantize epilogue computed on the tile while it is still in registers, the
(column-block, row-block) loop parallel over cores. Attention's batched products get the same tile on VNNI
(operands packed per call) or a broadcast-times-row tile of int32 lanes; row-wise kernels run every stage under
their row loop; elementwise kernels get a parallel outer loop and a vectorized inner one; the NHWC convolutions'
layout transposes are tiled; TVM's own kernels, after legalization and fusion, are inlined into ours or given the
elementwise schedule.
"""

from __future__ import annotations

import logging
import types

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV

from qcompiler.progress import each

logger = logging.getLogger(__name__)


def _intrinsics() -> types.ModuleType:
    """The int8 dot intrinsics, registered with TVM on first use: parsing their TVMScript takes about 2 s, which
    neither ``import qcompiler`` nor loading a compiled model should pay."""
    from qcompiler.backends.tvm import intrinsics

    return intrinsics


#: below these sizes a parallel region costs more than it saves (measured on 2 cores: GEMMs win from ~0.5M MACs)
PARALLEL_MIN_MACS = 1 << 19
PARALLEL_MIN_ELEMENTS = 1 << 16

KERNEL_ATTR = "qcompiler.kernel"
KB_ATTR = "qcompiler.kb"
NR_ATTR = "qcompiler.nr"
#: int4 GEMMs expand their weights per column panel in the parallel loop when there are at least this many panels
#: (fewer would leave cores idle: then the whole matrix is expanded first, and rows and columns run in parallel)
PANEL_MIN_BLOCKS = 4
#: grouped int4 GEMMs of at most this many row tiles unpack the codes at each step of the dot instead of per panel
#: (4096 x 4096, VNNI: 2.2x faster at M = 1, 1.1x at M = 8; per panel wins from M = 16, where 4 tiles re-unpack)
DECODE_MAX_ROW_TILES = 2
ACTIVATION_DTYPE_ATTR = "qcompiler.activation_dtype"  # "int16": W8A16 activations (the s16s16 intrinsics)
WEIGHT_DTYPE_ATTR = "qcompiler.weight_dtype"  # "int16": expanded int4 weights (the s8s16 intrinsic)
LANES_ATTR = "qcompiler.lanes"  # int32 lanes of the accumulator registers (8: ymm, 16: zmm)
MR_ATTR = "qcompiler.mr"  # rows of a tuned register tile (tuning.py)
ROW_TILE_ATTR = "qcompiler.row_tile"  # output width of a convolution: im2col rows split by it lose their div/mod
CHANNEL_RUN_ATTR = "qcompiler.channel_run"  # input channels of an NHWC convolution: its im2col's contiguous runs


#: the scope of the accumulator tiles (C, P, C_lanes): "global", because TVM lowers every buffer of another scope
#: on the CPU to a TVMBackendAllocWorkspace call per iteration of the loop that holds it (two per register tile of a
#: GEMV, per head of a decode step's attention), while a small global one becomes a stack slot that LLVM keeps in
#: registers (hot SmolLM2 int4 GEMVs 1.05-1.15x faster)
ACCUMULATOR_SCOPE = "global"

#: what a schedule primitive raises when it does not apply to a block: the block keeps its default schedule
_NOT_APPLICABLE = tvm.s_tir.schedule.ScheduleError


def block_names(sch: Schedule) -> list[str]:
    """The top-level blocks; none for a PrimFunc without a root block (an extern or an opaque TVM kernel)."""
    try:
        root = sch.get_sblock("root")
    except _NOT_APPLICABLE:
        return []
    return [sch.get(b).name_hint for b in sch.get_child_blocks(root)]


def _static(extent: tirx.PrimExpr) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _extent_product(sch: Schedule, loops: list) -> int | None:
    total = 1
    for loop in loops:
        extent = _static(sch.get(loop).extent)
        if extent is None:
            return None
        total *= extent
    return total


def _parallel_elementwise(sch: Schedule, name: str, vector: bool = True) -> None:
    block = sch.get_sblock(name)
    loops = sch.get_loops(block)
    size = _extent_product(sch, loops)
    if size is not None and size < PARALLEL_MIN_ELEMENTS:
        if vector:
            _vectorize_inner(sch, loops[-1])
        return
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        sch.parallel(outer)
    elif loops:
        sch.parallel(loops[0])
        return
    if vector:
        _vectorize_inner(sch, loops[-1])


def _vectorize_inner(sch: Schedule, loop) -> None:
    """Vectorize a loop of at most 64 iterations (a multiple of 8); a longer one by its inner 16 (or 8)."""
    inner_extent = _static(sch.get(loop).extent)
    if inner_extent is None or inner_extent % 8:
        return
    if inner_extent <= 64:
        sch.vectorize(loop)
        return
    lanes = 16 if inner_extent % 16 == 0 else 8
    sch.vectorize(sch.split(loop, [None, lanes])[1])


def _schedule_im2col(sch: Schedule, row_tile: int | None) -> None:
    """Rows split by the output width so ``row // (OH*OW)`` and ``row % OW`` simplify away; the reduction
    index (channel, tap) is decoded once per column block instead of per element."""
    block = sch.get_sblock("im2col")
    rows, cols = sch.get_loops(block)
    extent = _static(sch.get(rows).extent)
    if row_tile is None or extent is None or extent % row_tile:
        _parallel_elementwise(sch, "im2col", vector=False)
        return
    outer, inner = sch.split(rows, [None, row_tile])
    sch.reorder(outer, cols, inner)
    if extent * (_static(sch.get(cols).extent) or 0) >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


def _schedule_im2col_nhwc(sch: Schedule, row_tile: int | None, channels: int) -> None:
    """NHWC patches: rows in order (split by the output width so their decode simplifies), each row's columns
    split into (tap, channel) where the channels divide them, so a tap is one contiguous run of input channels,
    copied with vector loads when the run is long enough; parallel over output rows."""
    block = sch.get_sblock("im2col")
    rows, cols = sch.get_loops(block)
    row_extent, col_extent = _static(sch.get(rows).extent), _static(sch.get(cols).extent)
    outer = rows
    if row_tile is not None and row_extent is not None and row_extent % row_tile == 0:
        outer = sch.split(rows, [None, row_tile])[0]
    if col_extent is not None and channels > 1 and col_extent % channels == 0:
        _vectorize_inner(sch, sch.split(cols, [None, channels])[1])
    if row_extent is not None and col_extent is not None and row_extent * col_extent >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


def _divisor(extent: int | None, choices: tuple[int, ...]) -> int | None:
    return next((v for v in choices if extent is not None and extent % v == 0), None)


def schedule_transpose(sch: Schedule) -> None:
    """The NHWC convolutions' layout changes, ``out[n, a, (h,) b]`` read from an input contiguous along ``a``, in
    tiles: ``unroll`` values along ``a`` times a vector of ``lanes`` along the output's contiguous ``b``, so both
    sides move in runs (TVM's elementwise schedule of a transpose gathers every vector element: measured 2-4x
    slower); a ``b`` of 5 to 15 elements is one vector of its own width; where no tile fits (1 to 4 channels, an
    odd width above 16), plain loops. Parallel over the outer loops."""
    block = sch.get_sblock("transpose")
    n, a, *middle, b = sch.get_loops(block)
    width = _static(sch.get(b).extent)
    lanes = _divisor(width, (16, 8, 4)) or (width if width is not None and 4 < width < 16 else None)
    unroll = _divisor(_static(sch.get(a).extent), (8, 4))
    if lanes is not None and unroll is not None:
        a_outer, a_inner = sch.split(a, [None, unroll])
        b_outer, b_inner = sch.split(b, [None, lanes])
        sch.reorder(a_outer, *middle, b_outer, a_inner, b_inner)
        sch.unroll(a_inner)
        sch.vectorize(b_inner)
        a = a_outer
    size = _extent_product(sch, sch.get_loops(block))
    outer = sch.fuse(n, a, *middle)
    if size is None or size >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


def schedule_gemm(
    sch: Schedule,
    kb: int,
    nr: int,
    use_avx2: bool,
    row_tile: int | None = None,
    int16_weights: bool = False,
    lanes: int = 8,
    mr: int | None = None,
    channel_run: int | None = None,
    int16_activations: bool = False,
) -> None:
    """Schedule the ``C`` + ``requant`` blocks of a packed GEMM kernel in ``sch`` (``mr``: rows of the register
    tile, a tuned one; it must divide M; by default :func:`default_mr`). Leading batch loops (attention's batched
    products) join the parallel loop; 16 lanes mean the VNNI instructions (u8 x s8 for KB 4, int16 pairs for 2).
    ``channel_run``: the input channels of an NHWC convolution (its im2col copies runs of them).
    ``int16_activations``: W8A16 (int16 activations against int16-widened weights, KB 2)."""
    names = block_names(sch)
    if "P" in names:  # int4 codes summed per group (kernels.qgemm_int4_compute, grouped form)
        _schedule_grouped_gemm(sch, names, kb, nr, use_avx2, lanes, mr)
        return
    block = sch.get_sblock("C")
    epilogue = sch.get_sblock("requant")
    *batch, i, j, k = sch.get_loops(block)
    rows = _static(sch.get(i).extent)
    macs = _extent_product(sch, [*batch, i, j, k])
    parallel = macs is None or macs >= PARALLEL_MIN_MACS
    if mr is None or rows is None or rows % mr:
        mr = default_mr(rows, lanes)
    io, ii = sch.split(i, [None, mr])
    jo, jt, ji = sch.split(j, [None, nr, lanes])
    ko, ki = sch.split(k, [None, kb])
    sch.reorder(*batch, jo, io, ko, ii, jt, ji, ki)
    sch.set_scope(block, 0, ACCUMULATOR_SCOPE)
    sch.reverse_compute_at(epilogue, io)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    blocks = _static(sch.get(jo).extent)
    expand_panels = "W_expand" in names and (blocks is None or blocks >= PANEL_MIN_BLOCKS)  # an int4 GEMM
    if expand_panels:
        # int4 weights: each column block's panel [nr, Kp/2, 8, 2] is expanded (codes times group scales) in
        # its thread, just before the row tiles that read it, into a buffer that stays in cache (nr 8 K int16:
        # 256 KB at K = 4096), instead of one N x K int16 copy written out and read back per call (1.2x at
        # M = 128, 2x at M = 1 and 16 on 4096 x 4096)
        outer = sch.fuse(*batch, jo)
        expand = sch.get_sblock("W_expand")
        sch.compute_at(expand, outer)
        _vectorize_block_halves(sch, expand)
    else:
        outer = sch.fuse(*batch, jo, io)
    if parallel:
        sch.parallel(outer)
    if not use_avx2:  # no dot instruction: the lanes innermost, vectorized while the reduction is complete
        sch.reorder(ko, ki, ii, jt, ji)
        sch.vectorize(ji)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    update = sch.get_sblock("C_update")
    loops = sch.get_loops(update)
    if not use_avx2:
        sch.unroll(loops[-2])
        sch.unroll(loops[-3])
    else:
        sch.unroll(loops[-3])
        sch.unroll(loops[-4])
        intrinsics = _intrinsics()
        if int16_activations:
            intrin = intrinsics.VNNI_DOT_16X2_S16S16 if lanes == 16 else intrinsics.AVX2_DOT_8X2_S16S16
        elif int16_weights:
            intrin = intrinsics.AVX2_DOT_8X2_S8S16
        elif lanes == 16:
            intrin = intrinsics.VNNI_DOT_16X4_U8S8 if kb == 4 else intrinsics.VNNI_DOT_16X2_S16S16
        else:
            intrin = intrinsics.AVX2_DOT_8X4_PSIGN if kb == 4 else intrinsics.AVX2_DOT_8X2_I16
        sch.tensorize(loops[-2], intrin)
    for name in names:
        if name == "im2col" and channel_run not in (None, 1):
            _schedule_im2col_nhwc(sch, row_tile, channel_run)
        elif name == "im2col":  # NCHW, or NHWC of one channel: the same patch order, the same best loops
            _schedule_im2col(sch, row_tile)
        elif name in ("A_pad", "B_pack", "unpad", "to_nchw") or (name == "W_expand" and not expand_panels):
            _parallel_elementwise(sch, name, vector=False)


def _vectorize_block_halves(sch: Schedule, expand: SBlockRV) -> None:
    """An int4 unpacking block's innermost (lanes, KB) loops as two vectors, one per half of the block: each half
    is one contiguous load of the packed bytes (kernels.pack_int4_panels: low nibbles, then high ones)."""
    _, half = sch.split(sch.fuse(*sch.get_loops(expand)[-2:]), [2, None])
    sch.vectorize(half)


def _schedule_grouped_gemm(
    sch: Schedule, names: list[str], kb: int, nr: int, use_avx2: bool, lanes: int, mr: int | None
) -> None:
    """An int4 GEMM summed per group: the ``mr x (nr*L)`` tile of :func:`schedule_gemm` holds the running sum
    ``C``; for each group, the tile of its partial sums ``P`` is streamed over the group's K on the unsigned-code
    dot intrinsic (the codes unpacked to bytes), then added to ``C``, less the activations' group sum (``A_sum``,
    computed once before the tiles), times the group's scales (one vector multiply-add per accumulator and group).

    Where the codes come from: for at most :data:`DECODE_MAX_ROW_TILES` row tiles (decode-sized M) each step of
    the dot unpacks the ``nr L KB`` codes it is about to read, from the packed bytes into a stack buffer that
    stays in L1 (no weight matrix is written at all: the packed bytes are the only weight traffic); for more rows
    each column panel is unpacked once, in its thread, and read by every row tile (the unpacking amortized)."""
    block, partial = sch.get_sblock("C"), sch.get_sblock("P")
    i, j, g = sch.get_loops(block)
    rows = _static(sch.get(i).extent)
    macs = _extent_product(sch, sch.get_loops(partial))
    if mr is None or rows is None or rows % mr:
        mr = default_mr(rows, lanes)
    io, ii = sch.split(i, [None, mr])
    jo, jt, ji = sch.split(j, [None, nr, lanes])
    sch.reorder(jo, io, g, ii, jt, ji)
    sch.set_scope(block, 0, ACCUMULATOR_SCOPE)
    sch.compute_at(partial, g, preserve_unit_loops=True)
    sch.set_scope(partial, 0, ACCUMULATOR_SCOPE)
    pi, pg, pj, pk = sch.get_loops(partial)[-4:]  # pg: the one group of this iteration of g
    pjt, pji = sch.split(pj, [None, lanes])
    pko, pki = sch.split(pk, [None, kb])
    sch.reorder(pg, pko, pi, pjt, pji, pki)
    sch.reverse_compute_at(sch.get_sblock("requant"), io)
    sch.vectorize(sch.get_loops(sch.get_sblock("requant"))[-1])
    blocks = _static(sch.get(jo).extent)
    per_step = rows is not None and rows <= DECODE_MAX_ROW_TILES * mr and use_avx2
    expand_panels = not per_step and (blocks is None or blocks >= PANEL_MIN_BLOCKS)
    expand = sch.get_sblock("W_expand")
    if per_step:
        # global scope on purpose: the intrinsics read a global buffer; compacted to nr L KB bytes, it is a
        # stack buffer under the parallel loop
        sch.compute_at(expand, pko, preserve_unit_loops=True)
        _vectorize_block_halves(sch, expand)
        sch.unroll(sch.get_loops(expand)[-4])  # the tile's nr blocks
        outer = sch.fuse(jo, io)
    elif expand_panels:  # each column panel's codes unpacked in its thread, just before its row tiles (cache-sized)
        outer = jo
        sch.compute_at(expand, outer)
        _vectorize_block_halves(sch, expand)
    else:
        outer = sch.fuse(jo, io)
    if macs is None or macs >= PARALLEL_MIN_MACS:
        sch.parallel(outer)
    if not use_avx2:
        sch.reorder(pko, pki, pi, pjt, pji)
        sch.vectorize(pji)
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, g)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(jt)
    sch.unroll(ii)
    partial_init = sch.decompose_reduction(partial, pko)
    sch.vectorize(sch.get_loops(partial_init)[-1])
    loops = sch.get_loops(sch.get_sblock("P_update"))
    if use_avx2:
        sch.unroll(loops[-3])
        sch.unroll(loops[-4])
        intrinsics = _intrinsics()
        intrin = intrinsics.VNNI_DOT_16X4_U4 if lanes == 16 else intrinsics.AVX2_DOT_8X4_U4
        sch.tensorize(loops[-2], intrin)
    else:
        sch.unroll(loops[-2])
        sch.unroll(loops[-3])
    for name in names:
        if name in ("A_pad", "A_sum", "unpad") or (name == "W_expand" and not expand_panels and not per_step):
            _parallel_elementwise(sch, name, vector=False)


def _inline_views(sch: Schedule, keep: tuple[str, ...]) -> None:
    """Inline every block but ``keep``: the layout ops a few-row product reads its operand through
    (importer._view_of), so the kernel indexes the tensors they read."""
    for name in reversed(block_names(sch)):
        if name not in keep:
            sch.compute_inline(sch.get_sblock(name))


def schedule_batch_matmul(sch: Schedule) -> None:
    """``C[..., M, N]`` int32 of int8 operands: a ``4 x T`` tile of accumulators (T <= 64 columns, in lanes of 16
    or 8) kept in registers over K, each step one broadcast of ``a`` per row times one row of ``b``; the batch loop
    parallel. Layout ops feeding ``b`` (a decode step's cache view) are inlined: ``b`` is read where it lies."""
    _inline_views(sch, ("C",))
    block = sch.get_sblock("C")
    *batch, i, j, k = sch.get_loops(block)
    rows, cols = _static(sch.get(i).extent), _static(sch.get(j).extent)
    lanes = next((v for v in (16, 8) if cols is not None and cols % v == 0), None)
    if rows is None or cols is None or lanes is None:
        _parallel_elementwise(sch, "C", vector=False)
        return
    tile = next(t for t in range(min(cols, 64), 0, -lanes) if cols % t == 0)
    mr = next(v for v in (4, 2, 1) if rows % v == 0)
    writer = sch.cache_write(block, 0, ACCUMULATOR_SCOPE)
    io, ii = sch.split(i, [None, mr])
    jo, jt, ji = sch.split(j, [None, tile // lanes, lanes])
    sch.reorder(io, jo, k, ii, jt, ji)
    sch.reverse_compute_at(writer, jo)
    if batch:
        outer = sch.fuse(*batch) if len(batch) > 1 else batch[0]
        macs = _extent_product(sch, [outer, io, ii, jo, jt, ji, k])
        if macs is None or macs >= PARALLEL_MIN_MACS:
            sch.parallel(outer)
    sch.unroll(ii)
    sch.unroll(jt)
    # vectorize (and parallelize) before the init is split off: those loops must hold a complete reduction block
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    _vectorize_inner(sch, sch.get_loops(writer)[-1])


def schedule_batch_matmul_rows(sch: Schedule) -> None:
    """kernels.batch_matmul_rows_compute (a decode step's ``q K^T`` over the cache as it lies, keys along rows):
    per output, the dot product's partial sums in one vector register over K, then summed across; the batch (the
    heads) parallel."""
    _inline_views(sch, ("C_lanes", "C"))
    block, lanes_block = sch.get_sblock("C"), sch.get_sblock("C_lanes")
    *batch, _, j, _ = sch.get_loops(block)
    sch.compute_at(lanes_block, j)
    sch.set_scope(lanes_block, 0, ACCUMULATOR_SCOPE)
    if batch:  # parallel and vectorized before the init is split off: those loops must hold complete blocks
        outer = sch.fuse(*batch) if len(batch) > 1 else batch[0]
        sch.parallel(outer)
    inner = sch.get_loops(lanes_block)[(1 if batch else 0) + 2 :]  # (lane, ko) under (batch, row, column)
    if len(inner) == 2:  # ko is gone when K is one vector
        lane, ko = inner
        sch.reorder(ko, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(lanes_block, ko)
        sch.vectorize(sch.get_loops(init)[-1])
    else:
        sch.vectorize(inner[0])


def schedule_direct_conv(sch: Schedule) -> None:
    """A grouped (depthwise) convolution in its direct form (kernels.qconv_direct_compute): parallel over (batch,
    channel, output row); along a row of 8 pixels or more, tiles of 8 or 16 output pixels accumulate in int32
    registers (``local``), the taps unrolled around the pixel loop, which LLVM vectorizes (no dot instruction: a
    depthwise tap is one product per pixel), and the requantize runs on each tile while it is in registers."""
    block = sch.get_sblock("C")
    n, c, y, x, *reduction = sch.get_loops(block)
    width = _static(sch.get(x).extent)
    lanes = next((v for v in (16, 8) if width is not None and width >= v), None)
    row = sch.fuse(n, c, y)
    sch.parallel(row)
    if lanes is None:  # rows of fewer than 8 pixels: the plain loops
        _parallel_elementwise(sch, "requant", vector=False)
        return
    xo, xi = sch.split(x, [None, lanes])
    sch.reorder(xo, *reduction, xi)
    sch.set_scope(block, 0, ACCUMULATOR_SCOPE)
    epilogue = sch.get_sblock("requant")
    sch.reverse_compute_at(epilogue, xo)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    update = sch.get_sblock("C_update")
    loops = sch.get_loops(update)
    for loop in loops[-1 - len(reduction) : -1]:  # the pixel loop itself stays for LLVM's loop vectorizer
        sch.unroll(loop)
    _vectorize_inner(sch, sch.get_loops(epilogue)[-1])


def schedule_hadamard(sch: Schedule) -> None:
    """The integer Hadamard's stages (kernels.hadamard_compute: a K x K block product on each run of K channels,
    then one butterfly stage per bit of the run index) all under the row loop of the last one, so a row's
    intermediates stay in L1, the rows in parallel. The block product accumulates a run's K outputs as one vector
    (a broadcast input times a row of ``h`` per step); a butterfly of stride ``s`` splits its channels into
    (pair of runs, upper half or lower, s), so each half is a vector add or subtract of two contiguous runs of
    ``s`` values (strides below 4 stay scalar)."""
    names = block_names(sch)
    last = sch.get_sblock(names[-1])
    loops = sch.get_loops(last)
    row, channel = loops[0], loops[-1]
    width = _static(sch.get(channel).extent)
    for name in reversed(names[:-1]):
        sch.compute_at(sch.get_sblock(name), row)
    rows = _static(sch.get(row).extent)
    # about K + log2(runs) operations per element: parallel from a quarter of the elementwise threshold
    if rows not in (None, 1) and (width is None or rows * width >= PARALLEL_MIN_ELEMENTS // 4):
        sch.parallel(row)  # before the reduction's init is split off: the loop must hold complete blocks
    block = sch.get_sblock("hadamard_block")
    k = 1
    if len(sch.get(block).iter_vars) == 3:  # K > 1: the product has its reduction
        *_, ax, kk = sch.get_loops(block)
        k = _static(sch.get(kk).extent) or 1
        # one accumulator vector of at most 16 lanes over the K steps (a wider one, 36 lanes, is spilled lane by
        # lane every step: measured 3x slower)
        lanes = max(d for d in range(1, min(k, 16) + 1) if k % d == 0)
        runs, c_outer, c = sch.split(ax, [None, k // lanes, lanes])
        sch.reorder(runs, c_outer, kk, c)
        sch.vectorize(c)  # before the init is split off: the loop must hold a complete reduction block
        init = sch.decompose_reduction(block, kk)
        sch.vectorize(sch.get_loops(init)[-1])
    else:
        _vectorize_inner(sch, sch.get_loops(block)[-1])
    for name in names:
        if not name.startswith("hadamard_stage") or width is None:
            continue
        stride = int(name.removeprefix("hadamard_stage")) * k
        stage = sch.get_sblock(name)
        _, half, inner = sch.split(sch.get_loops(stage)[-1], [width // (2 * stride), 2, stride])
        sch.unroll(half)
        if stride >= 4:
            if stride <= 64:
                sch.vectorize(inner)
            else:
                sch.vectorize(sch.split(inner, [None, _divisor(stride, (16, 8, 4))])[1])


def default_mr(rows: int | None, lanes: int) -> int:
    """Rows of the default GEMM register tile where they divide M: 4 with zmm accumulators (16 lanes, 32
    registers), 2 with ymm (8 lanes, 16 registers), else 1."""
    return next((v for v in ((4, 2) if lanes == 16 else (2,)) if rows is not None and rows % v == 0), 1)


def schedule_rowwise(sch: Schedule) -> None:
    """Per-row kernels (softmax, LayerNorm/RMSNorm): every stage moved under the row loop of the last one, so a
    row's intermediates stay in cache, and the rows run in parallel."""
    names = block_names(sch)
    loops = sch.get_loops(sch.get_sblock(names[-1]))
    if len(loops) < 2:
        return
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    for name in reversed(names[:-1]):  # consumers first: each producer then has its consumer under the row loop
        sch.compute_at(sch.get_sblock(name), row)
    size = _extent_product(sch, sch.get_loops(sch.get_sblock(names[-1])))
    if size is None or size >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(row)
    for name in names:  # the elementwise stages along the row (exp, normalize, output) as vectors
        block = sch.get_sblock(name)
        inner = sch.get_loops(block)[1:]
        if len(inner) == 1 and _spatial(sch, name):
            _vectorize_inner(sch, inner[0])


def _scheduled(sch: Schedule, name: str) -> bool:
    """Whether a block already sits under a parallel, vectorized or unrolled loop (one of our kernels)."""
    return any(int(sch.get(loop).kind) != 0 for loop in sch.get_loops(sch.get_sblock(name)))


def _spatial(sch: Schedule, name: str) -> bool:
    return all(int(iv.iter_type) == 0 for iv in sch.get(sch.get_sblock(name)).iter_vars)


def schedule_fused(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """:func:`_schedule_fused`, or None (TVM's default schedule, correct but slower) where a primitive fails a TVM
    internal check (seen inlining around a gather): a failed check may leave a schedule half changed."""
    try:
        return _schedule_fused(func)
    except tvm.error.InternalError as failure:
        logger.debug("elementwise schedule skipped for %s: %s", func.attrs.get("global_symbol", "?"), failure)
        return None


def _schedule_fused(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """A PrimFunc after TVM's legalization and fusion: TVM's own elementwise kernels (casts, reshapes, RoPE's
    products, concatenations), alone or fused around one of our scheduled kernels. Their spatial blocks are
    inlined into their consumers (or, trailing ones, into their producer), and whatever spatial block is left gets
    the elementwise schedule; our kernels' schedules stay. ``None`` where nothing applied."""
    sch = Schedule(tvm.IRModule({"main": func}))
    changed = False
    for name in block_names(sch)[:-1]:
        if _spatial(sch, name) and not _scheduled(sch, name):
            try:
                sch.compute_inline(sch.get_sblock(name))
                changed = True
            except _NOT_APPLICABLE:
                pass
    for name in block_names(sch):
        if not _spatial(sch, name) or _scheduled(sch, name):
            continue
        try:
            sch.reverse_compute_inline(sch.get_sblock(name))
            changed = True
            continue
        except _NOT_APPLICABLE:
            pass
        try:
            _parallel_elementwise(sch, name)
            changed = True
        except _NOT_APPLICABLE:
            pass
    return sch.mod["main"] if changed else None


def schedule_legalized(mod: tvm.IRModule) -> tvm.IRModule:
    """:func:`schedule_fused` on every untagged PrimFunc of a legalized, fused module."""
    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and KERNEL_ATTR in func.attrs):
            continue
        scheduled = schedule_fused(func)
        if scheduled is not None:
            updates[gvar] = scheduled.with_attrs(dict(func.attrs)) if func.attrs is not None else scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def schedule_module(mod: tvm.IRModule, use_avx2: bool, progress: bool = False) -> tvm.IRModule:
    """Replace every tagged PrimFunc of ``mod`` by its scheduled version (each GEMM's attributes name its tile and
    intrinsic: the importer planned them for the target); ``progress``: a bar over the kernels."""
    updates = {}
    tagged = [
        (gvar, func)
        for gvar, func in mod.functions.items()
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs
    ]
    for gvar, func in each(tagged, "build: schedule kernels", progress, unit="kernel"):
        kind = str(func.attrs[KERNEL_ATTR])
        sch = Schedule(tvm.IRModule({"main": func}))
        if kind == "rowwise":
            schedule_rowwise(sch)
        elif kind == "gemm":
            row_tile = int(func.attrs[ROW_TILE_ATTR]) if ROW_TILE_ATTR in func.attrs else None
            int16_weights = WEIGHT_DTYPE_ATTR in func.attrs and str(func.attrs[WEIGHT_DTYPE_ATTR]) == "int16"
            int16_activations = (
                ACTIVATION_DTYPE_ATTR in func.attrs and str(func.attrs[ACTIVATION_DTYPE_ATTR]) == "int16"
            )
            schedule_gemm(
                sch,
                int(func.attrs[KB_ATTR]),
                int(func.attrs[NR_ATTR]),
                use_avx2,
                row_tile,
                int16_weights=int16_weights,
                lanes=int(func.attrs[LANES_ATTR]) if LANES_ATTR in func.attrs else 8,
                mr=int(func.attrs[MR_ATTR]) if MR_ATTR in func.attrs else None,
                channel_run=int(func.attrs[CHANNEL_RUN_ATTR]) if CHANNEL_RUN_ATTR in func.attrs else None,
                int16_activations=int16_activations,
            )
        elif kind == "batch_matmul":
            schedule_batch_matmul(sch)
        elif kind == "batch_matmul_rows":
            schedule_batch_matmul_rows(sch)
        elif kind == "transpose":
            schedule_transpose(sch)
        elif kind == "column_sums":  # [batch, columns] reductions: parallel over both, the sum serial
            _parallel_elementwise(sch, block_names(sch)[0], vector=False)
        elif kind == "elementwise":
            for name in block_names(sch):
                _parallel_elementwise(sch, name)
        elif kind == "hadamard":
            schedule_hadamard(sch)
        elif kind == "direct":
            schedule_direct_conv(sch)
        else:
            raise ValueError(f"unknown kernel kind {kind!r} on {gvar.name_hint}")
        updates[gvar] = sch.mod["main"].with_attrs(dict(func.attrs))
        logger.debug("scheduled %s (%s)", gvar.name_hint, kind)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
