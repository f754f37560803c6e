"""Float-exact transforms: norm folding, rotations (and, to come, scale migration and learned transforms)."""

from __future__ import annotations

from qcompiler.passes.transform.equalize import EqualizeCrossLayerPass
from qcompiler.passes.transform.fold_norms import FoldNormGainsPass
from qcompiler.passes.transform.rotate import OnlineHadamardPass, RotateHeadsPass, RotateResidualPass
from qcompiler.passes.transform.zero_mean import LayerNormToRMSNormPass

__all__ = [
    "EqualizeCrossLayerPass", "FoldNormGainsPass", "LayerNormToRMSNormPass", "OnlineHadamardPass", "RotateHeadsPass",
    "RotateResidualPass",
]  # fmt: skip
