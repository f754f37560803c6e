"""Hand schedules for the fused integer kernels, applied to PrimFuncs tagged by the importer.

The GEMM schedule (also the core of the im2col convolution): an ``mr x (nr*8)`` register tile of int32
accumulators streamed over K, the inner ``8 x KB`` block tensorized with an AVX2 dot intrinsic, the
requantize epilogue computed on the tile while it is still in registers, the (column-block, row-block)
loop parallel over cores. Every other tagged kernel gets a parallel outer loop and a vectorized inner one.
"""

from __future__ import annotations

import logging

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from qcompiler.backends.tvm import intrinsics

logger = logging.getLogger(__name__)

#: below these sizes a parallel region costs more than it saves (measured on 2 cores: GEMMs win from ~0.5M MACs)
PARALLEL_MIN_MACS = 1 << 19
PARALLEL_MIN_ELEMENTS = 1 << 16

KERNEL_ATTR = "qcompiler.kernel"
KB_ATTR = "qcompiler.kb"
NR_ATTR = "qcompiler.nr"
WEIGHT_DTYPE_ATTR = "qcompiler.weight_dtype"  # "int16": expanded int4 weights (the s8s16 intrinsic)
ROW_TILE_ATTR = "qcompiler.row_tile"  # output width of a convolution: im2col rows split by it lose their div/mod


def _block_names(sch: Schedule) -> list[str]:
    root = sch.get_sblock("root")
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
    inner_extent = _static(sch.get(loop).extent)
    if inner_extent is not None and inner_extent % 8 == 0 and inner_extent <= 64:
        sch.vectorize(loop)


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


def schedule_gemm(
    sch: Schedule,
    kb: int,
    nr: int,
    use_avx2: bool,
    row_tile: int | None = None,
    int16_weights: bool = False,
    vnni: bool = False,
) -> None:
    """Schedule the ``C`` + ``requant`` blocks of a packed GEMM kernel in ``sch``."""
    names = _block_names(sch)
    block = sch.get_sblock("C")
    epilogue = sch.get_sblock("requant")
    i, j, k = sch.get_loops(block)
    rows = _static(sch.get(i).extent)
    macs = _extent_product(sch, [i, j, k])
    parallel = macs is None or macs >= PARALLEL_MIN_MACS
    mr = 2 if rows is not None and rows % 2 == 0 else 1
    io, ii = sch.split(i, [None, mr])
    jo, jt, ji = sch.split(j, [None, nr, 8])
    ko, ki = sch.split(k, [None, kb])
    sch.reorder(jo, io, ko, ii, jt, ji, ki)
    sch.set_scope(block, 0, "local")
    sch.reverse_compute_at(epilogue, io)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    outer = sch.fuse(jo, io)
    if parallel:
        sch.parallel(outer)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    update = sch.get_sblock("C_update")
    loops = sch.get_loops(update)
    sch.unroll(loops[-3])
    sch.unroll(loops[-4])
    if use_avx2:
        if int16_weights:
            intrin = intrinsics.AVX2_DOT_8X2_S8S16
        elif vnni and kb == 4:
            intrin = intrinsics.VNNI_DOT_8X4_PSIGN
        else:
            intrin = intrinsics.AVX2_DOT_8X4_PSIGN if kb == 4 else intrinsics.AVX2_DOT_8X2_I16
        sch.tensorize(loops[-2], intrin)
    else:
        sch.vectorize(loops[-2])
    for name in names:
        if name == "im2col":
            _schedule_im2col(sch, row_tile)
        elif name in ("A_pad", "unpad", "to_nchw", "W_expand"):
            _parallel_elementwise(sch, name, vector=False)


def schedule_module(mod: tvm.IRModule, use_avx2: bool, vnni: bool = False) -> tvm.IRModule:
    """Replace every tagged PrimFunc of ``mod`` by its scheduled version (``vnni``: the int8 GEMMs use vpdpbusd)."""
    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
            continue
        kind = str(func.attrs[KERNEL_ATTR])
        if kind == "rowwise":
            continue  # per-row reductions (softmax, norms): correct under the default lowering, not yet fast
        sch = Schedule(tvm.IRModule({"main": func}))
        if kind == "gemm":
            row_tile = int(func.attrs[ROW_TILE_ATTR]) if ROW_TILE_ATTR in func.attrs else None
            int16_weights = WEIGHT_DTYPE_ATTR in func.attrs and str(func.attrs[WEIGHT_DTYPE_ATTR]) == "int16"
            schedule_gemm(
                sch,
                int(func.attrs[KB_ATTR]),
                int(func.attrs[NR_ATTR]),
                use_avx2,
                row_tile,
                int16_weights=int16_weights,
                vnni=vnni,
            )
        elif kind == "elementwise":
            for name in _block_names(sch):
                _parallel_elementwise(sch, name)
        elif kind == "hadamard":  # [rows, n] stages: parallel over rows (unvectorized: strided butterflies)
            for name in _block_names(sch):
                loops = sch.get_loops(sch.get_sblock(name))
                if _static(sch.get(loops[0]).extent) not in (None, 1):
                    sch.parallel(loops[0])
        elif kind == "direct":  # grouped convolution: parallel over (batch, channel), no tensorization
            sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock("C"))[:2]))
            _parallel_elementwise(sch, "requant", vector=False)
        else:
            raise ValueError(f"unknown kernel kind {kind!r} on {gvar.name_hint}")
        updates[gvar] = sch.mod["main"].with_attrs(dict(func.attrs))
        logger.debug("scheduled %s (%s)", gvar.name_hint, kind)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
