"""Choose one hyper-parameter of a recipe on the validation range, then report the choice where it was not made.

Issue 18's protocol (qcompiler.testing.llm): a recipe key (``migration_alpha``, ``row_exponent_refinement``,
``kv_bits``...) is tried at each of ``--values`` on SmolLM2-135M's QDQ graph in onnxruntime (the float simulation
of the integer code: the exact weights and static scales it uses), scored on the validation tokens alone; the value
with the lowest validation perplexity is the choice. The choice and the recipe's own value are then scored on the
two reported ranges, the established first 4096 tokens and the held-out text, which no decision read.

    .venv/bin/python benchmarks/choose_on_validation.py --recipe w8a8-llm --key migration_alpha \\
        --values 0.5 0.6 0.75 0.9 1.0 [--windows 8]

Prints a table and saves benchmarks/results/choose_<recipe>_<key>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_smollm2_ppl import _session
from common import print_table, save

import qcompiler
from qcompiler.config import Recipe, load_recipe
from qcompiler.testing.llm import REPORTED, SPLITS, WINDOW, ModelUnavailableError, load_smollm2, perplexity

CALIBRATION_WINDOWS = 8


def _value(text: str) -> Any:
    """A recipe value as TOML reads it (``0.75``, ``8``, ``true``, ``"gptq"``)."""
    return tomllib.loads(f"v = {text}")["v"]


def _with(recipe: Recipe, key: str, value: Any) -> Recipe:
    return dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, **{key: value}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w8a8-llm")
    parser.add_argument("--key", required=True, help="a [quantize] key of the recipe")
    parser.add_argument("--values", nargs="+", required=True, help="TOML values to try")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows per range (8 = 4096 tokens)")
    args = parser.parse_args()
    try:
        import torch

        smol = load_smollm2()
    except ModelUnavailableError as missing:
        raise SystemExit(str(missing)) from None
    base = load_recipe(args.recipe)
    if not hasattr(base.quantize, args.key):
        raise SystemExit(f"--key {args.key!r}: not a [quantize] key of {args.recipe}")
    calibration = smol.calibration(CALIBRATION_WINDOWS)
    exported = qcompiler.ir.load(smol.logits_module(), example_inputs=(torch.from_numpy(calibration[0]["ids"]),))
    serialized = ir.serde.serialize_model(exported)
    count = args.windows * WINDOW
    sessions = {}

    def score(value: Any, split: str) -> float:
        if value not in sessions:
            recipe = _with(base, args.key, value)
            model = ir.serde.deserialize_model(serialized)
            sessions[value] = _session(qcompiler.simulate(model, calibration=calibration, recipe=recipe,
                                                          progress=False), qdq=True)  # fmt: skip
        session = sessions[value]
        return perplexity(lambda ids: session.run(None, {"ids": ids})[0], smol.tokens, WINDOW, count, SPLITS[split])

    rows = []
    for text in args.values:
        start = time.perf_counter()
        value = _value(text)
        rows.append({args.key: value, "validation": round(score(value, "validation"), 3)})
        print(f"{args.key} = {value}: validation {rows[-1]['validation']:.3f} ({time.perf_counter() - start:.0f}s)",
              flush=True)  # fmt: skip
    chosen = min(rows, key=lambda row: row["validation"])[args.key]
    current = getattr(base.quantize, args.key)
    for value in [v for v in sessions if v not in (chosen, current)]:
        del sessions[value]  # a QDQ model each: only the two scored again are kept
    for value in dict.fromkeys([chosen, current]):
        row = next((r for r in rows if r[args.key] == value), None)
        if row is None:
            row = {args.key: value, "validation": round(score(value, "validation"), 3)}
            rows.append(row)
        for split in REPORTED:
            row[split] = round(score(value, split), 3)
    for row in rows:
        row["role"] = " ".join(r for r, v in (("chosen", chosen), ("recipe", current)) if row[args.key] == v)
    columns = [args.key, "role", "validation", *REPORTED]
    print_table(rows, columns)
    ranges = {name: [SPLITS[name].start, SPLITS[name].start + count] for name in ("validation", *REPORTED)}
    path = save(f"choose_{args.recipe}_{args.key}", rows, {"recipe": args.recipe, "tokens": ranges, "chosen": chosen})
    print(f"chosen on validation: {args.key} = {chosen} (the recipe has {current}); saved {path}")


if __name__ == "__main__":
    main()
