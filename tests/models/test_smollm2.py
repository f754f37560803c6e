"""Issue 3 on SmolLM2-135M (Llama architecture), W8A8 integer-only on the CPU: WikiText-2 perplexity over the first
4096 test tokens in 512-token windows and over 4096 held-out tokens (issue 18: text never used for a decision,
qcompiler.testing.llm.HELD_OUT), the lowered graph free of float ops and the kernels free of float instructions
(acceptance 4).

Acceptance 2 asks for the perplexity within 5 % of float (issue 4's W8A8 target: 2 %): this test asserts 2 %
(measured 1.2 % with row exponents, docs/results.md) and prints both numbers. The W4A8 recipe (issue 4,
acceptance 4) compiles to integer-only code whose perplexity follows its QDQ simulation. Both recipes' integer code
matches its simulation (with the integer nonlinearities) op by op within one quantization step per element.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

import qcompiler
from qcompiler.passes.lower import float_ops_inside
from qcompiler.testing import float_functions

pytestmark = [pytest.mark.slow, pytest.mark.tvm]
CALIBRATION_WINDOWS = 8


def test_smollm2_w8a8_integer_only_perplexity(smol) -> None:
    import torch

    from qcompiler.testing.llm import reported_perplexities

    calibration = smol.calibration(CALIBRATION_WINDOWS)
    example = (torch.from_numpy(calibration[0]["ids"]),)
    # no recipe named (issue 21, acceptance 3): auto finds causal attention masks and picks w8a8-llm
    compiled = qcompiler.compile(
        smol.logits_module(), "llvm", example_inputs=example, calibration=calibration, progress=False
    )
    assert compiled.report["auto"]["kind"] == "causal-decoder" and compiled.report["recipe"] == "w8a8-llm"
    assert float_ops_inside(ir.serde.deserialize_model(compiled.integer_model)) == []
    offenders = {n: ops for n, ops in float_functions(compiled.module.llvm_ir()).items() if "dequantize" not in n}
    assert not offenders, f"float instructions in integer kernels: {offenders}"

    reference = reported_perplexities(smol.float_step, smol.tokens)
    ours = reported_perplexities(lambda ids: compiled(ids), smol.tokens)
    for split in reference:
        print(f"\nSmolLM2-135M WikiText-2 perplexity, {split}: float {reference[split]:.2f}, W8A8 integer-only "
              f"{ours[split]:.2f}")  # fmt: skip
    assert abs(reference["evaluation"] - 27.6) < 0.2  # the float model's perplexity on this protocol (docs/results.md)
    # issue 3's 5 % and issue 4's 2 % on the tokens the recipe was tuned on; measured 1.013 (27.98 / 27.61)
    assert ours["evaluation"] <= 1.02 * reference["evaluation"]
    assert ours["held-out"] <= 1.05 * reference["held-out"]  # text never tuned on: measured 1.023 (42.40 / 41.45)
    _assert_op_by_op(compiled.qdq_model, compiled.integer_model, smol.tokens, "QGemm")


def _assert_op_by_op(qdq, integer, tokens, linear: str) -> None:
    """Issue 4, acceptance 4 on all 30 layers: every op of the integer code, fed the simulation's inputs (the
    QDQ graph with the integer nonlinearities), within one step of it for every element of the first window."""
    from qcompiler.passes.lower import LowerNonlinearitiesPass
    from qcompiler.testing.llm import WINDOW
    from qcompiler.testing.lowering import assert_lowering_matches

    simulation = ir.serde.deserialize_model(qdq) if not isinstance(qdq, ir.Model) else qdq
    LowerNonlinearitiesPass()(simulation)
    rows = assert_lowering_matches(simulation, integer, [{"ids": tokens[:WINDOW][None]}])
    checked = {r.op_type for r in rows}
    assert {linear, "Requantize", "RescaleAdd", "IntSoftmax", "IntLayerNorm", "IntSigmoid"} <= checked
    assert sum(r.op_type == linear for r in rows) == 30 * 7 + 1


def test_smollm2_w4a8_integer_only_follows_its_simulation(smol) -> None:
    """w4a8 (rotations, online Hadamards, GPTQ int4 in groups of 128, static int8 activations read per token with
    row exponents): integer-only with every projection a QGemmInt4, and over the first 1024 test tokens its
    perplexity within 2 % of the QDQ graph's (measured: 22.28 against 22.07)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from qcompiler.api import quantize_to_integer
    from qcompiler.backends.tvm import build
    from qcompiler.testing.llm import perplexity

    calibration = smol.calibration(CALIBRATION_WINDOWS)
    exported = qcompiler.ir.load(smol.logits_module(), example_inputs=(torch.from_numpy(calibration[0]["ids"]),))
    qdq, integer, _, shapes = quantize_to_integer(exported, calibration=calibration, recipe="w4a8", progress=False)
    assert float_ops_inside(integer) == []
    ops = [n.op_type for n in integer.graph]
    assert ops.count("QGemmInt4") == 30 * 7 + 1 and "QGemm" not in ops  # every projection and the head
    assert ops.count("RowExponent") == 30 * 4 + 1  # one per source: q, k and v share one, gate and up one
    module = build(ir.serde.serialize_model(integer), shapes)
    proto = ir.serde.serialize_model(qdq)
    proto.ir_version = 10
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    simulated = perplexity(lambda ids: session.run(None, {"ids": ids})[0], smol.tokens, count=1024)
    ours = perplexity(lambda ids: module.run({"ids": ids})[0], smol.tokens, count=1024)
    print(f"\nSmolLM2-135M W4A8 perplexity (1024 tokens): QDQ simulation {simulated:.2f}, integer-only {ours:.2f}")
    assert np.isfinite(ours) and abs(ours / simulated - 1) <= 0.02
    _assert_op_by_op(qdq, integer, smol.tokens, "QGemmInt4")
