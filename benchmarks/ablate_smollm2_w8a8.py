"""Where W8A8 (recipe w8a8-llm) loses perplexity on SmolLM2-135M: its QDQ graph, edited, in onnxruntime.

Variants of the same QDQ graph (first 2048 WikiText-2 test tokens by default, 512-token windows):

- ``qdq``: as the quantizer wrote it;
- ``activations float``: every activation Q/DQ pair removed (a per-channel tensor read at one scale by linears
  keeps its folded ratio as a float Mul), weights, tables and embeddings still quantized;
- ``per-tensor int8 -> int16``: every per-tensor int8 activation stored at 16 bits over the same range;
- ``... except GEMM weight operands``: the same, but tensors that a constant-weight linear reads stay int8
  (what an integer path with int8 x int8 GEMMs allows);
- ``int16 residual quantizers removed`` / ``int16 quantizers removed`` / ``int8 quantizers removed``: only those
  activation Q/DQ pairs taken out (the residual ones: read by a norm or a residual add; with ``w8a8-llm`` every
  int8 activation is a GEMM input);
- ``int16 residual steps x4``: the residual stream's int16 scales made 4x coarser (resolution against headroom);
- ``GEMM inputs int16: <class>``: the int8 GEMM inputs written by norms, by attention's P V product or by the
  SwiGLU product (or all of them) stored at 16 bits over the same range.

With ``--only-per-token``: the int8 GEMM inputs read with per-token power-of-two exponents over static steps
1x, 2x, 4x and 16x finer, simulated on the ``w8a8-llm`` QDQ graph with row exponents off (how ``row_exponents``
was chosen: docs/results.md).

    .venv/bin/python benchmarks/ablate_smollm2_w8a8.py [--windows 4] [--per-tensor-residual] [--only-per-token]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import RemoveUnusedNodesPass

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler
from qcompiler.api import _quantize_qdq
from qcompiler.config import load_recipe
from qcompiler.ir.ort_session import ORT_MAX_IR_VERSION
from qcompiler.testing.llm import load_smollm2, perplexity


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.tensor(array).dtype))  # fmt: skip
    graph.register_initializer(value)
    return value


def strip_activations(model: ir.Model, which: Callable[[ir.Node], bool] = lambda quant: True) -> ir.Model:
    graph = model.graph
    for quant in [n for n in graph if n.op_type == "QuantizeLinear" and which(n)]:
        x = quant.inputs[0]
        q_scale = quant.inputs[1].const_value.numpy().astype(np.float64)
        for use in list(quant.outputs[0].uses()):
            dq = use.node
            d_scale = dq.inputs[1].const_value.numpy().astype(np.float64)
            target = x
            if d_scale.shape != q_scale.shape or not np.allclose(d_scale, q_scale):
                ratio = np.asarray(d_scale / q_scale, np.float32)
                mul = ir.node("Mul", [x, _constant(graph, f"{dq.outputs[0].name}_ratio", ratio)])
                mul.outputs[0].dtype = ir.DataType.FLOAT
                graph.insert_before(dq, mul)
                target = mul.outputs[0]
            dq.outputs[0].replace_all_uses_with(target, replace_graph_outputs=True)
    RemoveUnusedNodesPass()(model)
    return model


def _stored(quant: ir.Node, dtype: ir.DataType) -> bool:
    return quant.outputs[0].dtype == dtype


def _residual(quant: ir.Node) -> bool:
    """An int16 residual-stream tensor: a norm or an add of two activations reads it."""
    for use in quant.outputs[0].uses():
        for reader, _ in use.node.outputs[0].uses():
            if reader.op_type in ("RMSNormalization", "LayerNormalization"):
                return True
            if reader.op_type == "Add" and all(v.const_value is None for v in reader.inputs):
                return True
    return False


def rescale_residual(model: ir.Model, factor: float) -> ir.Model:
    graph = model.graph
    for index, quant in enumerate(n for n in list(graph) if n.op_type == "QuantizeLinear"):
        if not (_stored(quant, ir.DataType.INT16) and _residual(quant)):
            continue
        made: dict[int, ir.Value] = {}  # Q and DQ share their scale initializer
        for node in [quant, *(use.node for use in quant.outputs[0].uses())]:
            old = node.inputs[1]
            if id(old) not in made:
                scale = (old.const_value.numpy() * np.float32(factor)).astype(np.float32)
                made[id(old)] = _constant(graph, f"{old.name}_x{index}_{len(made)}", scale)
            node.replace_input_with(1, made[id(old)])
    return model


def gemm_input_class(quant: ir.Node) -> str:
    """What wrote an int8 GEMM input (looking back through Q/DQ and shape ops): norm, attention (P V) or swiglu."""
    value = quant.inputs[0]
    for _ in range(16):
        producer = value.producer()
        if producer is None:
            return "input"
        if producer.op_type in ("QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose"):
            value = producer.inputs[0]
            continue
        return {"RMSNormalization": "norm", "LayerNormalization": "norm", "MatMul": "attention", "Mul": "swiglu"}.get(
            producer.op_type, producer.op_type
        )
    return "?"


def widen_gemm_inputs(model: ir.Model, classes: set[str]) -> ir.Model:
    graph = model.graph
    for index, quant in enumerate(n for n in list(graph) if n.op_type == "QuantizeLinear"):
        if not _stored(quant, ir.DataType.INT8) or gemm_input_class(quant) not in classes:
            continue
        made: dict[int, ir.Value] = {}  # Q and DQ share their scale and zero-point initializers
        for node in [quant, *(use.node for use in quant.outputs[0].uses())]:
            scale, zero = node.inputs[1], node.inputs[2]
            if id(scale) not in made:
                wide = (scale.const_value.numpy().astype(np.float64) * 127 / 32767).astype(np.float32)
                made[id(scale)] = _constant(graph, f"{scale.name}_w{index}_{len(made)}", wide)
            if id(zero) not in made:
                zeros = np.zeros(zero.const_value.numpy().shape, np.int16)
                made[id(zero)] = _constant(graph, f"{zero.name}_w{index}_{len(made)}", zeros)
            node.replace_input_with(1, made[id(scale)])
            node.replace_input_with(2, made[id(zero)])
        quant.outputs[0].dtype = ir.DataType.INT16
    return model


def per_token_exponents(model: ir.Model, classes: set[str], finer: float = 1.0) -> ir.Model:
    """The int8 GEMM inputs of ``classes`` keep their static (per-channel) scales, but a token whose row exceeds
    the int8 range takes a power-of-two step ``2^e`` (``e`` the smallest that fits it), undone after the
    GEMM: what an integer kernel can do with a per-row shift."""
    graph = model.graph
    for index, quant in enumerate(n for n in list(graph) if n.op_type == "QuantizeLinear"):
        if not _stored(quant, ir.DataType.INT8) or gemm_input_class(quant) not in classes:
            continue
        x = quant.inputs[0]
        if finer != 1.0:  # static steps ``finer`` times finer: the typical token gains resolution, outliers shift
            made: dict[int, ir.Value] = {}
            for node in [quant, *(use.node for use in quant.outputs[0].uses())]:
                old = node.inputs[1]
                if id(old) not in made:
                    fine = (old.const_value.numpy().astype(np.float64) / finer).astype(np.float32)
                    made[id(old)] = _constant(graph, f"{old.name}_f{index}_{len(made)}", fine)
                node.replace_input_with(1, made[id(old)])
        scale = quant.inputs[1]

        def op(kind: str, inputs: list, before: ir.Node = quant, **attrs) -> ir.Value:
            node = ir.node(kind, inputs, attributes=attrs)
            node.outputs[0].dtype = ir.DataType.FLOAT
            graph.insert_before(before, node)
            return node.outputs[0]

        steps = op("ReduceMax", [op("Abs", [op("Div", [x, scale])]), _constant(graph, f"axes{index}", np.array([-1]))],
                   keepdims=1)  # fmt: skip
        ratio = op("Div", [steps, _constant(graph, f"qmax{index}", np.array(127.0, np.float32))])
        log2 = op("Div", [op("Log", [ratio]), _constant(graph, f"ln2_{index}", np.array(np.log(2.0), np.float32))])
        exponent = op("Max", [op("Ceil", [log2]), _constant(graph, f"zero{index}", np.array(0.0, np.float32))])
        power = op("Pow", [_constant(graph, f"two{index}", np.array(2.0, np.float32)), exponent])
        quant.replace_input_with(0, op("Div", [x, power]))
        for use in list(quant.outputs[0].uses()):
            dq = use.node
            mul = ir.node("Mul", [dq.outputs[0], power])
            mul.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].replace_all_uses_with(mul.outputs[0])
            mul.replace_input_with(0, dq.outputs[0])
            graph.insert_after(dq, mul)
    return model


def _weight_operand(quant: ir.Node) -> bool:
    for use in quant.outputs[0].uses():
        for reader, index in use.node.outputs[0].uses():
            weight = reader.inputs[1] if reader.op_type in ("MatMul", "Gemm") and len(reader.inputs) > 1 else None
            producer = weight.producer() if weight is not None else None
            if (
                index == 0
                and producer is not None
                and producer.op_type == "DequantizeLinear"
                and producer.inputs[0].const_value is not None
            ):
                return True
    return False


def widen(model: ir.Model, keep_weight_operands: bool) -> ir.Model:
    graph = model.graph
    for quant in [n for n in graph if n.op_type == "QuantizeLinear"]:
        scale, zero = quant.inputs[1].const_value.numpy(), quant.inputs[2].const_value.numpy()
        if scale.size != 1 or zero.dtype != np.int8 or (keep_weight_operands and _weight_operand(quant)):
            continue
        wide = _constant(
            graph, f"{quant.inputs[1].name}_wide", (scale.astype(np.float64) * 127 / 32767).astype(np.float32)
        )
        wide_zero = _constant(graph, f"{quant.inputs[2].name}_wide", np.array(0, np.int16))
        for node in [quant, *(use.node for use in quant.outputs[0].uses())]:
            node.replace_input_with(1, wide)
            node.replace_input_with(2, wide_zero)
        quant.outputs[0].dtype = ir.DataType.INT16
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument(
        "--per-tensor-residual", action="store_true", help="the recipe with residual_per_channel off (docs/results.md)"
    )
    parser.add_argument("--only-per-token", action="store_true", help="only the per-token power-of-two variants")
    args = parser.parse_args()
    import torch

    smol = load_smollm2()
    calibration = smol.calibration(8)
    exported = qcompiler.ir.load(smol.logits_module(), example_inputs=(torch.from_numpy(calibration[0]["ids"]),))
    recipe = load_recipe("w8a8-llm")
    # the ablation edits the QDQ graph of the recipe without row exponents (its int8 GEMM inputs)
    recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, row_exponents=False))
    if args.per_tensor_residual:
        recipe = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, residual_per_channel=False))
    qdq, _, _ = _quantize_qdq(exported, None, calibration, recipe, False, False)

    def score(model: ir.Model) -> float:
        proto = ir.serde.serialize_model(model)
        proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return perplexity(lambda ids: session.run(None, {"ids": ids})[0], smol.tokens, count=args.windows * 512)

    if args.only_per_token:
        every = {"norm", "attention", "swiglu"}
        for finer in (1.0, 2.0, 4.0, 16.0):
            name = f"GEMM inputs per-token 2^e, static steps {finer:g}x finer"
            print(name, round(score(per_token_exponents(_copy(qdq), every, finer)), 2), flush=True)
        return
    results = {"float": perplexity(smol.float_step, smol.tokens, count=args.windows * 512), "qdq": score(qdq)}
    results["activations float"] = score(strip_activations(_copy(qdq)))
    results["per-tensor int8 -> int16"] = score(widen(_copy(qdq), keep_weight_operands=False))
    results["... except GEMM weight operands"] = score(widen(_copy(qdq), keep_weight_operands=True))
    int16, int8 = ir.DataType.INT16, ir.DataType.INT8
    residual = score(strip_activations(_copy(qdq), lambda q: _stored(q, int16) and _residual(q)))
    results["int16 residual quantizers removed"] = residual
    results["int16 quantizers removed"] = score(strip_activations(_copy(qdq), lambda q: _stored(q, int16)))
    results["int8 quantizers removed"] = score(strip_activations(_copy(qdq), lambda q: _stored(q, int8)))
    print({k: round(v, 2) for k, v in results.items()}, flush=True)
    results["int16 residual steps x4"] = score(rescale_residual(_copy(qdq), 4.0))
    for classes in ({"norm"}, {"attention"}, {"swiglu"}, {"norm", "attention", "swiglu"}):
        name = "GEMM inputs int16: " + " + ".join(sorted(classes))
        results[name] = score(widen_gemm_inputs(_copy(qdq), classes))
        print(name, round(results[name], 2), flush=True)
    print(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
