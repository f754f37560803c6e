"""MetaSchedule (TVM's search over schedules) as a build option, for the kernels without a hand GEMM schedule.

Off by default: on this project's 2-core machines it costs minutes and rarely wins (docs/results.md: 32 trials on
attention's Q K^T product took 509 s and found a 2.9 ms kernel where the hand schedule takes 2.3 ms). For users who
can tune longer, ``build(..., metaschedule_trials=N)`` gives MetaSchedule a budget of ``N`` trials (measured
candidate schedules, shared among the functions by its task scheduler) over:

- our tagged kernels other than the GEMMs (requantize, residual adds, softmax, norms, GELU/SiLU, the int32-lane
  batched products, grouped convolutions, layout transposes), each from its unscheduled TE form;
- TVM's own legalized kernels (casts, pooling, RoPE's products), from their unscheduled form.

Never tuned: the GEMM kernels (``qcompiler.kernel = "gemm"``: QGemm, QGemmInt4, both convolution im2col GEMMs,
attention's VNNI products). Their hand schedule tensorizes our int8 dot intrinsics (vpdpbusd, vpmaddubsw);
MetaSchedule's one int8 rule tensorizes TVM's ``dot_16x4_vnni``, which fails LLVM 22's verification, and its
int32-lane schedules are slower (TVM_NOTES.md: 46-67 GOPS against the hand kernel's 100-850). Nor are TVM kernels
fused around one of ours (they already carry a schedule), nor reshapes (TVM makes them views).

A tuned schedule replaces the hand one only where it measured at least 5 % faster, both timed in the same batch
by MetaSchedule's own builder and runner (a separate process: a kernel that faults on random inputs cannot take
the build down); where tuning found nothing, failed, or lost, the hand schedule stays. The records go to a JSON
database in ``$QCOMPILER_CACHE_DIR/metaschedule`` (default ``~/.cache/qcompiler``), which accumulates across
builds: the search of a later build starts from the best schedules found before.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from qcompiler.backends.tvm import schedules, tuning
from qcompiler.backends.tvm.remote import Tracker

logger = logging.getLogger(__name__)

WORK_DIR = "metaschedule"
#: a tuned schedule must beat the hand one by this factor to replace it (noise is not a speedup)
MARGIN = 0.95
#: rounds of the final hand-against-tuned comparison (interleaved, so load on a shared machine hits both alike)
ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A function MetaSchedule may reschedule: its unscheduled form (the search starts there) and the hand-scheduled
    one the build would otherwise use."""

    name: str
    unscheduled: tirx.PrimFunc
    hand: tirx.PrimFunc


def validate_trials(trials: object) -> int:
    """``trials`` as a count, or ValueError naming ``metaschedule_trials``."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(
            f"metaschedule_trials: expected a whole number of trials >= 0 (0 = off), got {trials!r}; "
            "a few hundred trials take tens of minutes on 2 cores"
        )
    return trials


def tunable_functions(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    """The PrimFuncs of ``mod`` MetaSchedule may start from, by name: no GEMM kernel, nothing scheduled yet, and
    no reshape (TVM turns those into views of their input; tuning them would spend trials on nothing)."""
    found = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if _is_gemm(func):
            continue
        if not _carries_a_schedule(func) and not relax.analysis.has_reshape_pattern(func):
            found[gvar.name_hint] = func
    return found


def _is_gemm(func: tirx.PrimFunc) -> bool:
    """A kernel the hand GEMM schedule tensorizes (never handed to MetaSchedule)."""
    attrs = func.attrs if func.attrs is not None else {}
    return schedules.KERNEL_ATTR in attrs and str(attrs[schedules.KERNEL_ATTR]) == "gemm"


def _carries_a_schedule(func: tirx.PrimFunc) -> bool:
    """Whether any block sits under a parallel, vectorized or unrolled loop (or the function has no root block
    to inspect): a hand schedule, alone or fused into a TVM kernel."""
    try:
        sch = Schedule(tvm.IRModule({"main": func}))
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except (RuntimeError, ValueError):  # what TVM raises (ScheduleError is a RuntimeError)
        return True
    return any(int(sch.get(loop).kind) != 0 for block in blocks for loop in sch.get_loops(block))


def candidates(unscheduled: Mapping[str, tirx.PrimFunc], scheduled: tvm.IRModule) -> list[Candidate]:
    """The functions of the final ``scheduled`` module that have an unscheduled form in ``unscheduled`` (same name,
    same parameters: scheduling never changes a signature) and are not GEMM kernels."""
    found = []
    for gvar, func in scheduled.functions.items():
        start = unscheduled.get(gvar.name_hint)
        if not isinstance(func, tirx.PrimFunc) or start is None or len(start.params) != len(func.params):
            continue
        if _is_gemm(func):
            continue
        found.append(Candidate(gvar.name_hint, start, func))
    return sorted(found, key=lambda c: c.name)


def default_work_dir() -> Path:
    return tuning.default_cache_dir() / WORK_DIR


def tune_module(
    scheduled: tvm.IRModule,
    unscheduled: Mapping[str, tirx.PrimFunc],
    target: tvm.target.Target,
    trials: int,
    work_dir: str | Path | None = None,
    tracker: Tracker | None = None,
) -> tvm.IRModule:
    """``scheduled`` with every candidate function (:func:`candidates`) MetaSchedule found a clearly faster schedule
    for replaced by it, after a search of ``trials`` trials in all; the others keep their hand schedule."""
    chosen = candidates(unscheduled, scheduled)
    if trials == 0 or not chosen:
        logger.info("metaschedule: nothing to tune (%d trials, %d candidate functions)", trials, len(chosen))
        return scheduled
    folder = Path(work_dir) if work_dir is not None else default_work_dir()
    folder.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(folder))
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"  # xgboost is not a dependency
    logger.info("metaschedule: %d trials over %s (cost model %s)", trials, [c.name for c in chosen], cost_model)
    try:
        ms.tune_tir(
            tvm.IRModule({c.name: c.unscheduled for c in chosen}),
            target,
            str(folder),
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 64),
            builder=_builder(),
            runner=_runner(tracker),
            database=database,
            cost_model=cost_model,
            num_tuning_cores="physical",
        )
    except (RuntimeError, ValueError) as error:  # a failed search leaves the hand schedules: the build works
        logger.warning("metaschedule: tuning failed (%s); keeping the hand schedules", error)
        return scheduled
    replacements = _faster_than_hand(chosen, database, target, tracker)
    for gvar in list(scheduled.functions.keys()):
        if gvar.name_hint in replacements:
            scheduled[gvar] = replacements[gvar.name_hint]
    return scheduled


def _faster_than_hand(
    chosen: list[Candidate], database: ms.Database, target: tvm.target.Target, tracker: Tracker | None = None
) -> dict[str, tirx.PrimFunc]:
    """The best tuned schedule of each candidate that beat its hand schedule by the margin, carrying the hand
    function's attributes (our kernel tags, the operator pattern) and no global symbol of its own."""
    tuned: list[tuple[Candidate, tirx.PrimFunc]] = []
    for candidate in chosen:
        schedule = ms.tir_integration.compile_tir(database, candidate.unscheduled, target)
        if schedule is not None:
            func = schedule.mod["main"].without_attr("global_symbol")
            attrs = dict(candidate.hand.attrs) if candidate.hand.attrs is not None else {}
            tuned.append((candidate, func.with_attrs(attrs) if attrs else func))
    if not tuned:
        logger.info("metaschedule: no valid schedule found; keeping the hand schedules")
        return {}
    seconds = measure([f for candidate, func in tuned for f in (candidate.hand, func)], target, tracker)
    winners = {}
    for (candidate, func), hand_s, tuned_s in zip(tuned, seconds[0::2], seconds[1::2], strict=True):
        better = math.isfinite(hand_s) and tuned_s < MARGIN * hand_s  # a hand kernel that did not run: keep it
        choice = "takes the tuned schedule" if better else "keeps the hand schedule"
        logger.info(
            "metaschedule: %s %s (hand %.1f us, tuned %.1f us)", candidate.name, choice, hand_s * 1e6, tuned_s * 1e6
        )
        if better:
            winners[candidate.name] = func
    return winners


def _builder() -> ms.builder.Builder:
    """MetaSchedule's local builder with its default build function less the ``import tvm.s_tir.tensor_intrin``
    it starts with: registering every tensor intrinsic TVM ships (CUDA's included) takes 30-45 s per build worker
    on these machines, past the builder's 30 s timeout, so every trial failed. The functions tuned here tensorize
    nothing. Defined inside so cloudpickle sends it by value: a worker that had to import this module would
    import qcompiler too (10 s per batch of trials)."""

    def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, params: object = None) -> object:
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return ms.builder.LocalBuilder(f_build=build_candidate)


def _runner(tracker: Tracker | None) -> ms.runner.Runner:
    """MetaSchedule's runner: local, or its RPC runner on the tracker's device (remote.py)."""
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=5, min_repeat_ms=20)
    if tracker is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator)
    config = ms.runner.RPCConfig(
        tracker_host=tracker.host, tracker_port=tracker.port, tracker_key=tracker.key, session_timeout_sec=120
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator)


def measure(funcs: list[tirx.PrimFunc], target: tvm.target.Target, tracker: Tracker | None = None) -> list[float]:
    """Seconds per call of each function (``inf`` where it failed to build or run), by MetaSchedule's builder and
    runner (on the tracker's device if given) on random arguments: the minimum over interleaved rounds."""
    modules = [tvm.IRModule({"main": f.with_attr("global_symbol", "main")}) for f in funcs]
    builds = _builder().build([ms.builder.BuilderInput(m, target) for m in modules])
    runner = _runner(tracker)
    inputs = []
    for func, built in zip(funcs, builds, strict=True):
        if built.error_msg is None:
            args = ms.arg_info.ArgInfo.from_prim_func(func)
            inputs.append(ms.runner.RunnerInput(built.artifact_path, device_type="cpu", args_info=args))
        else:
            inputs.append(None)
    best = [float("inf")] * len(funcs)
    for _ in range(ROUNDS):
        live = [i for i, item in enumerate(inputs) if item is not None]
        futures = runner.run([inputs[i] for i in live])
        for index, future in zip(live, futures, strict=True):
            result = future.result()
            if result.error_msg is None and result.run_secs:
                best[index] = min(best[index], min(float(s) for s in result.run_secs))
    return best
