"""Run many generated graphs through the whole pipeline and count what happened to each.

``python -m qcompiler.testing.fuzz --count 10000`` (``make fuzz N=10000``): each graph drawn from the
strategies of :mod:`qcompiler.testing.strategies` (MLPs, CNNs, depthwise/grouped/SE CNNs with table activations,
Concat and Split, token MLPs, attention blocks, transformers) is
quantized and lowered (``quantize_to_integer``), checked op by op against its simulation (the QDQ graph with
the integer nonlinearities: :func:`~qcompiler.testing.assert_lowering_matches`, one step per element); every
``--build-every``-th one is also built with TVM and checked bit-exact against the reference interpreter.

Outcomes: ``ok``; ``refused`` (a named, user-facing error: :class:`~qcompiler.errors.UnsupportedOpError` and the
like); ``mismatch`` (the integer code is more than one step from its simulation, or TVM differs from the
reference); ``internal`` (any other exception: a bug). The run fails (exit 1) on any mismatch or internal error
and prints the seed and description of each, so that it can be replayed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from qcompiler import files
from qcompiler.errors import CalibrationError, ModelLoadError, RecipeError, UnsupportedOpError
from qcompiler.testing.strategies import (
    GeneratedModel,
    attention_models,
    cnn_models,
    mlp_models,
    modern_cnn_models,
    token_mlp_models,
    transformer_models,
)
from qcompiler.testing.zoo import compiler_site

#: errors that name what the user must change: a refusal, not a bug
USER_FACING = (UnsupportedOpError, ModelLoadError, CalibrationError, RecipeError)
CALIBRATION_BATCHES = 4


def all_models() -> st.SearchStrategy[GeneratedModel]:
    """Every graph family the strategies generate."""
    return st.one_of(
        mlp_models(), cnn_models(), modern_cnn_models(), token_mlp_models(), attention_models(), transformer_models()
    )


@dataclasses.dataclass
class Case:
    outcome: str
    description: str
    seed: int
    detail: str = ""


def check(generated: GeneratedModel, build_tvm: bool) -> Case:
    """One graph through the pipeline; never raises."""
    import onnx_ir as ir

    from qcompiler.api import quantize_to_integer
    from qcompiler.passes.lower import LowerNonlinearitiesPass
    from qcompiler.testing import assert_bit_exact, assert_lowering_matches

    case = Case("ok", generated.description, generated.seed)
    try:
        calibration = generated.inputs(CALIBRATION_BATCHES)
        qdq, integer, _, shapes = quantize_to_integer(generated.model, calibration=calibration, progress=False)
    except USER_FACING as exc:
        return dataclasses.replace(case, outcome="refused", detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return dataclasses.replace(case, outcome="internal", detail=_where(exc))
    probe = generated.inputs(2, offset=1)
    try:
        simulation = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
        LowerNonlinearitiesPass()(simulation)  # the integer nonlinearities' own simulation (I-BERT style)
        assert_lowering_matches(simulation, integer, probe)
        if build_tvm:
            from qcompiler.backends.tvm import build

            assert_bit_exact(lambda proto: build(proto, shapes), integer, probe)
    except AssertionError as exc:
        return dataclasses.replace(case, outcome="mismatch", detail=str(exc)[:500])
    except USER_FACING as exc:
        return dataclasses.replace(case, outcome="refused", detail=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        return dataclasses.replace(case, outcome="internal", detail=_where(exc))
    return case


def _where(exc: BaseException) -> str:
    site = compiler_site(exc)
    return f"{type(exc).__name__}: {str(exc)[:300]}" + (f" at {site}" if site else "")


def run(count: int, build_every: int, seed: int | None) -> list[Case]:
    """Draw ``count`` graphs (``seed``: reproducible; None: new ones every run) and check each."""
    cases: list[Case] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # no shrinking: every failure is recorded, none raised
    )
    @given(all_models())
    def draw(generated: GeneratedModel) -> None:
        result = check(generated, build_tvm=build_every > 0 and len(cases) % build_every == 0)
        cases.append(result)
        if len(cases) % 100 == 0:
            print(f"{len(cases)} graphs: {dict(collections.Counter(c.outcome for c in cases))}", flush=True)

    if seed is not None:
        draw = fixed_seed(seed)(draw)
    draw()
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.testing.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="graphs to generate (default 1000)")
    parser.add_argument("--build-every", type=int, default=20, help="TVM build every N-th graph (0: never)")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed (reproducible run); default: random")
    parser.add_argument("--out", type=Path, default=None, help="write the outcomes as JSON here")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count: must be at least 1")
    start = time.perf_counter()
    cases = run(args.count, args.build_every, args.seed)
    seconds = time.perf_counter() - start
    counts = collections.Counter(c.outcome for c in cases)
    bad = [c for c in cases if c.outcome in ("mismatch", "internal")]
    refusals = collections.Counter(c.detail.split(":")[0] + ": " + c.detail.split("(op ")[-1][:60] for c in cases
                                   if c.outcome == "refused")  # fmt: skip
    print(f"{len(cases)} graphs in {seconds:.0f} s: {dict(counts)}")
    for reason, number in refusals.most_common(10):
        print(f"  refused x{number}: {reason}")
    for c in bad[:20]:
        print(f"  {c.outcome}: {c.description} (seed {c.seed}): {c.detail}")
    if args.out is not None:
        summary: dict[str, Any] = {"count": len(cases), "seconds": seconds, "outcomes": dict(counts),
                                   "cases": [dataclasses.asdict(c) for c in cases if c.outcome != "ok"]}  # fmt: skip
        files.write_text(args.out, json.dumps(summary, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
