"""Build an integer ONNX model into a TVM module for the host CPU, run it, export and reload it."""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import tvm
from tvm.relax.backend import cpu_generic

from qcompiler.backends.tvm import importer, metaschedule, schedules, tuning
from qcompiler.backends.tvm.params import lift_constants
from qcompiler.backends.tvm.remote import Device
from qcompiler.backends.tvm.runtime import TVMModule, configure_threads
from qcompiler.errors import TargetError
from qcompiler.progress import step

if TYPE_CHECKING:
    from qcompiler.backends.tvm.opencl import OpenCLModule

logger = logging.getLogger(__name__)


@functools.cache
def host_cpu_features() -> frozenset[str]:
    """x86 feature flags of this machine (empty off Linux/x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_target(target: str | Mapping[str, Any] | tvm.target.Target) -> tuple[tvm.target.Target, bool]:
    """The TVM target for ``target`` and whether the AVX2 int8 intrinsics may be used.

    ``"llvm"`` (or ``"cpu"``) means this machine: its CPU name from LLVM and its core count. ``"cuda"`` (or
    ``{"kind": "cuda", "arch": "sm_90"}``) and ``"opencl"``: the GPU targets (:mod:`qcompiler.backends.tvm.gpu`);
    the flag is then False.

    Raises:
        TargetError: an unknown target name or kind; a CUDA arch we do not build for, or no nvcc; no pyopencl or
            no working OpenCL device.
    """
    from qcompiler.backends.tvm import gpu

    kind = (
        target.kind.name
        if isinstance(target, tvm.target.Target)
        else str(target.get("kind", ""))
        if isinstance(target, Mapping)
        else target
    )
    if kind in ("cuda", "gpu"):
        spec = "cuda" if kind == "gpu" else target
        if isinstance(spec, tvm.target.Target):
            spec = {k: v for k, v in spec.export().items() if k != "host"}
        return gpu.cuda_target(spec), False
    if kind == "opencl":
        return gpu.opencl_target(target if isinstance(target, str | Mapping) else dict(target.export())), False
    if isinstance(target, tvm.target.Target):
        tvm_target = target
    elif isinstance(target, Mapping):
        tvm_target = tvm.target.Target(dict(target))
    elif target in ("llvm", "cpu"):
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        tvm_target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    else:
        raise TargetError(
            f"target: unknown target {target!r}; use 'llvm' (this CPU), 'cuda', 'opencl' or a tvm.target.Target"
        )
    if tvm_target.kind.name != "llvm":
        raise TargetError(f"target: kind {tvm_target.kind.name!r} is not supported; use 'llvm', 'cuda' or 'opencl'")
    return tvm_target, int8_dot_isa(tvm_target) != "generic"


def _foreign(target: tvm.target.Target) -> bool:
    """Whether the target's triple names another architecture than x86 (AArch64 NEON, RISC-V, ...)."""
    triple = str(target.attrs.get("mtriple", ""))
    return bool(triple) and not triple.startswith(("x86_64", "i386", "i686", "amd64"))


#: CPUs with AVX-512 VNNI (the 512-bit vpdpbusd / vpdpwssd the int8 GEMMs use)
_VNNI_MCPUS = (
    "cascadelake", "cooperlake", "icelake", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "znver4", "znver5",
)  # fmt: skip


def int8_dot_isa(target: tvm.target.Target) -> str:
    """``"avx512vnni"`` when the target CPU has AVX-512 VNNI and VL (this machine's flags for ``"llvm"``, else its
    ``mcpu``), ``"avx2"`` when it has AVX2, else ``"generic"`` (also every non-x86 ``mtriple``: LLVM vectorizes
    the int32 lanes for it): which int8 dot intrinsic the GEMMs use. Code for a VNNI ``mcpu`` compiles anywhere
    and runs only on such CPUs; code for another architecture compiles (export it with that architecture's
    toolchain) and is not run here. AMX CPUs (Sapphire Rapids on) get the VNNI kernel: no AMX tile kernel is
    generated (it needs a tile configuration per kernel and the kernel's permission to use the tile state, and
    no machine of this project can run it to check it bit-exact)."""
    if _foreign(target):
        return "generic"  # vectorized by LLVM for the target (NEON on AArch64); no x86 dot intrinsic
    mcpu = str(target.attrs.get("mcpu", ""))
    host = tvm.target.codegen.llvm_get_system_cpu()
    if mcpu in ("", host):
        flags = host_cpu_features()
        if {"avx512_vnni", "avx512vl"} <= flags and host.startswith(_VNNI_MCPUS):  # LLVM must know the CPU too
            return "avx512vnni"
        return "avx2" if "avx2" in flags else "generic"
    if mcpu.startswith(_VNNI_MCPUS):
        return "avx512vnni"
    return "avx2" if _mcpu_has_avx2(mcpu) else "generic"


def _mcpu_has_avx2(mcpu: str) -> bool:
    prefixes = (
        "haswell",
        "broadwell",
        "skylake",
        "cascadelake",
        "icelake",
        "tigerlake",
        "sapphirerapids",
        "alderlake",
        "znver",
        "x86-64-v3",
        "x86-64-v4",
        "cooperlake",
        "cannonlake",
        "rocketlake",
    )
    return mcpu.startswith(prefixes)


def _without_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes as initializers: TVM's importer reads only a Constant's ``value`` attribute, and folding
    leaves ``value_ints`` / ``value_float`` ones (Reshape shapes). The caller's model is not changed."""
    if not any(node.op_type == "Constant" for node in model.graph.node):
        return model
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    lifted = ir.serde.deserialize_model(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(lifted)
    return ir.serde.serialize_model(lifted)


def build(
    model: onnx.ModelProto,
    shapes: Mapping[str, list[int]],
    target: Any = "llvm",
    tune: bool = False,
    tile_cache: tuning.TileCache | None = None,
    conv_layout: str = "auto",
    metaschedule_trials: int = 0,
    progress: bool = False,
    remote: Device | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    lift_weights: bool = False,
) -> TVMModule | OpenCLModule:
    """Import, schedule and compile ``model`` (integer ONNX) for ``target`` with static input ``shapes``.
    GPU targets (``cuda``, ``opencl``) are built by :func:`qcompiler.backends.tvm.gpu.build_gpu`.

    ``tune``: search the GEMM register tile of every int8 GEMM shape on this machine (tuning.py), reusing and
    extending ``tile_cache`` (default: the on-disk cache); without it the default tiles, and no cache is read.
    ``conv_layout``: the im2col layout of group-1 convolutions, ``"NCHW"``, ``"NHWC"`` (permuted at the graph's
    NCHW boundary, the permutes between consecutive NHWC convolutions dropped) or ``"auto"``: per convolution,
    whichever measured faster for its shape (:func:`qcompiler.backends.tvm.importer.conv_layout_for`).
    ``metaschedule_trials``: above 0, a MetaSchedule search of that many trials over the kernels without a hand GEMM
    schedule, each kept only where it beats the hand schedule (metaschedule.py; minutes: off by default).
    ``progress``: one line per stage (import, schedules, code generation), a bar over the kernels scheduled.
    ``remote``: a device behind a TVM RPC tracker (remote.py): the tiles and MetaSchedule's trials are timed there,
    and the module runs there; ``target`` should then be the device's (:meth:`Device.target`).
    ``weights``: the arrays of ``model``'s external initializers (:func:`importer.import_onnx`).
    ``lift_weights``: the kernels' large constants (packed weights) become parameters of the code, held by the
    returned module (``params``), not embedded in the library: libraries that share them store them once
    (params.py). CPU only.
    """
    configure_threads()
    trials = metaschedule.validate_trials(metaschedule_trials)
    tvm_target, _ = resolve_target(target)
    model = _without_constant_nodes(model)
    static = {k: list(v) for k, v in shapes.items()}
    if tvm_target.kind.name != "llvm":
        if tune or trials or remote is not None:
            raise TargetError(
                f"target {tvm_target.kind.name}: tune, metaschedule_trials and rpc are CPU-only for now; "
                "build without them"
            )
        from qcompiler.backends.tvm.gpu import build_gpu

        return build_gpu(model, static, tvm_target, weights=weights, progress=progress)
    isa = int8_dot_isa(tvm_target)
    gemms: set[tuple[int, int, int, int]] = set()
    with warnings.catch_warnings():  # TVM warns about every initializer that is not a graph input
        warnings.simplefilter("ignore", UserWarning)
        with step("build: import to TVM Relax", progress):
            mod = importer.import_onnx(model, static, isa=isa, gemms=gemms, conv_layout=conv_layout, weights=weights)
        if tune and gemms:
            cache = tile_cache if tile_cache is not None else tuning.TileCache()
            tiles = _tuned_tiles(gemms, tvm_target, isa, cache, remote)
            mod = importer.import_onnx(model, static, isa=isa, tiles=tiles, conv_layout=conv_layout, weights=weights)
    unscheduled = metaschedule.tunable_functions(mod) if trials else {}  # our kernels, before their schedules
    with step("build: schedule and legalize", False):  # recorded only: the kernels' bar is the progress
        mod = schedules.schedule_module(mod, use_avx2=isa != "generic", progress=progress)
        with tvm_target:  # TVM's own ops legalized and fused here, so their kernels can be scheduled too
            mod = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(tvm_target) + cpu_generic.legalize_passes(tvm_target)
            )(mod)
            if trials:
                unscheduled = {**metaschedule.tunable_functions(mod), **unscheduled}
            mod = schedules.schedule_legalized(mod)
    with tvm_target:
        if trials:
            mod = metaschedule.tune_module(
                mod, unscheduled, tvm_target, trials, tracker=remote.tracker if remote is not None else None
            )
        lifted: list[np.ndarray] = []
        if lift_weights:
            mod, lifted = lift_constants(mod)
        with step(f"build: generate code ({len(mod.functions)} functions, LLVM)", progress):
            executable = tvm.compile(mod, target=tvm_target)
    names = [i.name for i in model.graph.input]
    dtypes = [onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input]
    logger.info("built %d functions for %s (int8 dot: %s)", len(mod.functions), tvm_target, isa)
    return TVMModule(executable, names, dtypes, remote, params=lifted)


def _tuned_tiles(
    gemms: set[tuple[int, int, int, int]],
    target: tvm.target.Target,
    isa: str,
    cache: tuning.TileCache,
    remote: Device | None = None,
) -> dict[tuple[int, int, int], tuning.Tile]:
    """The tile of every GEMM shape: from the cache, or searched now and cached. Shapes on the int16 pair kernel
    (AVX2 with a -128 weight) keep the default."""
    tiles = {}
    for m, n, k, kb in sorted(gemms):
        if kb != 4:
            continue
        key = tuning.gemm_key(target, isa, m, n, k, kb)
        tile = cache.get(key)
        if tile is None:
            tile, seconds = tuning.tune_gemm(m, n, k, target, isa, remote)
            cache.put(key, tile, seconds)
        tiles[(m, n, k)] = tile
    return tiles
