"""Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm (onnxscript's rules)."""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewritePass
from onnxscript.rewriter.rules.common._fuse_batchnorm import (
    FuseBatchNormIntoConv,
    FuseBatchNormIntoConvTranspose,
    FuseBatchNormIntoGemm,
)


class _Guarded:
    """Two declines onnxscript's rules lack: a BatchNorm in training mode (it normalizes by the batch's own
    statistics, not the stored ones), and a producer without bias whose new bias name, ``<weight>_bias``, is
    already an initializer (the rewriter would leave the colliding initializer dangling)."""

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
        result = super().check(context, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if not result:
            return result
        if batchnorm_out.producer().attributes.get_int("training_mode", 0) != 0:
            return result.fail("BatchNormalization is in training mode")
        inbound = inbound_out.producer()
        if len(inbound.inputs) < 3 and f"{inbound.inputs[1].name}_bias" in context.graph_or_function.initializers:
            return result.fail(f"initializer name {inbound.inputs[1].name}_bias is taken")
        return result


class _IntoConv(_Guarded, FuseBatchNormIntoConv):
    """onnxscript's Conv rule with the guards."""


class _IntoConvTranspose(_Guarded, FuseBatchNormIntoConvTranspose):
    """onnxscript's ConvTranspose rule with the guards."""


class _IntoGemm(_Guarded, FuseBatchNormIntoGemm):
    """onnxscript's Gemm rule with the guards."""


class FoldBatchNormPass(RewritePass):
    """``W' = W * g / sigma``, ``b' = (b - mu) * g / sigma + beta``: BatchNorm disappears into its producer.

    A thin name over onnxscript's rules, so recipes can refer to it, with the declines of :class:`_Guarded`.
    """

    def __init__(self) -> None:
        super().__init__([_IntoConv.rule(), _IntoConvTranspose.rule(), _IntoGemm.rule()])
