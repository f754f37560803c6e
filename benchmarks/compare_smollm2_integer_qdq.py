"""SmolLM2-135M: the integer-only code against its float simulation, end to end and op by op (issue 4, acceptance 4).

For each recipe (``w8a8-llm`` and ``w4a8`` by default) and two simulations, the QDQ graph (onnxruntime, QDQ fusion
off, so in float) and the same graph with the integer code's nonlinearities (``simulate(nonlinearities="integer")``,
on the reference interpreter); and, for scale, the QDQ graph on onnx's reference interpreter against onnxruntime
(two float runtimes, no integer code):

- end to end, on the first ``--windows`` 512-token WikiText-2 windows: the logits' gap in two units, the output's
  own int16 step (the final DequantizeLinear's per-entry scale) and one int8 step of the logits' range
  (``max |logit| / 127``, the unit of tests/models/test_llama_block.py), and how often both pick the same next
  token;
- op by op, on the first window (qcompiler.testing.compare_lowering): each integer op fed the simulation's
  values for its inputs, per op type the share of elements within one integer step, the largest gap and the
  mean gap, in that op's own integer steps.

    .venv/bin/python benchmarks/compare_smollm2_integer_qdq.py [--recipes w8a8-llm w4a8] [--windows 2]

Prints both tables and saves benchmarks/results/smollm2_integer_vs_qdq.json (about 25 minutes, 10 GB).
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save

import qcompiler
from qcompiler.api import quantize_to_integer
from qcompiler.backends.tvm import build
from qcompiler.dialect import run_reference
from qcompiler.ir.ort_session import ORT_MAX_IR_VERSION
from qcompiler.passes.lower import LowerNonlinearitiesPass
from qcompiler.testing.llm import WINDOW, load_smollm2
from qcompiler.testing.lowering import compare_lowering

CALIBRATION_WINDOWS = 8
SIMULATIONS = ("QDQ (float nonlinearities)", "integer nonlinearities")
SELF = "QDQ: reference interpreter vs onnxruntime"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=["w8a8-llm", "w4a8"])
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    import torch

    smol = load_smollm2()
    calibration = smol.calibration(CALIBRATION_WINDOWS)
    rows, ops = [], []
    for recipe in args.recipes:
        exported = qcompiler.ir.load(smol.logits_module(), example_inputs=(torch.from_numpy(calibration[0]["ids"]),))
        qdq, integer, _, shapes = quantize_to_integer(exported, calibration=calibration, recipe=recipe, progress=False)
        out_dq = integer.graph.outputs[0].producer()
        assert out_dq is not None and out_dq.op_type == "DequantizeLinear"
        step = out_dq.inputs[1].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        exact = ir.serde.deserialize_model(ir.serde.serialize_model(qdq))
        LowerNonlinearitiesPass()(exact)
        module = build(ir.serde.serialize_model(integer), shapes)
        proto = ir.serde.serialize_model(qdq)
        proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        exact_proto = ir.serde.serialize_model(exact)
        for window in range(args.windows):
            feeds = {"ids": smol.tokens[window * WINDOW : (window + 1) * WINDOW][None]}
            ours = module.run(feeds)[0].astype(np.float64)
            float_qdq = session.run(None, feeds)[0].astype(np.float64)
            compared = {
                SIMULATIONS[0]: (ours, float_qdq),
                SIMULATIONS[1]: (ours, run_reference(exact_proto, feeds)[0].astype(np.float64)),
                # no integer code: the same QDQ graph on two float runtimes, the floor of any end-to-end gap
                SELF: (run_reference(proto, feeds)[0].astype(np.float64), float_qdq),
            }
            for label, (got, simulated) in compared.items():
                gap = np.abs(got - simulated)
                int8_step = float(np.abs(simulated).max()) / 127
                row = {
                    "recipe": recipe,
                    "simulation": label,
                    "window": window,
                    "within_1_int8_step": round(float(np.mean(gap <= int8_step)), 4),
                    "max_int8_steps": round(float(gap.max() / int8_step), 2),
                    "within_1_output_step": round(float(np.mean(gap <= step)), 4),
                    "median_output_steps": round(float(np.median(gap / step)), 1),
                    "same_next_token": round(float(np.mean(got.argmax(-1) == simulated.argmax(-1))), 4),
                }
                rows.append(row)
                print(row, flush=True)
        del module, session
        gc.collect()
        feeds = {"ids": smol.tokens[:WINDOW][None]}
        for label, simulation in zip(SIMULATIONS, (qdq, exact), strict=True):
            by_type = defaultdict(list)
            for agreement in compare_lowering(simulation, integer, feeds):
                by_type[agreement.op_type].append(agreement)
            for op_type, found in sorted(by_type.items()):
                size = sum(a.size for a in found)
                ops.append(
                    {
                        "recipe": recipe,
                        "simulation": label,
                        "op": op_type,
                        "ops": len(found),
                        "within_1_step": round(sum(a.within * a.size for a in found) / size, 6),
                        "max_steps": max(a.max_steps for a in found),
                        "mean_steps": round(sum(a.mean_steps * a.size for a in found) / size, 5),
                    }
                )
                print(ops[-1], flush=True)
            gc.collect()
        del qdq, integer, exact, exported  # one recipe's models at a time (24 GB machines)
        gc.collect()
    print_table(rows, list(rows[0]))
    print()
    print_table(ops, list(ops[0]))
    print(f"saved {save('smollm2_integer_vs_qdq', rows, {'window': WINDOW, 'op_by_op': ops})}")


if __name__ == "__main__":
    main()
