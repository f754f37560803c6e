"""SiLU as exporters write it, ``Mul(x, Sigmoid(x))``: one group, one integer op (``IntSigmoid(silu=1)``).

The quantizer leaves the Sigmoid in float inside the group and quantizes only the product; the lowering
replaces the pair by one IntSigmoid on x's int8 values.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompiler.ir.graph import consumers


def silu_sigmoid(mul: ir.Node) -> ir.Node | None:
    """The Sigmoid of ``Mul(x, Sigmoid(x))`` (either operand order) when nothing else reads it, else None."""
    if mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for index in (0, 1):
        gate = mul.inputs[index]
        producer = gate.producer() if gate is not None else None
        if (
            producer is not None
            and producer.op_type == "Sigmoid"
            and producer.inputs[0] is mul.inputs[1 - index]
            and len(consumers(producer.outputs[0])) == 1
        ):
            return producer
    return None


def silu_sigmoids(graph: ir.Graph) -> set[int]:
    """``id`` of every Sigmoid that belongs to a SiLU group."""
    found = set()
    for node in graph:
        sigmoid = silu_sigmoid(node)
        if sigmoid is not None:
            found.add(id(sigmoid))
    return found
