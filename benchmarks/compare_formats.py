"""SmolLM2-135M WikiText-2 perplexity per number format (issue 18: integers against FP8, MX and NV block formats on
the same model, the INT-against-FP question), float simulation (passes/quantize/formats.py, FakeQuantizePass).

Every linear layer's weights are rounded to nearest in the format along their input axis (one scale per output
channel, or per block of 32 (MX) or 16 (NV) input rows), and its input activations in the format along their last
axis at run time (one scale per token, or per block); no clipping, so the rows differ by format alone. Embedding
lookups, norms and attention stay float. "rotate": QuaRot's rotations first (fold-norm-gains, rotate-residual,
rotate-heads, online Hadamards before the down and output projections), as in bench_smollm2_ppl.py. Perplexity on
the first 4096 WikiText-2 test tokens and on 4096 held-out tokens (qcompiler.testing.llm's ranges, 512-token
windows). Which of these compile integer-only: int8 and int4 weights, and mxint4 weights (recipe key
``quantize.weight_format``); the rest are simulations.

    .venv/bin/python benchmarks/compare_formats.py [--rows NAME ...] [--windows 8] [--merge]

Prints the table and saves benchmarks/results/formats.json after every row (``--merge``: into the rows already
there, replacing those measured again).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_smollm2_ppl import ROTATE, _copy, _perplexity, _session
from common import RESULTS, print_table, save

import qcompiler
from qcompiler.calibrate import observe
from qcompiler.config import load_recipe
from qcompiler.passes.quantize.fake import FakeQuantConfig, FakeQuantizePass
from qcompiler.pipeline import Pipeline
from qcompiler.testing.llm import REPORTED, SPLITS, WINDOW, ModelUnavailableError, load_smollm2

CALIBRATION_WINDOWS = 4
EIGHT_BIT = ("int8", "fp8_e4m3", "fp8_e5m2", "mxint8", "mxfp8_e4m3")
FOUR_BIT = ("int4", "mxint4", "mxfp4", "nvint4", "nvfp4")
#: row name -> (rotate first, weight format, activation format or None)
ROWS: dict[str, tuple[bool, str, str | None]] = {
    **{f"W8A8 {f}": (False, f, f) for f in EIGHT_BIT},
    **{f"W4A16 {f}": (False, f, None) for f in FOUR_BIT},
    **{f"W4A4 {f}": (False, f, f) for f in FOUR_BIT},
    **{f"W4A4 {f} rotate": (True, f, f) for f in FOUR_BIT},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ["float", *ROWS]
    parser.add_argument("--rows", nargs="*", default=names, choices=names, help="which rows to measure")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows scored per range (8 = 4096 tokens)")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of results/formats.json")
    args = parser.parse_args()
    import torch

    try:
        smol = load_smollm2()
    except ModelUnavailableError as missing:
        raise SystemExit(f"{missing} (make test installs everything)") from None
    calibration = smol.calibration(CALIBRATION_WINDOWS)
    exported = qcompiler.ir.load(smol.logits_module(), example_inputs=(torch.from_numpy(calibration[0]["ids"]),))
    canonical = Pipeline([spec.build() for spec in load_recipe("w8a8-llm").canonicalize]).run(exported).model
    rotated = None
    path = RESULTS / "formats.json"
    rows = json.loads(path.read_text())["rows"] if args.merge and path.exists() else []
    ranges = {split: [SPLITS[split].start, SPLITS[split].start + args.windows * WINDOW] for split in REPORTED}
    for name in args.rows:
        start = time.perf_counter()
        model = _copy(canonical)
        if name != "float":
            rotate, weight_format, activation_format = ROWS[name]
            if rotate:
                if rotated is None:

                    def calibrate(model):
                        return observe(model, calibration, progress=False)

                    passes = [spec.build() for spec in ROTATE]
                    rotated = Pipeline(passes, calibrate=calibrate).run(_copy(canonical)).model
                model = _copy(rotated)
            config = FakeQuantConfig(weight_format=weight_format, activation_format=activation_format,
                                     activation_bits=None)  # fmt: skip
            FakeQuantizePass(config)(model)
        session = _session(model, qdq=False)
        prepared = time.perf_counter() - start
        row = {"recipe": name, "prepare_s": round(prepared, 1)}
        for split in REPORTED:
            row[split] = round(_perplexity(session, smol.tokens, args.windows, split), 2)
        rows = [r for r in rows if r["recipe"] != name] + [row]
        print(f"{name}: {', '.join(f'{s} {row[s]:.2f}' for s in REPORTED)} ({prepared:.0f}s)", flush=True)
        _ratios(rows)
        save("formats", rows, {"tokens": ranges, "window": WINDOW})  # a long run keeps what it measured
        del session, model
        gc.collect()  # each row's graph and session (a rotated SmolLM2 with its quantizers: gigabytes)
    order = {name: i for i, name in enumerate(names)}
    rows.sort(key=lambda r: order.get(r["recipe"], len(order)))
    _ratios(rows)
    columns = [column for split in REPORTED for column in (split, f"{split} vs float")]
    print_table(rows, ["recipe", *columns])
    print(f"saved {save('formats', rows, {'tokens': ranges, 'window': WINDOW})}")


def _ratios(rows: list[dict]) -> None:
    floats = next((row for row in rows if row["recipe"] == "float"), None)
    for row in rows:
        for split in REPORTED:
            row[f"{split} vs float"] = round(row[split] / floats[split], 4) if floats else None


if __name__ == "__main__":
    main()
