"""Issue 21, the zoo: every family of qcompiler.testing.zoo (transformers' own classes, random weights, small odd
sizes) either compiles integer-only with every op within one step of its simulation and centred cosine >= 0.99
to float on held-out inputs (or, where the float model itself falls below 0.99 under int8-level input noise, is
reported ill-conditioned with the same integer-only and op-by-op guarantees), or is refused by a named,
user-facing error and listed, with its reason, in EXPECTED_REFUSALS. Anything else (low accuracy, an internal
error) fails.

``benchmarks/bench_zoo.py`` runs the same evaluation and prints the table."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="pip install -e '.[models]'")
pytest.importorskip("skimage", reason="pip install -e '.[dev]'")

from qcompiler.testing.zoo import COSINE_FLOOR, EXPECTED_REFUSALS, FAMILIES, evaluate_family

pytestmark = [pytest.mark.slow, pytest.mark.tvm]


def test_the_zoo_is_wide_and_its_refusals_are_documented() -> None:
    assert len(FAMILIES) >= 27
    assert set(EXPECTED_REFUSALS) <= set(FAMILIES)
    assert all(reason.strip() for reason in EXPECTED_REFUSALS.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_compiles_or_is_refused_by_name(family: str) -> None:
    result = evaluate_family(family)
    if result.outcome == "refused":
        assert family in EXPECTED_REFUSALS, (
            f"{family} refused by {result.error_type}, not listed in EXPECTED_REFUSALS: {result.detail}"
        )
        return
    where = f" at {result.error_site}" if result.error_site else ""
    assert result.outcome in ("ok", "ill-conditioned"), (
        f"{family}: {result.outcome} ({result.error_type}{where}): {result.detail}"
    )
    assert not result.float_ops
    assert result.lowering_matches
    if result.outcome == "ill-conditioned":  # the float model itself cannot hold the floor under int8-level noise
        assert result.noise_cosine is not None and result.noise_cosine < COSINE_FLOOR
        return
    assert result.cosine is not None and result.cosine >= COSINE_FLOOR
    assert family not in EXPECTED_REFUSALS, f"{family} now compiles: drop it from EXPECTED_REFUSALS"
