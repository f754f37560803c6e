"""Issue 20's 1 B check: a randomly initialised Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers,
intermediate 5632, 32 heads, 4 key-value heads, vocabulary 32000: 1.1 B parameters, 4.4 GB of float32 weights),
built from its config, compiled W8A8 integer-only (``w8a8-llm``) in a fresh process so that the peak resident
memory measured is the compile's own (with the float model held, as a user holds it).

:func:`check` writes one JSON record: the weights' bytes, the compile's peak and stages (``report["stages"]``),
the compiled logits' centred cosine to float on a held-out window, and the op-by-op agreement of the integer code
with its simulation (:func:`qcompiler.testing.assert_lowering_matches`) on a model of the same width with
:data:`BLOCKS` layers (the reference interpreter over all 22 layers would take many minutes).

    python -m qcompiler.testing.big_llama OUT.json [--layers N]

``tests/models/test_big_llama.py`` and ``benchmarks/bench_compile_scaling.py --big`` run it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: TinyLlama-1.1B's shape
CONFIG: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4,
}  # fmt: skip
TOKENS = 64
CALIBRATION_BATCHES = 4
BLOCKS = 2  # layers of the op-by-op check's model
RECIPE = "w8a8-llm"


def random_llama(
    layers: int, seed: int = 0, config: Mapping[str, Any] | None = None
) -> tuple[Any, list[dict[str, np.ndarray]], dict[str, np.ndarray], int]:
    """(logits module, calibration batches, a held-out batch, float32 weight bytes) of the random Llama with
    ``layers`` layers of ``config``'s shape (transformers' ``LlamaConfig`` arguments; :data:`CONFIG`)."""
    import torch
    import transformers

    from qcompiler.testing.llm import logits_module

    shape = {**(CONFIG if config is None else config), "num_hidden_layers": layers}
    llama = transformers.LlamaConfig(**shape, max_position_embeddings=TOKENS)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama).eval()
    rng = np.random.default_rng(seed + 1)
    batches = [{"ids": rng.integers(0, llama.vocab_size, (1, TOKENS))} for _ in range(CALIBRATION_BATCHES + 1)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return logits_module(model), batches[:-1], batches[-1], weights


def check(out: Path, layers: int = CONFIG["num_hidden_layers"], blocks: int = BLOCKS) -> dict[str, Any]:
    """Compile the random Llama, run it, check a ``blocks``-layer twin op by op; write and return the record."""
    import torch

    import qcompiler
    from qcompiler.files import write_text
    from qcompiler.testing import assert_lowering_matches
    from qcompiler.testing.zoo import centred_cosine

    torch.set_num_threads(2)
    module, batches, held_out, weights = random_llama(layers)
    example = (torch.from_numpy(batches[0]["ids"]),)
    start = time.perf_counter()
    compiled = qcompiler.compile(module, "llvm", example_inputs=example, calibration=batches, recipe=RECIPE,
                                 progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    report = compiled.report
    logits = np.asarray(compiled(held_out["ids"]))
    with torch.no_grad():
        want = module(torch.from_numpy(held_out["ids"])).numpy()
    record: dict[str, Any] = {
        "layers": layers,
        "parameters": weights // 4,
        "float_mb": weights / 2**20,
        "peak_rss_mb": report["peak_rss_mb"],
        "compile_s": seconds,
        "stages": report["stages"],
        "float_ops_inside": report["float_ops_inside"],
        "cosine": centred_cosine(logits, want),
        "top1_agreement": float(np.mean(logits.argmax(-1) == want.argmax(-1))),
    }
    del compiled, module

    small, small_batches, small_held_out, _ = random_llama(blocks)
    small_example = (torch.from_numpy(small_batches[0]["ids"]),)
    captured = qcompiler.ir.load(small, small_example)
    integer = qcompiler.compile(captured.clone(), "llvm", example_inputs=small_example, calibration=small_batches,
                                recipe=RECIPE, progress=False)  # fmt: skip
    simulation = qcompiler.simulate(captured.clone(), calibration=small_batches, recipe=RECIPE,
                                    example_inputs=small_example, progress=False, nonlinearities="integer")  # fmt: skip
    rows = assert_lowering_matches(simulation, integer.integer_model, [small_held_out])
    record["op_by_op"] = {"layers": blocks, "compared_ops": len(rows), "within_one_step": True}
    write_text(out, json.dumps(record, indent=2, default=str))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--blocks", type=int, default=BLOCKS)
    args = parser.parse_args()
    check(args.out, args.layers, args.blocks)


if __name__ == "__main__":
    main()
