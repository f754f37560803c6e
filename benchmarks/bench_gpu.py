"""The GPU backend on a device: every kernel bit-exact, int8 GEMMs and whole models timed against torch (issue 17).

One command for the day a machine with an NVIDIA GPU is lent (the `device` tool; budget about 8 minutes on an
H200, the builds included). Every row is measured in this run, in this process:

1. Bit-exact: each kernel of ``qcompiler.testing.kernel_models.kernel_cases`` (QGemm with -128 weights and
   int16 outputs, QConv, QGemmInt4 with -8 codes, the online Hadamard, Requantize / RescaleAdd / QuantizeLinear
   at rounding ties, every activation at each extreme) built for the target and compared with the reference interpreter.
2. int8 GEMM (CUDA only): one ``QGemm`` (int8 x int8 -> int32, bias, requantize to int8) of M x 4096 x 4096
   for M = 1, 16, 128, 4096, built for the device's arch, against ``torch._int_mm`` (cuBLASLt int8 -> int32,
   no epilogue) and torch fp16 ``x @ W^T``: TOPS = 2 M N K / median seconds, and our share of cuBLASLt's.
3. Models (CUDA only): MNIST and all-MiniLM-L6-v2 compiled with ``qcompiler.compile(..., target="cuda")``
   against the float model in torch fp16 on the same GPU, as ratios. SmolLM2's prefill is left out until its
   kernels have GPU schedules of their own (DLight's fallback schedules its attention products one thread per
   output). Decode needs the KV cache of issue 16.

Without a GPU, ``--target opencl`` runs part 1 through pyopencl (PoCL or Oclgrind on the CPU): the build and
the bit-exact check, as far as this machine goes.

    .venv/bin/python benchmarks/bench_gpu.py [--target cuda|opencl] [--quick]

Prints the tables and saves benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save

from qcompiler.backends.tvm import build
from qcompiler.dialect import run_reference
from qcompiler.testing.kernel_models import kernel_cases, single_node_model

GEMM_M = (1, 16, 128, 4096)
GEMM_NK = 4096


def bit_exact_rows(target: str) -> list[dict[str, Any]]:
    rows = []
    for case in kernel_cases():
        start = time.perf_counter()
        module = build(case.model, case.shapes, target)
        built = time.perf_counter() - start
        mismatches = 0
        for feeds in case.feeds:
            for want, got in zip(run_reference(case.model, feeds), module.run(feeds), strict=True):
                mismatches += int(np.count_nonzero(np.asarray(want) != np.asarray(got)))
        rows.append({"kernel": case.name, "build_s": built, "mismatches": mismatches, "bit_exact": mismatches == 0})
    return rows


def _cuda_seconds(fn: Any, torch: Any, repeats: int = 20) -> float:
    """Median seconds of ``fn`` on the GPU (CUDA events), after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return float(np.median(samples))


def gemm_rows(target: str, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    import torch

    rows = []
    rng = np.random.default_rng(0)
    n = k = GEMM_NK
    weight = rng.integers(-127, 128, (n, k)).astype(np.int8)
    epilogue = {
        "b": rng.integers(-5000, 5000, n).astype(np.int32),
        "m": rng.integers(1 << 30, 1 << 31, n).astype(np.int32),
        "s": np.full(n, 44, np.int32),
    }
    for m in sizes:
        model = single_node_model("QGemm", ["w", "b", "m", "s"], (m, k), {"w": weight, **epilogue})
        start = time.perf_counter()
        module = build(model, {"x": [m, k]}, target)
        built = time.perf_counter() - start
        x = rng.integers(-128, 128, (m, k)).astype(np.int8)
        exact = bool(np.array_equal(module.run({"x": x})[0], run_reference(model, {"x": x})[0]))
        ours = module.time({"x": x}, number=10, repeat=5)
        a = torch.from_numpy(x).cuda()
        b = torch.from_numpy(weight).cuda().t()
        # torch._int_mm needs M > 16 (cuBLASLt's int8 path); pad the smaller M as a serving stack would
        padded = torch.nn.functional.pad(a, (0, 0, 0, max(0, 32 - m))) if m <= 16 else a
        cublas = _cuda_seconds(lambda padded=padded, b=b: torch._int_mm(padded, b), torch)
        half_a, half_b = a.half(), b.half()
        fp16 = _cuda_seconds(lambda half_a=half_a, half_b=half_b: half_a @ half_b, torch)
        flops = 2 * m * n * k
        rows.append({
            "shape": f"{m}x{n}x{k}", "build_s": built, "bit_exact": exact,
            "ours_tops": flops / ours / 1e12, "cublaslt_int8_tops": flops / cublas / 1e12,
            "torch_fp16_tops": flops / fp16 / 1e12, "ours_vs_cublaslt": cublas / ours, "ours_vs_fp16": fp16 / ours,
        })  # fmt: skip
    return rows


def model_rows(target: str) -> list[dict[str, Any]]:
    import torch

    import qcompiler
    from qcompiler.testing.data import digits_28x28, mnist_model_path

    rows = []
    images, _ = digits_28x28()
    calibration = [images[i : i + 1] for i in range(8)]
    start = time.perf_counter()
    compiled = qcompiler.compile(str(mnist_model_path()), target=target, calibration=calibration, progress=False)
    cpu = qcompiler.compile(str(mnist_model_path()), target="llvm", calibration=calibration, progress=False)
    exact = all(np.array_equal(compiled(images[i : i + 1]), cpu(images[i : i + 1])) for i in range(8, 24))
    ours = compiled.module.time({compiled.input_names[0]: images[:1]})
    rows.append({"model": "MNIST CNN", "compile_s": time.perf_counter() - start, "equals_cpu_build": exact,
                 "ours_ms": ours * 1e3, "torch_fp16_ms": None, "speedup_vs_fp16": None})  # fmt: skip
    try:
        from qcompiler.testing.encoders import CALIBRATION_OFFSET, load_minilm
    except ImportError:
        return rows
    minilm = load_minilm()
    batch = minilm.batches(0, 1)[0]
    calibration = minilm.batches(CALIBRATION_OFFSET, 32)
    example = (torch.from_numpy(batch["ids"]), torch.from_numpy(batch["mask"]))
    float_model = qcompiler.ir.load(minilm.encoder_module(), example_inputs=example)
    start = time.perf_counter()
    compiled = qcompiler.compile(float_model, target=target, calibration=calibration, progress=False)
    cpu = qcompiler.compile(float_model, target="llvm", calibration=calibration, progress=False)
    feeds = dict(zip(compiled.input_names, (batch["ids"], batch["mask"]), strict=True))
    exact = all(np.array_equal(a, b) for a, b in zip(compiled.module.run(feeds), cpu.module.run(feeds), strict=True))
    ours = compiled.module.time(feeds)
    encoder = minilm.encoder_module().half().cuda().eval()
    ids, mask = (torch.from_numpy(v).cuda() for v in (batch["ids"], batch["mask"]))
    with torch.no_grad():
        fp16 = _cuda_seconds(lambda: encoder(ids, mask), torch)
    rows.append({"model": f"all-MiniLM-L6-v2 {tuple(batch['ids'].shape)}", "compile_s": time.perf_counter() - start,
                 "equals_cpu_build": exact, "ours_ms": ours * 1e3, "torch_fp16_ms": fp16 * 1e3,
                 "speedup_vs_fp16": fp16 / ours})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="cuda (default where a GPU is) or opencl")
    parser.add_argument("--quick", action="store_true", help="GEMMs at M = 1 and 128 only")
    args = parser.parse_args()
    from qcompiler.backends.tvm.gpu import local_cuda_arch

    target = args.target or ("cuda" if local_cuda_arch() else "opencl")
    results: dict[str, Any] = {"target": target, "arch": local_cuda_arch()}
    print(f"# bit-exact kernels ({target})")
    kernels = bit_exact_rows(target)
    print_table(kernels, ["kernel", "build_s", "mismatches", "bit_exact"])
    results["kernels_all_bit_exact"] = all(r["bit_exact"] for r in kernels)
    rows: list[dict[str, Any]] = [{"part": "kernel", **r} for r in kernels]
    if target == "cuda":
        print("\n# int8 GEMM, QGemm with its requantize epilogue, against cuBLASLt int8 and torch fp16")
        gemms = gemm_rows(target, (1, 128) if args.quick else GEMM_M)
        print_table(gemms, ["shape", "bit_exact", "ours_tops", "cublaslt_int8_tops", "torch_fp16_tops",
                            "ours_vs_cublaslt", "ours_vs_fp16"])  # fmt: skip
        print("\n# whole models against torch fp16 on the same GPU")
        models = model_rows(target)
        print_table(models, ["model", "compile_s", "equals_cpu_build", "ours_ms", "torch_fp16_ms", "speedup_vs_fp16"])
        rows += [{"part": "gemm", **r} for r in gemms] + [{"part": "model", **r} for r in models]
    print(f"\nsaved {save('gpu', rows, results)}")


if __name__ == "__main__":
    main()
