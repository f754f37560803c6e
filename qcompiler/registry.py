"""Pass names usable in recipes -> factories. Users register their own with :func:`register_pass`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.version_converter import ConvertVersionPass

from qcompiler.passes.canonicalize import (
    ConvertConv1dToConv2dPass,
    ConvertInstanceNormToLayerNormPass,
    DecomposeBatchNormPass,
    DecomposeResizePass,
    FoldBatchNormPass,
    FoldConstantMultiOutputPass,
    FuseBiasAddPass,
    FuseHardSwishPass,
    FuseLayerNormPass,
    FuseRMSNormPass,
)
from qcompiler.passes.fuse import FuseIntegerLinearPass
from qcompiler.passes.lower import LowerNonlinearitiesPass, LowerQDQToIntegerPass
from qcompiler.passes.transform import (
    ActivationAwareScalePass,
    EqualizeCrossLayerPass,
    FoldNormGainsPass,
    LayerNormToRMSNormPass,
    OnlineHadamardPass,
    RotateHeadsPass,
    RotateResidualPass,
)


def _fold_constants(input_size_limit: int = 1 << 26, output_size_limit: int = 1 << 26) -> ir.passes.PassBase:
    return FoldConstantsPass(
        shape_inference=True, input_size_limit=input_size_limit, output_size_limit=output_size_limit
    )


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Convert the default domain to ``opset`` if the model's is older; never downgrade (a model at opset 23
    with RMSNormalization has no opset-21 form)."""

    def __init__(self, opset: int = 21) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) >= self.opset:
            return ir.passes.PassResult(model, modified=False)
        return ConvertVersionPass(self.opset, fallback=True)(model)


PASSES: dict[str, Callable[..., ir.passes.PassBase]] = {
    "upgrade-opset": UpgradeOpsetPass,
    "fold-constants": _fold_constants,
    "infer-shapes": ShapeInferencePass,
    "fold-batchnorm": FoldBatchNormPass,
    "fold-constant-multi-output": FoldConstantMultiOutputPass,
    "decompose-batchnorm": DecomposeBatchNormPass,
    "conv1d-to-conv2d": ConvertConv1dToConv2dPass,
    "decompose-resize": DecomposeResizePass,
    "instance-norm-to-layer-norm": ConvertInstanceNormToLayerNormPass,
    "fuse-bias-add": FuseBiasAddPass,
    "fuse-rms-norm": FuseRMSNormPass,
    "fuse-hardswish": FuseHardSwishPass,
    "fuse-layer-norm": FuseLayerNormPass,
    "remove-unused": RemoveUnusedNodesPass,
    "fold-norm-gains": FoldNormGainsPass,
    "layernorm-to-rmsnorm": LayerNormToRMSNormPass,
    "equalize-cross-layer": EqualizeCrossLayerPass,
    "awq-scales": ActivationAwareScalePass,
    "rotate-residual": RotateResidualPass,
    "rotate-heads": RotateHeadsPass,
    "online-hadamard": lambda targets=("mlp",): OnlineHadamardPass(tuple(targets)),
    "lower-qdq-to-integer": LowerQDQToIntegerPass,
    "lower-nonlinearities": LowerNonlinearitiesPass,
    "fuse-integer-linear": FuseIntegerLinearPass,
}


def register_pass(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory`` available to recipes under ``name``."""
    if not name or name in PASSES:
        raise ValueError(f"pass name {name!r} is empty or already registered")
    PASSES[name] = factory
