"""Compile time and memory by stage (issue 20): random Llamas of 4, 8, 16 and 32 layers of one width, and
SmolLM2-135M's W8A8 compile, each in a fresh process so that its peak resident memory is its own.

For each model: the float32 weight bytes, the peak resident memory of the whole compile (and its ratio to the
weights), the time and the peak after every stage (``report["stages"]``: the stage whose peak column jumps set
the peak), and for the random Llamas the compile seconds per layer (flat = linear in depth).

    .venv/bin/python benchmarks/bench_compile_scaling.py [--layers 4,8,16,32] [--hidden 256] [--no-smollm2] [--big]
        [--repeats N] [--save-as NAME]

``--repeats N`` compiles each model N times, each in its own process, and keeps the run of median compile time
(the range over runs in ``compile s range``): one run's timing moves by 10-20 % on this 2-core machine, and the
per-layer fit reads the medians.

``--big`` adds the 1.1 B-parameter check of issue 20: a random Llama of TinyLlama-1.1B's shape (hidden 2048, 22
layers, intermediate 5632, 32 heads, 4 key-value heads, vocabulary 32000; 4.4 GB of float32 weights, built from
its config) compiled W8A8 (``w8a8-llm``, 4 windows of 64 tokens) on this machine: peak memory against twice its
weights, time per stage. ``--layers ""`` skips the depth series.

Prints the tables and saves them to benchmarks/results/compile_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import print_table, save

from qcompiler import files
from qcompiler.progress import memory_mb
from qcompiler.testing.big_llama import CALIBRATION_BATCHES, CONFIG, TOKENS, random_llama

VOCAB = 2048
SUMMARY = ["model", "layers", "float MB", "peak MB", "peak / float", "before MB", "compile s", "compile s range",
           "s / layer", "s / layer beyond fixed"]  # fmt: skip


def _random_llama(layers: int, hidden: int) -> tuple[Any, list[dict[str, Any]], int]:
    shape = {
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 8 * 8,
        "num_attention_heads": max(hidden // 64, 1), "num_key_value_heads": max(hidden // 128, 1),
    }  # fmt: skip
    module, batches, _, weights = random_llama(layers, config=shape)
    return module, batches, weights


def _big_llama() -> tuple[Any, list[dict[str, Any]], int]:
    """The random 1.1 B Llama of :mod:`qcompiler.testing.big_llama` (its own calibration windows)."""
    module, batches, _, weights = random_llama(CONFIG["num_hidden_layers"])
    return module, batches, weights


def _smollm2() -> tuple[Any, list[dict[str, Any]], int]:
    from qcompiler.testing.llm import load_smollm2

    smol = load_smollm2()
    weights = sum(p.numel() * p.element_size() for p in smol.model.parameters())
    return smol.logits_module(), smol.calibration(CALIBRATION_BATCHES), weights


def _one(name: str, layers: int, hidden: int, out: Path) -> None:
    """Compile one model in this process and write its row and stages as JSON."""
    import torch

    import qcompiler

    torch.set_num_threads(2)
    builders = {"smollm2": _smollm2, "llama-1.1b": _big_llama}
    module, batches, weights = builders[name]() if name in builders else _random_llama(layers, hidden)
    before, _ = memory_mb()  # the float model, as the user holds it
    example = (torch.from_numpy(batches[0]["ids"]),)
    recipe = "w8a8-llm"
    start = time.perf_counter()
    compiled = qcompiler.compile(module, "llvm", example_inputs=example, calibration=batches, recipe=recipe,
                                 progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    report = compiled.report
    row = {
        "model": name, "layers": layers, "float MB": weights / 2**20, "peak MB": report["peak_rss_mb"],
        "peak / float": report["peak_rss_mb"] / (weights / 2**20) if report["peak_rss_mb"] else None,
        "before MB": before, "compile s": seconds, "s / layer": seconds / layers,
    }  # fmt: skip
    files.write_text(out, json.dumps({"row": row, "stages": report["stages"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,8,16,32", help="depths of the random Llamas (comma-separated)")
    parser.add_argument("--hidden", type=int, default=256, help="the random Llamas' width")
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M (its package is optional)")
    parser.add_argument("--big", action="store_true", help="also the random 1.1 B Llama (TinyLlama's shape)")
    parser.add_argument("--repeats", type=int, default=1, help="compiles per model; the median run is kept")
    parser.add_argument("--save-as", default="compile_scaling", help="results/<name>.json")
    parser.add_argument("--one", nargs=3, metavar=("NAME", "LAYERS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one[0], int(args.one[1]), args.hidden, Path(args.one[2]))
        return
    configs = [(f"llama-{args.hidden}", int(n)) for n in args.layers.split(",") if n]
    if not args.no_smollm2:
        configs.append(("smollm2", 30))
    if args.big:
        configs.append(("llama-1.1b", CONFIG["num_hidden_layers"]))
    rows, stages = [], {}
    with tempfile.TemporaryDirectory(prefix="qc_scaling_") as folder:
        for name, layers in configs:
            runs = []
            for repeat in range(max(1, args.repeats)):
                out = Path(folder) / f"{name}-{layers}-{repeat}.json"
                command = [sys.executable, __file__, "--hidden", str(args.hidden), "--one", name, str(layers), str(out)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name} x{layers} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                runs.append(json.loads(out.read_text()))
            if not runs:
                continue
            runs.sort(key=lambda r: r["row"]["compile s"])
            result = runs[len(runs) // 2]  # the median run (the upper one of an even count)
            times = [r["row"]["compile s"] for r in runs]
            result["row"]["compile s range"] = f"{times[0]:.1f}-{times[-1]:.1f}" if len(runs) > 1 else ""
            rows.append(result["row"])
            stages[f"{name}-{layers}"] = result["stages"]
            print(f"\n{name}, {layers} layers: stages")
            print_table(
                [{**s, "stage": s["stage"][:60]} for s in result["stages"]],
                ["stage", "seconds", "rss_mb", "peak_rss_mb"],
            )
    fixed = per_layer(rows)
    print()
    print_table(rows, SUMMARY)
    print(f"saved {save(args.save_as, rows, {'stages': stages, 'hidden': args.hidden, 'tokens': TOKENS, **fixed})}")


def per_layer(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit ``seconds = fixed + slope * layers`` over the random Llamas (least squares) and give each of their rows
    its seconds per layer beyond the fixed cost (imports, the build's per-kernel work): flat when compile time
    is linear in depth. Prints the fit and the spread."""
    llamas = [r for r in rows if r["model"].startswith("llama-") and r["model"] != "llama-1.1b"]
    if len(llamas) < 2:
        return {}
    layers = [r["layers"] for r in llamas]
    seconds = [r["compile s"] for r in llamas]
    mean_l, mean_s = sum(layers) / len(layers), sum(seconds) / len(seconds)
    slope = sum((x - mean_l) * (y - mean_s) for x, y in zip(layers, seconds, strict=True)) / sum(
        (x - mean_l) ** 2 for x in layers
    )
    fixed = mean_s - slope * mean_l
    for row in llamas:
        row["s / layer beyond fixed"] = (row["compile s"] - fixed) / row["layers"]
    beyond = [r["s / layer beyond fixed"] for r in llamas]
    print(f"\nrandom Llamas: compile s = {fixed:.2f} + {slope:.3f} x layers; seconds per layer beyond the fixed cost "
          f"{min(beyond):.3f}-{max(beyond):.3f} (spread {max(beyond) / min(beyond) - 1:.0%})")  # fmt: skip
    return {"fixed_s": fixed, "slope_s_per_layer": slope}


if __name__ == "__main__":
    main()
