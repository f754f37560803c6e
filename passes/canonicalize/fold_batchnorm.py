"""Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm (onnxscript's rules)."""

from __future__ import annotations

from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)


class FoldBatchNormPass(RewritePass):
    """``W' = W * g / sigma``, ``b' = (b - mu) * g / sigma + beta``: BatchNorm disappears into its producer.

    A thin name over onnxscript's rule set, so recipes can refer to it; the rules are onnxscript's own.
    """

    def __init__(self) -> None:
        super().__init__(
            [
                fuse_batchnorm_into_conv_rule,
                fuse_batchnorm_into_conv_transpose_rule,
                fuse_batchnorm_into_gemm_rule,
            ]
        )
