"""Float-exact transforms: norm folding, rotations AWQ's scale migration (and, to come, learned transforms)."""

from __future__ import annotations

from qcompiler.passes.transform.awq import ActivationAwareScalePass
from qcompiler.passes.transform.equalize import EqualizeCrossLayerPass
from qcompiler.passes.transform.fold_norms import FoldNormGainsPass
from qcompiler.passes.transform.rotate import OnlineHadamardPass, RotateHeadsPass, RotateResidualPass
from qcompiler.passes.transform.zero_mean import LayerNormToRMSNormPass

__all__ = [
    "ActivationAwareScalePass", "EqualizeCrossLayerPass", "FoldNormGainsPass", "LayerNormToRMSNormPass",
    "OnlineHadamardPass", "RotateHeadsPass", "RotateResidualPass",
]  # fmt: skip
