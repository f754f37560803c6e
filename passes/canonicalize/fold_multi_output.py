"""Fold nodes of ops with several outputs whose inputs are all constants (a Split of a constant sin/cos table, a
LayerNormalization of a constant).

onnxscript's constant folding leaves multi-output nodes alone; the quantizer would then meet float ops on
constants. Each such node is evaluated once by ``onnx.reference`` and its outputs become initializers; then
onnxscript's folding runs again for what reads them, and the two alternate until neither folds anything (DETR:
a constant query Add folds only after a multi-output node before it, and feeds a three-output LayerNormalization).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from qcompiler.ir.graph import add_initializer, const_array, is_graph_output

#: folded outputs larger than this stay computed (the same spirit as onnxscript's output size limit)
MAX_FOLDED_ELEMENTS = 1 << 24
#: rounds of (multi-output folding, onnxscript folding); each round folds at least one node, so this only bounds
#: a pathological graph
MAX_ROUNDS = 16


def _multi_output(op_type: str, opset: int) -> bool:
    """Whether the op's schema declares more than one output: onnxscript skips those even when the node itself
    has one (a LayerNormalization of a constant keeps only Y)."""
    try:
        return onnx.defs.get_schema(op_type, opset).max_output > 1
    except onnx.defs.SchemaError:
        return False


class FoldConstantMultiOutputPass(ir.passes.InPlacePass):
    """A default-domain node of an op with several outputs (declared by its schema, whatever the node uses) and only
    constant inputs -> its outputs as initializers."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for _ in range(MAX_ROUNDS):
            if not self._fold_once(model):
                break
            modified = True
            # what read the folded outputs may fold now (GPT-J: Unsqueeze of each half of the table)
            FoldConstantsPass(shape_inference=False, input_size_limit=1 << 26, output_size_limit=1 << 26)(model)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _fold_once(model: ir.Model) -> bool:
        graph = model.graph
        modified = False
        opset = model.opset_imports.get("", 21)
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or not node.inputs or not _multi_output(node.op_type, opset):
                continue
            constants = [None if v is None else const_array(v) for v in node.inputs]
            if any(v is not None and c is None for v, c in zip(node.inputs, constants, strict=True)):
                continue
            proto = ir.serde.serialize_node(node)
            names = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
            del proto.input[:]
            proto.input.extend(names)
            outputs = [f"out{i}" for i in range(len(node.outputs))]
            del proto.output[:]
            proto.output.extend(outputs)
            inits = [onnx.numpy_helper.from_array(np.asarray(c), n) for n, c in zip(names, constants, strict=True) if n]
            one = helper.make_model(
                helper.make_graph(
                    [proto], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in outputs], inits
                ),
                opset_imports=[helper.make_opsetid("", opset)],
            )
            values = ReferenceEvaluator(one).run(None, {})
            if sum(np.asarray(v).size for v in values) > MAX_FOLDED_ELEMENTS:
                continue
            for out, value in zip(node.outputs, values, strict=True):
                if not out.uses() and not is_graph_output(graph, out):
                    continue
                folded = add_initializer(graph, out.name or "folded", np.asarray(value))
                out.replace_all_uses_with(folded, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            modified = True
        return modified
