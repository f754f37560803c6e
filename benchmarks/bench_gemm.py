"""int8 GEMM throughput: qcompiler's QGemm kernel against float32 and onnxruntime's integer GEMMs (issue 5).

Shapes M x N x K from issue 5. Every row is measured in this run, in this process, with the same threads:

- qcompiler int8: one ``qcompiler.QGemm`` (int8 x int8 -> int32, bias, requantize to int8), built by the TVM
  backend for this CPU (512-bit vpdpbusd on u8-offset activations where the CPU has AVX-512 VNNI, else the AVX2
  psign kernel); timed with TVM's
  time evaluator; checked bit-exact against the reference.
- qcompiler int8 tuned: the same after the register-tile search (``tune=True``, from an empty cache; the tile
  chosen is in the name, rows x zmm/ymm registers per row).
- qcompiler int4 g128: one ``qcompiler.QGemmInt4`` (int4 codes packed two per byte, an integer scale per group of
  128 input channels); each thread expands its column panel (codes times group scales, int16) in cache just
  before the row tiles that read it, then runs the int16-pair dot; checked bit-exact against the reference.
- torch float32 ``x @ W^T`` and numpy float32 ``x @ W`` (same shapes).
- onnxruntime ``MatMulInteger``: s8 x s8 and u8 x s8. On AVX2 without VNNI the u8 x s8 kernel saturates the
  int16 pair sums of vpmaddubsw (max error 19233 at K=16); with AVX-512 VNNI it is exact. The ``bit_exact``
  column says which holds on this machine (probed with the saturating case: u8 255 against s8 127).

GOPS = 2 M N K / median seconds. The int8 peak is 128 ops per cycle per core (two 256-bit int8 dot instructions
of 32 multiply-adds each, or one 512-bit vpdpbusd: the same on cores that split zmm work into two 256-bit halves,
as Zen 4 does) at the nominal clock /proc/cpuinfo reports; boost clocks run above it, so a fraction above 1 says
the core ran faster than nominal, not that the count is wrong.

    .venv/bin/python benchmarks/bench_gemm.py [--quick]

Prints the table and saves benchmarks/results/gemm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, print_table, save

from qcompiler.backends.tvm import build, int8_dot_isa, resolve_target, tuning
from qcompiler.backends.tvm.build import host_cpu_features
from qcompiler.dialect import run_reference
from qcompiler.testing.kernel_models import int4_gemm_model, single_node_model

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (512, 512, 512)]


def clock_ghz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except OSError:
        return None
    return None


def _ort_matmul_integer(a_dtype: int, k: int, n: int, w: np.ndarray) -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "mmi",
        [helper.make_tensor_value_info("a", a_dtype, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ort_u8s8_exact(k: int) -> bool:
    """u8 x s8 MatMulInteger at its saturating extreme (255 against 127: pair sums of 64770 > int16)."""
    session = _ort_matmul_integer(TensorProto.UINT8, k, 8, np.full((k, 8), 127, np.int8))
    got = session.run(None, {"a": np.full((2, k), 255, np.uint8)})[0]
    return bool(np.all(got == 255 * 127 * k))


def _int4_model(rng: np.random.Generator, m: int, n: int, k: int, group: int = 128):
    """A QGemmInt4 of int4 codes in [-7, 7] (what the weight quantizer writes), group scales in [1, 256]."""
    epilogue = {"multiplier": np.full(n, 1 << 30, np.int32), "shift": np.full(n, 50, np.int32)}
    return int4_gemm_model(rng, m, n, k, group, **epilogue)


def measure(m: int, n: int, k: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(m + n + k)
    w_nk = rng.integers(-127, 128, (n, k)).astype(np.int8)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    inits = {
        "w": w_nk,
        "b": rng.integers(-1000, 1000, n).astype(np.int32),
        "m": np.full(n, 1 << 30, np.int32),
        "s": np.full(n, 45, np.int32),
    }
    model = single_node_model("QGemm", ["w", "b", "m", "s"], (m, k), inits)
    module = build(model, {"x": [m, k]})
    exact = bool(np.array_equal(module.run({"x": x})[0], run_reference(model, {"x": x})[0]))
    ops = 2.0 * m * n * k
    times = {"qcompiler int8": module.time({"x": x}, number=max(1, repeats // 3), repeat=repeats)}
    with tempfile.TemporaryDirectory() as folder:  # the tile search, from an empty cache
        cache = tuning.TileCache(folder)
        tuned = build(model, {"x": [m, k]}, tune=True, tile_cache=cache)
        (entry,) = json.loads(cache.path.read_text()).values()
    tile = f"{entry['mr']}x{entry['nr']}"
    times[f"qcompiler int8 tuned ({tile})"] = tuned.time({"x": x}, number=max(1, repeats // 3), repeat=repeats)
    tuned_exact = bool(np.array_equal(tuned.run({"x": x})[0], run_reference(model, {"x": x})[0]))

    int4 = _int4_model(rng, m, n, k)
    int4_module = build(int4, {"x": [m, k]})
    times["qcompiler int4 g128"] = int4_module.time({"x": x}, number=max(1, repeats // 3), repeat=repeats)
    int4_exact = bool(np.array_equal(int4_module.run({"x": x})[0], run_reference(int4, {"x": x})[0]))

    xf, wf = x.astype(np.float32), np.ascontiguousarray(w_nk.T.astype(np.float32))
    xt, wt = torch.from_numpy(xf), torch.from_numpy(w_nk.astype(np.float32))
    with torch.no_grad():
        times["torch f32"] = median_seconds(lambda: xt @ wt.T, warmup=3, repeats=repeats, inner=3)
    times["numpy f32"] = median_seconds(lambda: xf @ wf, warmup=3, repeats=repeats, inner=3)
    w_kn = np.ascontiguousarray(w_nk.T)
    s8 = _ort_matmul_integer(TensorProto.INT8, k, n, w_kn)
    times["ORT s8s8"] = median_seconds(lambda: s8.run(None, {"a": x}), warmup=3, repeats=repeats, inner=3)
    u8 = _ort_matmul_integer(TensorProto.UINT8, k, n, w_kn)
    xu = (x.astype(np.int16) + 128).astype(np.uint8)
    times["ORT u8s8"] = median_seconds(lambda: u8.run(None, {"a": xu}), warmup=3, repeats=repeats, inner=3)
    exactness = {
        "qcompiler int8": exact,
        f"qcompiler int8 tuned ({tile})": tuned_exact,
        "qcompiler int4 g128": int4_exact,
        "ORT s8s8": bool(np.array_equal(s8.run(None, {"a": x})[0], x.astype(np.int64) @ w_kn.astype(np.int64))),
        "ORT u8s8": _ort_u8s8_exact(k),
    }

    ghz = clock_ghz()
    peak = 128.0 * ghz * 1e9 * THREADS if ghz else None
    ours = times["qcompiler int8"]
    rows = []
    for name, seconds in times.items():
        gops = ops / seconds / 1e9
        rows.append(
            {
                "shape": f"{m}x{n}x{k}",
                "impl": name,
                "ms": round(seconds * 1e3, 4),
                "GOPS": round(gops, 1),
                "qcompiler_speedup": round(seconds / ours, 2),
                "of_int8_peak": round(ops / seconds / peak, 3) if peak and name.startswith("qcompiler") else None,
                "bit_exact": exactness.get(name),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    repeats = 5 if args.quick else 15
    rows = []
    for m, n, k in SHAPES:
        rows += measure(m, n, k, repeats)
        print(f"{m}x{n}x{k} done", flush=True)
    print_table(rows, ["shape", "impl", "ms", "GOPS", "qcompiler_speedup", "of_int8_peak", "bit_exact"])
    features = sorted(host_cpu_features() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni"})
    isa = int8_dot_isa(resolve_target("llvm")[0])
    print(f"qcompiler int8 dot instruction: {isa}; CPU features: {features}")
    path = save("gemm", rows, {"threads": THREADS, "clock_ghz": clock_ghz(), "cpu_features": features, "int8_isa": isa})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
