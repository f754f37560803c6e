"""Mixed-precision W4A8 on SmolLM2-135M (issue 18): HAWQ-V3's integer program chooses each linear's weight bits
(4 or 8) within a size budget, against uniform W4A8 and a hand-made choice, by perplexity and weight bytes.

``qcompiler.api.choose_layer_bits``: every linear's output error on the calibration inputs at 4 and 8 bits,
``tr(dW^T H dW)`` (passes/quantize/mixed.py), then the 0-1 program under ``ratio`` times the all-int4 bytes. Rows,
all the recipe ``w4a8`` (rotations, GPTQ, static int8 activations) with their ``layer_weight_bits``:

- uniform: every linear int4;
- down_proj int8: the hand choice (every layer's down projection int8);
- ILP at each ``--ratios`` value.

Each row's QDQ graph (what compiles to integer-only code) runs in onnxruntime (QDQ fusion off: in float);
perplexity on the evaluation and held-out ranges (qcompiler.testing.llm, 512-token windows), calibration on 8
windows from token 8192. Weight bytes: the linears' codes and scales (``LayerCost.sizes``; the embedding and
norms are the same in every row).

    .venv/bin/python benchmarks/choose_mixed_precision.py [--ratios 1.1 1.25] [--windows 8] [--rows uniform hand ilp]

Prints the table and saves benchmarks/results/mixed_precision.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_smollm2_ppl import _perplexity, _session
from common import print_table, save

import qcompiler
from qcompiler.api import choose_layer_bits, quantize_to_integer
from qcompiler.config import load_recipe
from qcompiler.passes.quantize.mixed import as_layer_weight_bits
from qcompiler.passes.quantize.mixed import choose_layer_bits as solve
from qcompiler.testing.llm import REPORTED, load_smollm2

HAND = {"*.mlp.down_proj": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="*", type=float, default=[1.1, 1.25], help="size budgets over all-int4")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows per perplexity (default 8)")
    parser.add_argument("--rows", nargs="*", default=["uniform", "hand", "ilp"], choices=["uniform", "hand", "ilp"],
                        help="which rows to measure (default all)")  # fmt: skip
    args = parser.parse_args()
    import torch

    smol = load_smollm2()
    calibration = list(smol.calibration(8))
    example = (torch.from_numpy(calibration[0]["ids"]),)
    base = load_recipe("w4a8")

    def export():
        return qcompiler.ir.load(smol.logits_module(), example_inputs=example)

    start = time.perf_counter()
    first, costs = choose_layer_bits(export(), calibration=calibration, recipe=base, size_ratio=args.ratios[0],
                                     progress=False)  # fmt: skip
    choose_s = time.perf_counter() - start
    all4 = sum(c.sizes[4] for c in costs)
    tables: dict[str, dict[str, int]] = {}
    if "uniform" in args.rows:
        tables["uniform int4"] = {}
    if "hand" in args.rows:
        tables["down_proj int8 (hand)"] = HAND
    for ratio in args.ratios if "ilp" in args.rows else []:
        choice = solve(costs, int(ratio * all4))
        tables[f"ILP within {ratio:g}x"] = as_layer_weight_bits(choice, default=4)

    def size(table: dict[str, int]) -> int:
        return sum(c.sizes[_bits(table, c.name)] for c in costs)

    rows = []
    for name, table in tables.items():
        recipe = dataclasses.replace(base, quantize=dataclasses.replace(first.quantize, layer_weight_bits=table))
        qdq, _, _, _ = quantize_to_integer(export(), calibration=calibration, recipe=recipe, progress=False)
        session = _session(qdq, True)
        row = {"recipe": name, "int8 layers": sum(_bits(table, c.name) == 8 for c in costs),
               "weight MB": round(size(table) / 1e6, 2), "of all-int4": round(size(table) / all4, 3)}  # fmt: skip
        for split in REPORTED:
            row[f"ppl {split}"] = round(_perplexity(session, smol.tokens, args.windows, split), 3)
        rows.append(row)
        print(row, flush=True)
    print_table(rows, ["recipe", "int8 layers", "weight MB", "of all-int4", *(f"ppl {s}" for s in REPORTED)])
    path = save("mixed_precision", rows, {"ratios": args.ratios, "choose_s": choose_s, "windows": args.windows,
                                          "tables": {k: dict(v) for k, v in tables.items()}})  # fmt: skip
    print(f"saved {path}")


def _bits(table: dict[str, int], name: str) -> int:
    return next((b for p, b in table.items() if fnmatch.fnmatchcase(name, p)), 4)


if __name__ == "__main__":
    main()
