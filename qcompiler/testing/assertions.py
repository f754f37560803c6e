"""Assertions for property tests of passes and backends."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompiler.dialect import run_reference
from qcompiler.ir.verifier import verify

Feeds = Mapping[str, np.ndarray]


def _as_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


def _copy_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(_as_proto(model))


def assert_equivalent(
    pass_: ir.passes.PassBase,
    model: onnx.ModelProto | ir.Model,
    inputs: Sequence[Feeds],
    *,
    rtol: float = 1e-9,
    atol: float = 0.0,
    float64: bool = True,
) -> ir.Model:
    """Run ``pass_`` on a copy of ``model`` and assert the outputs are unchanged within tolerance.

    With ``float64`` the inputs are compared in float64 arithmetic: float initializers and inputs are cast
    to double, so float-exact passes must agree to ~1e-9 relative. Also checks the verifier. Returns the
    transformed model.
    """
    before = _copy_ir(model)
    if float64:
        before = _to_float64(before)
    after = pass_(_copy_ir(before)).model
    verify(after)
    for feeds in inputs:
        cast = {k: v.astype(np.float64) if float64 and v.dtype.kind == "f" else v for k, v in feeds.items()}
        want = run_reference(_as_proto(before), cast)
        got = run_reference(_as_proto(after), cast)
        for index, (w, g) in enumerate(zip(want, got, strict=True)):
            np.testing.assert_allclose(
                np.asarray(g, np.float64),
                np.asarray(w, np.float64),
                rtol=rtol,
                atol=atol,
                err_msg=f"{type(pass_).__name__} changed output {index}",
            )
    return after


def assert_float_exact_pass(
    make_pass: Callable[[], ir.passes.PassBase],
    model: onnx.ModelProto | ir.Model,
    inputs: Sequence[Feeds],
    *,
    rtol: float = 1e-9,
) -> tuple[ir.Model, bool]:
    """The three properties every float-exact pass owes its users, checked in float64:

    - equivalence: outputs within ``rtol`` relative (to each output's largest magnitude) of the input model's;
    - an honest ``modified`` flag: False exactly when the serialized model is unchanged;
    - idempotence: a second run (a fresh pass object) reports no change and changes nothing.

    Returns the transformed model and its ``modified`` flag.
    """
    before = _to_float64(_copy_ir(model))
    before_bytes = ir.serde.serialize_model(before).SerializeToString(deterministic=True)
    result = make_pass()(_copy_ir(before))
    after = result.model
    verify(after)
    after_bytes = ir.serde.serialize_model(after).SerializeToString(deterministic=True)
    name = type(make_pass()).__name__
    changed = after_bytes != before_bytes
    assert result.modified == changed, (
        f"{name} reported modified={result.modified} but the model {'changed' if changed else 'did not change'}"
    )
    for feeds in inputs:
        cast = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
        want = run_reference(_as_proto(before), cast)
        got = run_reference(_as_proto(after), cast)
        for index, (w, g) in enumerate(zip(want, got, strict=True)):
            w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
            error = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-300)
            assert error <= rtol, f"{name} changed output {index} by {error:.3g} relative (limit {rtol:g})"
    again = make_pass()(_copy_ir(after))
    again_bytes = ir.serde.serialize_model(again.model).SerializeToString(deterministic=True)
    assert not again.modified and again_bytes == after_bytes, f"{name} is not idempotent: a second run changed it"
    return after, bool(result.modified)


def _to_float64(model: ir.Model) -> ir.Model:
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT and value.const_value is not None:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float64), name=value.name)
            value.dtype = ir.DataType.DOUBLE
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.dtype == ir.DataType.FLOAT:
            value.dtype = ir.DataType.DOUBLE
    for node in model.graph:
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT:
                value.dtype = ir.DataType.DOUBLE
    return model


def assert_bit_exact(
    backend: Callable[[onnx.ModelProto], Any],
    model: onnx.ModelProto | ir.Model,
    inputs: Sequence[Feeds],
) -> None:
    """Build ``model`` with ``backend`` (returns an object with ``run(feeds) -> list[array]``) and assert
    every output equals the reference interpreter's, bit for bit."""
    proto = _as_proto(model)
    runnable = backend(proto)
    for feeds in inputs:
        want = run_reference(proto, feeds)
        got = runnable.run(feeds)
        assert len(want) == len(got), f"backend returned {len(got)} outputs, reference {len(want)}"
        for index, (w, g) in enumerate(zip(want, got, strict=True)):
            w, g = np.asarray(w), np.asarray(g)
            assert w.dtype == g.dtype and w.shape == g.shape, (
                f"output {index}: backend gives {g.dtype}{g.shape}, reference {w.dtype}{w.shape}"
            )
            if not np.array_equal(w, g):
                bad = int(np.count_nonzero(w != g))
                raise AssertionError(f"output {index}: {bad} of {w.size} elements differ from the reference")


def output_steps(model: onnx.ModelProto | ir.Model) -> list[float]:
    """The quantization step (scale) of every graph output, read from the DequantizeLinear producing it."""
    graph = _copy_ir(model).graph
    steps = []
    for out in graph.outputs:
        producer = out.producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            raise ValueError(f"output {out.name!r} is not produced by a DequantizeLinear")
        scale = producer.inputs[1].const_value
        steps.append(float(np.max(scale.numpy())))
    return steps


def assert_within_quantization_step(
    qdq_model: onnx.ModelProto | ir.Model,
    integer_model: onnx.ModelProto | ir.Model,
    inputs: Sequence[Feeds],
    steps: float = 1.0,
) -> float:
    """Assert the integer graph (reference interpreter) is within ``steps`` output quantization steps of the
    QDQ graph for every output element. Returns the largest difference seen, in steps."""
    qdq, integer = _as_proto(qdq_model), _as_proto(integer_model)
    scales = output_steps(integer)
    worst = 0.0
    for feeds in inputs:
        want = run_reference(qdq, feeds)
        got = run_reference(integer, feeds)
        for index, (w, g, step) in enumerate(zip(want, got, scales, strict=True)):
            w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
            gap = np.abs(w64 - g64) / step
            # both graphs dequantize in float32: an int16 output far from zero carries float32 rounding of
            # several thousandths of a step, so the slack scales with the value, not with the step alone
            slack = 1e-3 + 4 * float(np.finfo(np.float32).eps) * np.maximum(np.abs(w64), np.abs(g64)) / step
            diff = float(np.max(gap, initial=0.0))
            worst = max(worst, diff)
            assert bool(np.all(gap <= steps + slack)), (
                f"output {index}: integer graph is {diff:.3f} steps from the QDQ graph"
            )
    return worst


#: LLVM IR floating-point instructions and types (an integer-only kernel has none)
FLOAT_INSTRUCTIONS = re.compile(
    r"\b(fadd|fsub|fmul|fdiv|frem|fcmp|fptosi|fptoui|sitofp|uitofp|fpext|fptrunc)\b|\b(float|double)\b"
)
#: helpers TVM puts in every LLVM module and never calls from integer code
_FP16_HELPERS = frozenset({"__truncsfhf2", "__extendhfsf2"})


def llvm_functions(llvm_ir: str) -> dict[str, str]:
    """Function name -> its body, for every function defined in an LLVM IR module."""
    bodies = {}
    for match in re.finditer(r"^define [^@]*@\"?([\w.$]+)\"?\(.*?^}", llvm_ir, re.S | re.M):
        bodies[match.group(1)] = match.group(0)
    return bodies


def float_functions(llvm_ir: str) -> dict[str, list[str]]:
    """Functions of an LLVM IR module that use floating point, with the float instructions each uses.

    The body of a parallel loop is a function of its own (``__tvm_parallel_lambda.N``); it is reported as
    ``kernel/__tvm_parallel_lambda.N`` after the kernel that launches it, so a check can tell whose it is."""
    functions = llvm_functions(llvm_ir)
    found = {}
    for name, body in functions.items():
        if name in _FP16_HELPERS or not FLOAT_INSTRUCTIONS.search(body):
            continue
        label = name
        if name.startswith("__tvm_parallel_lambda"):
            reference = re.compile(rf"@\"?{re.escape(name)}\"?(?![\w.$])")
            parents = [other for other, text in functions.items() if other != name and reference.search(text)]
            label = "/".join([*parents, name])
        found[label] = sorted({m.group(0) for m in FLOAT_INSTRUCTIONS.finditer(body)})
    return found


#: PTX instructions an integer-only kernel may use (the part of an opcode before its first ".": ``dp4a.s32.s32``
#: is ``dp4a``): integer arithmetic and logic, moves, conversions, loads and stores, control flow, barriers,
#: warp operations and the int8 tensor-core instructions. Anything else (``fma``, ``rcp``, ``ex2``, ...) is float.
PTX_INTEGER_OPCODES = frozenset({
    "abs", "activemask", "add", "and", "atom", "bar", "barrier", "bfe", "bfi", "bfind", "bmsk", "bra", "brev",
    "brkpt", "call", "clz", "cnot", "cp", "cvt", "cvta", "div", "dp2a", "dp4a", "elect", "exit", "fence",
    "fns", "isspacep", "ld", "ldmatrix", "ldu", "lop3", "mad", "mad24", "madc", "match", "max", "membar", "min",
    "mma", "mov", "mul", "mul24", "nanosleep", "neg", "not", "or", "popc", "prefetch", "prmt", "red", "redux",
    "rem", "ret", "sad", "selp", "set", "setp", "shf", "shfl", "shl", "shr", "slct", "st", "stmatrix", "sub",
    "subc", "addc", "trap", "vote", "wmma", "xor",
})  # fmt: skip
#: a floating-point type in an instruction's modifiers or a register declaration (``cvt.rn.f32.s32``, ``.reg .f32``)
PTX_FLOAT_TYPE = re.compile(r"\.(f16|f16x2|bf16|bf16x2|f32|f64|tf32|e4m3|e4m3x2|e5m2|e5m2x2|e2m1x2|e3m2x2)\b")


def ptx_kernels(ptx: str) -> dict[str, str]:
    """Kernel name -> its body, for every ``.entry`` and ``.func`` of a PTX module."""
    bodies = {}
    header = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\w+)\s*\(", re.M)
    for match in header.finditer(ptx):
        end = ptx.find("\n}", match.end())
        bodies[match.group(1)] = ptx[match.start() : end if end >= 0 else len(ptx)]
    return bodies


#: kernels at a graph's edges, where float is allowed: the input's QuantizeLinear, the output's DequantizeLinear
EDGE_KERNELS = ("quantize_input", "dequantize")


def ptx_float_kernels(ptx: str, allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Kernels of a PTX module that use floating point, with the offending instructions of each: an opcode outside
    :data:`PTX_INTEGER_OPCODES`, or any instruction or register declaration of a float type (an allow-list: an
    instruction this list does not know counts as float until it is added). Kernels whose name contains one of
    ``allowed`` (:data:`EDGE_KERNELS`: the graph's edges) are not checked."""
    found = {}
    for name, body in ptx_kernels(ptx.replace("\0", "")).items():
        if any(part in name for part in allowed):
            continue
        bad = set()
        for raw in body.splitlines()[1:]:
            line = raw.split("//", 1)[0].strip().rstrip(";")
            if not line or line.endswith((":", "{", "}", "(", ")", ",")) or line in ("{", "}"):
                continue
            if line.startswith("@"):  # a predicate guard: "@%p1 bra $L__BB0_2"
                line = line.split(None, 1)[1] if " " in line else ""
            opcode = line.split(None, 1)[0] if line else ""
            if opcode.startswith("."):  # a directive: only its type matters (".reg .f32 %f<4>")
                if PTX_FLOAT_TYPE.search(line):
                    bad.add(line.split("%", 1)[0].strip())
                continue
            if opcode.split(".", 1)[0] not in PTX_INTEGER_OPCODES or PTX_FLOAT_TYPE.search(opcode):
                bad.add(opcode)
        if bad:
            found[name] = sorted(bad)
    return found
