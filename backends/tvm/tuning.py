"""A small search over the GEMM register tile per shape and target, cached on disk.

The packed GEMM kernel (kernels.py, schedules.py) computes an ``mr x (nr * lanes)`` tile of int32 accumulators
while it streams K. The default tile (4 x 4 zmm registers with VNNI, 2 x 4 ymm with AVX2) is good for large
shapes; small or odd ones (M = 1 decode rows, N = 192 projections) often prefer another. :func:`tune_gemm` builds
the kernel alone for each candidate tile that fits the register file and divides the shape, times it with TVM's
time evaluator, and keeps the fastest. :class:`TileCache` stores the winners as JSON, keyed by target, int8 dot
instruction set and shape (M x N x K and the reduction block), so a second build with ``tune=True`` costs
nothing; a build without ``tune`` never reads it (builds stay reproducible).

The cache file is ``$QCOMPILER_CACHE_DIR/gemm_tiles.json`` (default ``~/.cache/qcompiler``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from qcompiler.backends.tvm import kernels, schedules
from qcompiler.backends.tvm.remote import Device

logger = logging.getLogger(__name__)

CACHE_FILE = "gemm_tiles.json"
#: accumulator registers a tile may hold: 32 zmm (VNNI) or 16 ymm (AVX2), less room for the operands
REGISTER_BUDGET = {"avx512vnni": 24, "avx2": 12, "generic": 12}
_CANDIDATES = {
    "avx512vnni": [(4, 4), (2, 4), (1, 4), (4, 2), (8, 2), (6, 4), (4, 6), (2, 8), (1, 8), (3, 8)],
    "avx2": [(2, 4), (1, 4), (2, 2), (4, 2), (3, 4), (2, 6), (1, 8)],
}


@dataclasses.dataclass(frozen=True)
class Tile:
    """Rows and accumulator registers per row of the GEMM register tile."""

    mr: int
    nr: int


def default_cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILER_CACHE_DIR") or Path.home() / ".cache" / "qcompiler")


def gemm_key(target: tvm.target.Target, isa: str, m: int, n: int, k: int, kb: int) -> str:
    """Cache key: the target (kind, CPU, cores), the int8 dot instruction set, the shape and reduction block."""
    attrs = target.attrs
    cpu = f"{target.kind.name}:{attrs.get('mcpu', '')}:{attrs.get('num-cores', '')}"
    return f"{cpu}|{isa}|gemm|{m}x{n}x{k}|kb{kb}"


class TileCache:
    """The tuned tiles on disk (JSON); written atomically after every new entry."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.path = Path(directory or default_cache_dir()) / CACHE_FILE
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                logger.warning("ignoring the unreadable tile cache %s (%s)", self.path, error)

    def get(self, key: str) -> Tile | None:
        entry = self._entries.get(key)
        return Tile(int(entry["mr"]), int(entry["nr"])) if entry else None

    def put(self, key: str, tile: Tile, seconds: float) -> None:
        self._entries[key] = {"mr": tile.mr, "nr": tile.nr, "us": round(seconds * 1e6, 2)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(self._entries, handle, indent=1, sort_keys=True)
        os.replace(handle.name, self.path)

    def __len__(self) -> int:
        return len(self._entries)


def candidates(isa: str, m: int, n: int, lanes: int) -> list[Tile]:
    """Tiles that fit the register budget, whose rows divide M, with no more registers per row than N needs."""
    budget = REGISTER_BUDGET.get(isa, 12)
    registers = -(-n // lanes)
    tiles = []
    for mr, nr in _CANDIDATES.get(isa, _CANDIDATES["avx2"]):
        if mr * nr <= budget and m % mr == 0 and nr <= registers:
            tiles.append(Tile(mr, nr))
    fallback = Tile(1, min(registers, 4))
    return tiles or [fallback]


def _gemm_kernel(m: int, n: int, k: int, tile: Tile, target: tvm.target.Target, isa: str, remote: Device | None):
    """The packed QGemm kernel alone with ``tile``, compiled and loaded (on ``remote`` if given), its time evaluator
    and random operands for it on that device."""
    weight = np.random.default_rng(0).integers(-127, 128, (n, k)).astype(np.int8)
    plan = kernels.plan_gemm(weight, np.full(n, 40), isa=isa, nr=tile.nr)
    a = te.placeholder((m, k), "int8", name="a")
    packed = te.placeholder(kernels.pack_weight(weight, plan).shape, "int8", name="packed")
    channels = [te.placeholder((plan.n_padded,), "int32", name=name) for name in ("bias", "mult", "shift")]
    out = kernels.qgemm_compute(a, packed, *channels, plan=plan, zero_point=0, lo=-128, hi=127)
    sch = Schedule(te.create_prim_func([a, packed, *channels, out]))
    schedules.schedule_gemm(sch, plan.kb, plan.nr, isa != "generic", lanes=plan.lanes, mr=tile.mr)
    with target:
        executable = tvm.compile(sch.mod, target=target)
    library = remote.load(executable) if remote is not None else executable.jit()
    device = remote.tvm_device if remote is not None else tvm.cpu()
    arrays = [
        tvm.runtime.tensor(np.random.default_rng(1).integers(-128, 128, (m, k)).astype(np.int8), device),
        tvm.runtime.tensor(kernels.pack_weight(weight, plan), device),
        tvm.runtime.tensor(np.zeros(plan.n_padded, np.int32), device),
        tvm.runtime.tensor(np.full(plan.n_padded, 1 << 30, np.int32), device),
        tvm.runtime.tensor(np.full(plan.n_padded, 40, np.int32), device),
        tvm.runtime.tensor(np.zeros((m, n), np.int8), device),
    ]
    return library.time_evaluator("main", device, number=1, repeat=5, min_repeat_ms=5), arrays


#: rounds over the candidates (interleaved, so a burst of load on a shared machine hits all of them alike)
ROUNDS = 3
#: a tile other than the default must beat it by this factor to be chosen (noise is not a speedup)
MARGIN = 0.95


def default_tile(isa: str, m: int, n: int) -> Tile:
    """The tile the kernel uses untuned (kernels.plan_gemm, schedules.schedule_gemm)."""
    lanes = kernels.ZMM_LANES if isa == "avx512vnni" else kernels.LANES
    return Tile(schedules.default_mr(m, lanes), kernels.default_nr(n, lanes))


def tune_gemm(
    m: int, n: int, k: int, target: tvm.target.Target, isa: str, remote: Device | None = None
) -> tuple[Tile, float]:
    """The fastest candidate tile for this shape on this machine (or on ``remote``, through its RPC session) and
    its time: the minimum over interleaved rounds of repeated runs (noise only ever adds time); the default tile
    unless another beats it by 5 %."""
    lanes = kernels.ZMM_LANES if isa == "avx512vnni" else kernels.LANES
    default = default_tile(isa, m, n)
    tiles = list(dict.fromkeys([default, *candidates(isa, m, n, lanes)]))
    runners = {tile: _gemm_kernel(m, n, k, tile, target, isa, remote) for tile in tiles}
    best_seen = dict.fromkeys(tiles, float("inf"))
    for _ in range(ROUNDS):
        for tile, (timer, arrays) in runners.items():
            best_seen[tile] = min(best_seen[tile], min(timer(*arrays).results))
    best = min(best_seen, key=lambda tile: best_seen[tile])
    if best_seen[best] > MARGIN * best_seen[default]:
        best = default
    report = ", ".join(f"{t.mr}x{t.nr}: {s * 1e6:.0f}us" for t, s in best_seen.items())
    where = f"rpc:{remote.tracker}" if remote is not None else "here"
    logger.info("tuned %dx%dx%d %s: %s (%s)", m, n, k, where, best, report)
    return best, best_seen[best]
