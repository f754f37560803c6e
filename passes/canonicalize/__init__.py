"""Canonicalization: bring any exported graph to the one form the later passes expect."""

from __future__ import annotations

from qcompiler.passes.canonicalize.conv1d import ConvertConv1dToConv2dPass
from qcompiler.passes.canonicalize.decompose_batchnorm import DecomposeBatchNormPass
from qcompiler.passes.canonicalize.fold_batchnorm import FoldBatchNormPass
from qcompiler.passes.canonicalize.fold_multi_output import FoldConstantMultiOutputPass
from qcompiler.passes.canonicalize.fuse_bias_add import FuseBiasAddPass
from qcompiler.passes.canonicalize.hardswish import FuseHardSwishPass
from qcompiler.passes.canonicalize.instance_norm import ConvertInstanceNormToLayerNormPass
from qcompiler.passes.canonicalize.layer_norm import FuseLayerNormPass
from qcompiler.passes.canonicalize.resize import DecomposeResizePass
from qcompiler.passes.canonicalize.rms_norm import FuseRMSNormPass

__all__ = [
    "ConvertConv1dToConv2dPass",
    "ConvertInstanceNormToLayerNormPass",
    "DecomposeBatchNormPass",
    "DecomposeResizePass",
    "FoldBatchNormPass",
    "FoldConstantMultiOutputPass",
    "FuseBiasAddPass",
    "FuseHardSwishPass",
    "FuseLayerNormPass",
    "FuseRMSNormPass",
]
