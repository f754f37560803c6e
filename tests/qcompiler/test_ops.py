"""The op-traits table (qcompiler.ir.ops): its rows are consistent, and the passes read their op sets from it."""

from __future__ import annotations

import pytest

from qcompiler.ir import ops
from qcompiler.ir.ops import OpTraits, ops_where, traits
from qcompiler.passes.lower.dyadic import LowerQDQToIntegerPass
from qcompiler.passes.lower.nonlinear import lower_nonlinearity


def test_every_lowering_named_in_the_table_has_a_handler() -> None:
    handlers = LowerQDQToIntegerPass()._handlers
    for op, row in ops.OPS.items():
        if row.lowering == "nonlinear":
            assert row.nonlinearity, op  # lower_nonlinearity takes it
        elif row.lowering:
            assert row.lowering in handlers, f"{op}: no handler for lowering {row.lowering!r}"
    assert callable(lower_nonlinearity)


def test_quantized_ops_have_a_lowering_and_back() -> None:
    """An op the quantizer scales must lower, and an op with a lowering must be quantized: one fact, one row."""
    for op, row in ops.OPS.items():
        assert bool(row.quantize) == bool(row.lowering), op


def test_derived_sets_follow_the_rows() -> None:
    assert ops.LAYOUT_OPS <= ops.MOVES_VALUES_OPS <= ops.INHERIT_SCALE_OPS | ops.MOVES_VALUES_OPS
    assert {"Conv", "Gemm", "MatMul"} == ops.LINEAR_OPS
    assert {"Relu", "Clip"} == ops.FUSABLE_ACTIVATIONS
    assert {"LayerNormalization", "RMSNormalization"} == ops.NORM_OPS
    assert "Softmax" in ops.OWN_SCALE_OPS and traits("Softmax").quantize == "fixed"  # type: ignore[union-attr]
    assert not (ops.OWN_SCALE_OPS & ops.INHERIT_SCALE_OPS)
    assert ops_where(lambda t: t.positive_homogeneous) == ops.POSITIVE_HOMOGENEOUS
    assert traits("NoSuchOp") is None


def test_the_passes_read_the_table() -> None:
    from qcompiler.ir import regions
    from qcompiler.passes.lower import groups
    from qcompiler.passes.quantize import precision, qdq, row_exponent
    from qcompiler.passes.transform import equalize

    assert qdq.ANCHOR_OPS is ops.OWN_SCALE_OPS and qdq.PASS_THROUGH_OPS is ops.INHERIT_SCALE_OPS
    assert precision._WIDTH_PASS_THROUGH is ops.KEEPS_WIDTH_OPS and row_exponent.SHAPE_OPS is ops.LAYOUT_OPS
    assert groups.ACTIVATIONS is ops.FUSABLE_ACTIVATIONS and equalize.HOMOGENEOUS is ops.POSITIVE_HOMOGENEOUS
    assert regions.ELEMENTWISE_NONLINEAR is ops.ELEMENTWISE_NONLINEAR


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "sometimes"}, "quantize must be"),
        ({"layout": True}, "a layout op also moves values"),
    ],
)
def test_a_malformed_row_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpTraits("Bad", **kwargs)
