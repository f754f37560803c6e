"""The model zoo (issue 21): every family of qcompiler.testing.zoo compiled with ``qcompiler.compile``, classified
ok / low-accuracy / refused / internal-error (/ timeout), with compile time and centred cosine to float on
held-out inputs. One family per subprocess, one at a time, each under a time limit.

    .venv/bin/python benchmarks/bench_zoo.py [--families llama,bert] [--recipe w8a8] [--timeout 240]

Prints a markdown table and writes benchmarks/results/zoo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save

from qcompiler import files
from qcompiler.testing.zoo import FAMILIES, evaluate_family, family_names

COLUMNS = ["family", "outcome", "compile s", "cosine", "float under noise", "detail"]


def _one(name: str, recipe: str | None, out: Path) -> None:
    """Evaluate one family in this process and write its result as JSON."""
    start = time.perf_counter()
    result = evaluate_family(name, recipe=recipe).as_dict()
    result["total_seconds"] = time.perf_counter() - start
    files.write_text(out, json.dumps(result, default=str))


def _run(name: str, recipe: str | None, timeout: float) -> dict[str, Any]:
    """Evaluate one family in a subprocess; a crash or a timeout becomes an internal-error / timeout row."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, __file__, "--one", name, "--out", str(out)]
        if recipe is not None:
            command += ["--recipe", recipe]
        start = time.perf_counter()
        try:
            process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            return {"family": name, "outcome": "timeout", "detail": f"no result within {timeout:.0f} s",
                    "total_seconds": time.perf_counter() - start}  # fmt: skip
        if out.is_file():
            return json.loads(out.read_text())
        tail = (process.stderr or process.stdout or "").strip().splitlines()[-3:]
        return {"family": name, "outcome": "internal-error", "error_type": f"exit {process.returncode}",
                "detail": " | ".join(tail), "total_seconds": time.perf_counter() - start}  # fmt: skip


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        detail = row.get("detail") or ""
        if row.get("error_type"):
            where = f" at {row['error_site']}" if row.get("error_site") else ""
            detail = f"{row['error_type']}{where}: {detail}"
        detail = " ".join(detail.split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        cells = [
            row["family"],
            row["outcome"],
            f"{row['compile_seconds']:.1f}" if row.get("compile_seconds") is not None else "-",
            f"{row['cosine']:.4f}" if row.get("cosine") is not None else "-",
            f"{row['noise_cosine']:.4f}" if row.get("noise_cosine") is not None else "-",
            detail.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help=f"comma-separated, default all {len(FAMILIES)}")
    parser.add_argument("--recipe", help="default: qcompiler.compile's own default")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per family (default 240)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one, args.recipe, args.out)
        return
    rows = []
    for name in family_names(args.families):
        row = _run(name, args.recipe, args.timeout)
        rows.append(row)
        cosine = row.get("cosine")
        print(
            f"{name}: {row['outcome']} ({row.get('total_seconds', 0):.0f} s"
            + (f", cosine {cosine:.4f}" if cosine is not None else "")
            + ")",
            flush=True,
        )
    table = _markdown(rows)
    print(table)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    print("\n" + ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())))
    path = save("zoo", rows, {"recipe": args.recipe or "default", "counts": counts})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
