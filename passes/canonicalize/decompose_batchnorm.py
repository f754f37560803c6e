"""An inference BatchNormalization that no Conv or Gemm absorbed becomes a per-channel ``Mul`` and ``Add``.

``BN(x) = x a + b`` with ``a = gamma / sqrt(var + eps)`` and ``b = beta - mean a``, both shaped ``[C, 1, ..., 1]``
(channel axis 1). FoldBatchNormPass runs first and folds every BN that follows a Conv or Gemm; what is left (a BN
after a MatMul on ``[batch, C]``, or after a pooling or an add) is an affine map per channel, which the quantizer
takes as a product by a constant table and a constant addend.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompiler.ir.graph import add_initializer, const_array


class DecomposeBatchNormPass(ir.passes.InPlacePass):
    """``BatchNormalization(x, gamma, beta, mean, var) -> Add(Mul(x, a), b)``, a and b per channel (axis 1)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
                continue
            if node.attributes.get_int("training_mode", 0) or any(out.uses() for out in node.outputs[1:]):
                continue  # statistics updated at run time: not an affine map
            x = node.inputs[0]
            params = [const_array(v) for v in node.inputs[1:5]]
            if x is None or x.shape is None or len(x.shape) < 2 or any(p is None for p in params):
                continue
            gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
            epsilon = node.attributes.get_float("epsilon", 1e-5)
            factor = gamma / np.sqrt(var + epsilon)
            offset = beta - mean * factor
            shape = [-1] + [1] * (len(x.shape) - 2)
            dtype = np.float32 if x.dtype in (None, ir.DataType.FLOAT) else np.float64
            base = node.outputs[0].name or "batchnorm"
            a = add_initializer(graph, f"{base}_factor", factor.reshape(shape).astype(dtype))
            b = add_initializer(graph, f"{base}_offset", offset.reshape(shape).astype(dtype))
            mul = ir.node("Mul", [x, a])
            add = ir.node("Add", [mul.outputs[0], b])
            for value in (mul.outputs[0], add.outputs[0]):
                value.dtype, value.shape = x.dtype, x.shape
            graph.insert_before(node, [mul, add])
            node.outputs[0].replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
            add.outputs[0].name = base
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
