"""Decode GEMVs (M = 1) on SmolLM2-135M's shapes, hot in cache and cold from DRAM, against the machine's streaming
bandwidth (issue 16: a decode step is a GEMV on weights, memory-bound).

Every row is measured in this run, in this process, with the same threads:

- qcompiler int8: one ``qcompiler.QGemm`` (int8 weights, the requantize epilogue), weights lifted out of the
  library (as a causal LM's libraries hold them);
- qcompiler int4 g128: one ``qcompiler.QGemmInt4`` (codes packed two per byte, an int16 scale per group of 128
  input channels), the same way.

"hot": TVM's time evaluator, the weights in cache after the first call. "cold": the same with every argument
but the input flushed from the caches before each call (TVM's ``cache_flush_cpu_non_first_arg``), as a decode
step finds them (SmolLM2's 70-170 MB of weights do not fit the 32 MB L3). GB/s counts the weight bytes (codes and
scales). "of stream": cold GB/s over the machine's streaming read (numpy's sum over 1 GiB, measured in this run).
Each kernel is checked bit-exact against the reference first. Medians over ``--rounds`` rounds, ranges in
brackets.

    .venv/bin/python benchmarks/bench_gemv.py [--rounds 3]

Prints the table and saves benchmarks/results/gemv.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save, streaming_bandwidth_gb_s

from qcompiler.backends.tvm import build, int8_dot_isa, resolve_target
from qcompiler.dialect import run_reference
from qcompiler.testing.kernel_models import int4_gemm_model, single_node_model

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
#: SmolLM2-135M's projections (N x K): q and o, k and v, gate and up, down, the LM head
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
GROUP = 128


def _models(rng: np.random.Generator, n: int, k: int) -> dict[str, tuple[Any, int]]:
    """The two GEMVs of shape ``n x k`` and the weight bytes each reads."""
    epilogue = {"multiplier": np.full(n, 1 << 20, np.int32), "shift": np.full(n, 30, np.int8)}
    constants = {"w": rng.integers(-127, 128, (n, k)).astype(np.int8), "b": np.zeros(n, np.int32),
                 "m": epilogue["multiplier"], "s": epilogue["shift"]}  # fmt: skip
    int8 = single_node_model("QGemm", ["w", "b", "m", "s"], (1, k), constants)
    int4 = int4_gemm_model(rng, 1, n, k, GROUP, **epilogue)
    groups = -(-k // GROUP)
    return {"qcompiler int8": (int8, n * k), "qcompiler int4 g128": (int4, n * k // 2 + 2 * n * groups)}


def _times(module: Any, x: np.ndarray, repeat: int) -> dict[str, float]:
    args = module._arguments({"x": x})
    for _ in range(20):  # fault the weights' pages in, wake the threads
        module._loaded()[1](*args)
    out = {}
    for name, flush in (("hot", ""), ("cold", "cache_flush_cpu_non_first_arg")):
        timer = module._loaded()[0].time_evaluator("main", module.device, number=1, repeat=repeat, f_preproc=flush)
        out[name] = float(np.median(timer(*args).results))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every kernel (default 3)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    modules = {}
    for n, k in SHAPES:
        x = rng.integers(-128, 128, (1, k)).astype(np.int8)
        for impl, (model, nbytes) in _models(rng, n, k).items():
            module = build(model, {"x": [1, k]}, lift_weights=True)
            if not np.array_equal(module.run({"x": x})[0], run_reference(model, {"x": x})[0]):
                raise SystemExit(f"{impl} {n}x{k}: not bit-exact against the reference")
            modules[(n, k, impl)] = (module, x, nbytes)
    samples: dict[tuple[int, int, str], dict[str, list[float]]] = {key: {"hot": [], "cold": []} for key in modules}
    bandwidths = []
    for round_ in range(args.rounds):
        bandwidths.append(streaming_bandwidth_gb_s())
        for key, (module, x, _) in modules.items():
            for kind, seconds in _times(module, x, repeat=50).items():
                samples[key][kind].append(seconds)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    bandwidth = statistics.median(bandwidths)
    rows = []
    for (n, k, impl), (_, _, nbytes) in modules.items():
        hot, cold = (statistics.median(samples[(n, k, impl)][kind]) for kind in ("hot", "cold"))
        colds = samples[(n, k, impl)]["cold"]
        rows.append({
            "shape": f"{n}x{k}", "impl": impl, "weight KB": round(nbytes / 1e3, 1),
            "hot us": round(hot * 1e6, 1), "cold us": round(cold * 1e6, 1),
            "cold range us": f"{min(colds) * 1e6:.1f}-{max(colds) * 1e6:.1f}",
            "cold GB/s": round(nbytes / cold / 1e9, 1), "of stream": round(nbytes / cold / 1e9 / bandwidth, 2),
        })  # fmt: skip
    print_table(rows, ["shape", "impl", "weight KB", "hot us", "cold us", "cold range us", "cold GB/s", "of stream"])
    isa = int8_dot_isa(resolve_target("llvm")[0])
    print(f"streaming read: {bandwidth:.1f} GB/s (range {min(bandwidths):.1f}-{max(bandwidths):.1f}); "
          f"threads {THREADS}; int8 dot: {isa}")  # fmt: skip
    path = save("gemv", rows, {"threads": THREADS, "stream_gb_s": bandwidths, "int8_isa": isa})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
