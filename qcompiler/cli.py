"""The ``qcompiler`` command line: ``compile`` a model to integer-only code, ``compile-lm`` a transformers causal LM
for generation with an integer KV cache and ``generate`` text with it, ``profile`` a compiled model kernel by
kernel, ``report`` it as an HTML page, ``inspect`` its transformable regions, ``recipes`` to list recipes."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qcompiler.config import builtin_recipes
from qcompiler.errors import QCompilerError
from qcompiler.pipeline import PassRecord, format_records


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompiler", description="Quantize and compile models to integer-only code.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every step, with what the libraries underneath (torch.export, onnxscript, TVM) say",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile an ONNX model")
    comp.add_argument("model", help="path of the .onnx file (external data next to it)")
    comp.add_argument(
        "--target",
        default="llvm",
        help="compilation target: llvm (default, this CPU), cuda (nvcc) or opencl (pyopencl)",
    )
    comp.add_argument(
        "--recipe", default="auto", help="built-in recipe name or .toml path (default: auto, chosen from the graph)"
    )
    comp.add_argument(
        "--calibration",
        required=True,
        help=".npz with one array per model input: one batch, or a stack [num_batches, *shape]",
    )
    comp.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    comp.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    comp.add_argument("--no-verify", action="store_true", help="skip the IR verifier after each pass")
    comp.add_argument(
        "--float-islands",
        action="store_true",
        help="keep ops the integer path cannot lower in float between dequantize and quantize (listed), "
        "instead of refusing the model",
    )
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    comp.add_argument(
        "--tune", action="store_true", help="search the GEMM register tiles on this machine (cached on disk)"
    )
    comp.add_argument(
        "--metaschedule-trials",
        type=int,
        default=0,
        metavar="N",
        help="tune the non-GEMM kernels with N MetaSchedule trials (minutes; default 0: off)",
    )
    comp.add_argument(
        "--rpc",
        metavar="HOST:PORT:KEY",
        help="build for, tune on and check against a device behind a TVM RPC tracker (--target llvm: its CPU)",
    )
    lm = sub.add_parser("compile-lm", help="compile a transformers causal LM for generation (integer KV cache)")
    lm.add_argument("model", help="a transformers model directory (config, weights and tokenizer; read offline)")
    lm.add_argument(
        "--calibration", required=True, help="a UTF-8 text file: tokenized and cut into windows of --window tokens"
    )
    lm.add_argument("--window", type=int, default=512, help="tokens per calibration window (default: 512)")
    lm.add_argument("--windows", type=int, default=8, help="calibration windows (default: 8)")
    lm.add_argument("--recipe", default="w8a8-llm", help="built-in recipe name or .toml path (default: w8a8-llm)")
    lm.add_argument("--max-context", type=int, default=2048, help="cache slots: prompt plus continuation (2048)")
    lm.add_argument("--chunk", type=int, default=128, help="prompt tokens per prefill call (default: 128)")
    lm.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    lm.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    lm.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen = sub.add_parser("generate", help="generate text with a model written by compile-lm")
    gen.add_argument("directory", help="a directory written by compile-lm (or CausalLM.save with a tokenizer)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled")
    gen.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
    gen.add_argument("--top-p", type=float, help="sample among the likeliest tokens of total probability p")
    gen.add_argument("--seed", type=int, help="seed of the sampling")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (a user turn)"
    )
    prof = sub.add_parser("profile", help="time a compiled model kernel by kernel")
    prof.add_argument("directory", help="a directory written by compile (or CompiledModel.save)")
    prof.add_argument("--inputs", help=".npz with one array per model input, at the compiled shapes (default: zeros)")
    prof.add_argument("--repeat", type=int, default=5, help="runs to take the median of (default: 5)")
    prof.add_argument("--top", type=int, default=25, help="kernels to list, slowest first (default: 25)")
    rep = sub.add_parser("report", help="write a compiled model's report as one self-contained HTML page")
    rep.add_argument("directory", help="a directory written by compile (or CompiledModel.save)")
    rep.add_argument("-o", "--output", help="where to write the page (default: DIRECTORY/report.html)")
    rep.add_argument(
        "--no-profile", action="store_true", help="skip the time per kernel (no run of the model; no TVM loaded)"
    )
    rep.add_argument("--repeat", type=int, default=3, help="profiled runs to take the median of (default: 3)")
    sub.add_parser("recipes", help="list the built-in recipes")
    inspect = sub.add_parser("inspect", help="print the regions the float-exact transforms can rewrite")
    inspect.add_argument("model", help="path of the .onnx file (external data next to it)")
    inspect.add_argument("--recipe", default="w8a8", help="recipe whose canonicalize passes run first (default: w8a8)")
    inspect.add_argument(
        "--fold-norms", action="store_true", help="fold norm gains into their readers first (rotations need it)"
    )
    return parser


def _arguments_usable(calibration: Path, output: Path, overwrite: bool) -> bool:
    """The --calibration file exists and -o/--output may be written; else the error, printed."""
    if not calibration.is_file():
        print(f"error: --calibration: no such file {calibration}", file=sys.stderr)
        return False
    if output.exists() and not overwrite:
        print(f"error: -o/--output: {output} exists; pass --overwrite to replace it", file=sys.stderr)
        return False
    return True


def _compile(args: argparse.Namespace) -> int:
    from qcompiler.api import compile as compile_model
    from qcompiler.backends.tvm.metaschedule import validate_trials

    try:
        validate_trials(args.metaschedule_trials)
    except ValueError as error:
        print(f"error: --metaschedule-trials: {error}", file=sys.stderr)
        return 2
    calibration_path, output = Path(args.calibration), Path(args.output)
    if not _arguments_usable(calibration_path, output, args.overwrite):
        return 2
    with np.load(calibration_path) as data:
        calibration = {name: data[name] for name in data.files}
    start = time.perf_counter()
    compiled = compile_model(
        args.model,
        args.target,
        calibration=calibration,
        recipe=args.recipe,
        verify=not args.no_verify,
        progress=not args.quiet,
        tune=args.tune,
        metaschedule_trials=args.metaschedule_trials,
        integer_only=not args.float_islands,
        rpc=args.rpc,
    )
    compiled.save(output, overwrite=args.overwrite)
    records = [PassRecord(**r) for r in compiled.report["passes"]]
    print(format_records(records))
    print()
    print(f"{'op':<28} {'count':>5}")
    for op, count in sorted(compiled.report["ops"].items()):
        print(f"{op:<28} {count:>5}")
    print()
    print(f"recipe {compiled.report['recipe']}, target {compiled.report['target']} ({compiled.report['device']})")
    if compiled.report.get("auto"):
        auto = compiled.report["auto"]
        print(f"recipe auto: kind {auto['kind']} ({auto['facts']}) -> {auto['recipe']}")
    for island in compiled.report.get("float_islands", []):
        print(f"float island: {island['node']} ({island['op']}): {island['reason']}")
    print(f"compiled in {time.perf_counter() - start:.2f}s -> {output}")
    return 0


def _compile_lm(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never the hub
    from qcompiler.generation import compile_causal_lm

    text_path, output = Path(args.calibration), Path(args.output)
    if not _arguments_usable(text_path, output, args.overwrite):
        return 2
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print("error: compile-lm needs transformers: pip install 'qcompiler[models]'", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32").eval()
    except (OSError, ValueError) as error:
        print(f"error: model: {args.model} is not a transformers causal LM directory: {error}", file=sys.stderr)
        return 2
    tokens = np.asarray(tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    windows = [tokens[i * args.window : (i + 1) * args.window][None] for i in range(args.windows)]
    windows = [w for w in windows if w.shape[1] == args.window] or [tokens[None]]
    start = time.perf_counter()
    compiled = compile_causal_lm(model, calibration=windows, recipe=args.recipe, max_context=args.max_context,
                                 chunk=args.chunk, tokenizer=tokenizer, progress=not args.quiet)  # fmt: skip
    compiled.save(output, overwrite=args.overwrite)
    print(f"recipe {compiled.report['recipe']}, {compiled.cache_dtypes[0]} KV cache "
          f"({compiled.cache_bytes_per_token} bytes per token, {args.max_context} slots)")  # fmt: skip
    print(f"compiled in {time.perf_counter() - start:.2f}s -> {output}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from qcompiler.generation import CausalLM

    compiled = CausalLM.load(args.directory)
    tokenizer = compiled.tokenizer
    if tokenizer is None:
        print(f"error: directory: {args.directory} holds no tokenizer; compile with compile-lm", file=sys.stderr)
        return 2
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            print("error: --chat: this model's tokenizer has no chat template", file=sys.stderr)
            return 2
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer(args.prompt)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        print("error: --prompt: it has no tokens", file=sys.stderr)
        return 2
    stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
    produced: list[int] = []
    shown = ""
    print(args.prompt, end="", flush=True)
    for token in compiled.stream(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, stop=stop, seed=args.seed):  # fmt: skip
        if token in stop:
            break
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        print(text[len(shown) :], end="", flush=True)  # whole words as they complete (decode is not per token)
        shown = text
    print()
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import onnx_ir as ir

    from qcompiler.config import load_recipe
    from qcompiler.ir import regions
    from qcompiler.ir.frontends import load as load_model
    from qcompiler.passes.transform import FoldNormGainsPass
    from qcompiler.pipeline import Pipeline

    path = Path(args.model)
    if not path.is_file():
        print(f"error: model: no such file {path}", file=sys.stderr)
        return 2
    model = load_model(str(path))
    passes: list[ir.passes.PassBase] = [spec.build() for spec in load_recipe(args.recipe).canonicalize]
    if args.fold_norms:
        passes.append(FoldNormGainsPass())
    model = Pipeline(passes, verify_each=False).run(model).model
    print(regions.report(model).format())
    return 0


def _profile(args: argparse.Namespace) -> int:
    from qcompiler.api import load
    from qcompiler.report import zero_inputs

    for flag, value in (("--repeat", args.repeat), ("--top", args.top)):
        if value < 1:
            print(f"error: {flag}: must be at least 1, got {value}", file=sys.stderr)
            return 2
    compiled = load(args.directory)
    if args.inputs is None:
        feeds = zero_inputs(compiled)
    else:
        dtypes = dict(zip(compiled.module.input_names, compiled.module.input_dtypes, strict=True))
        path = Path(args.inputs)
        if not path.is_file():
            print(f"error: --inputs: no such file {path}", file=sys.stderr)
            return 2
        with np.load(path) as data:
            missing = [name for name in compiled.input_names if name not in data.files]
            if missing:
                print(f"error: --inputs: {path} has no array for input(s) {missing}", file=sys.stderr)
                return 2
            feeds = {name: data[name].astype(dtypes[name], copy=False) for name in compiled.input_names}
    try:
        rows = compiled.profile(repeat=args.repeat, **feeds)
    except ValueError as error:  # an array of another shape than the compiled one: named by the model's check
        print(f"error: --inputs: {error}", file=sys.stderr)
        return 2
    total = sum(row["ms"] for row in rows)
    width = max([len("kernel")] + [len(row["kernel"]) for row in rows[: args.top]])
    print(f"{'kernel':<{width}} {'calls':>5} {'ms':>9} {'share':>6}")
    for row in rows[: args.top]:
        print(f"{row['kernel']:<{width}} {row['calls']:>5} {row['ms']:>9.3f} {row['share']:>6.1%}")
    if len(rows) > args.top:
        rest = rows[args.top :]
        label = f"({len(rest)} more)"
        print(f"{label:<{width}} {sum(r['calls'] for r in rest):>5} {sum(r['ms'] for r in rest):>9.3f} "
              f"{sum(r['share'] for r in rest):>6.1%}")  # fmt: skip
    print(f"total {total:.3f} ms per run (median of {args.repeat}, per kernel)")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    import onnx

    from qcompiler.api import load
    from qcompiler.files import QDQ_FILE, REPORT_FILE
    from qcompiler.report import REPORT_HTML, write_html

    directory = Path(args.directory)
    report_path = directory / REPORT_FILE
    if not report_path.is_file():
        print(
            f"error: directory: {directory} is not a compiled model (no {REPORT_FILE}); write one with "
            "`qcompiler compile` or CompiledModel.save",
            file=sys.stderr,
        )
        return 2
    if args.repeat < 1:
        print(f"error: --repeat: must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        print(f"error: directory: {report_path} is not a compiled model's report: {error}", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or "passes" not in report:
        print(f"error: directory: {report_path} is not a compiled model's report (no pass records)", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else directory / REPORT_HTML
    title = directory.resolve().name
    if args.no_profile:
        qdq = onnx.load(str(directory / QDQ_FILE)) if (directory / QDQ_FILE).is_file() else None
        write_html(output, report, qdq, None, title)
    else:
        load(directory).report_html(output, repeat=args.repeat, title=title)
    print(f"report -> {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("qcompiler").setLevel(logging.DEBUG)
    try:
        if args.command == "recipes":
            for name in builtin_recipes():
                print(name)
            return 0
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compile-lm":
            return _compile_lm(args)
        if args.command == "generate":
            return _generate(args)
        return _compile(args)
    except QCompilerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``qcompiler`` command: :func:`main`, in a process that loads TVM's runtime alone when it only runs a
    saved model (``generate``: a fifth of the memory)."""
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        from qcompiler.generation import runtime_only

        runtime_only()
    sys.exit(main())


if __name__ == "__main__":
    entry()
