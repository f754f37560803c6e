"""The dyadic rescale: exactness of (b, c), the rounding rule at ties, requantize against big integers."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.dialect import quantize_multiplier, quantize_multiplier_pair, requantize, round_shift


@given(st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_multiplier_is_normalised_and_accurate(real: float) -> None:
    mult, shift = quantize_multiplier(real)
    assert 1 << 30 <= mult < 1 << 31
    assert 1 <= shift <= 62
    assert abs(Fraction(mult, 1 << shift) - Fraction(real)) <= Fraction(real) * Fraction(1, 1 << 31)


def test_mantissa_rounding_to_two_pow_31_is_renormalised() -> None:
    # the mantissa of 1 - 2^-40 rounds to 2^31: it must become 2^30 with one less shift, not overflow int32
    mult, shift = quantize_multiplier(1.0 - 2.0**-40)
    assert (mult, shift) == (1 << 30, 30)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, 2.0**31])
def test_multiplier_rejects_bad_factors(bad: float) -> None:
    with pytest.raises(ValueError, match="rescale factor"):
        quantize_multiplier(bad)


def test_pair_shares_the_shift() -> None:
    a, b, shift = quantize_multiplier_pair(0.3, 0.05)
    assert 1 << 30 <= a < 1 << 31
    assert abs(a / 2**shift - 0.3) < 1e-9 and abs(b / 2**shift - 0.05) < 1e-9


@pytest.mark.parametrize(
    ("value", "shift", "expected"),
    [(3, 1, 2), (-3, 1, -1), (1, 1, 1), (-1, 1, 0), (5, 2, 1), (6, 2, 2), (-6, 2, -1)],
)
def test_round_shift_ties_go_up(value: int, shift: int, expected: int) -> None:
    assert int(round_shift(np.array(value), np.array(shift))) == expected


@given(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(1 << 30, (1 << 31) - 1),
    st.integers(1, 62),
    st.integers(-20, 20),
)
def test_requantize_matches_exact_rational_rounding(acc: int, mult: int, shift: int, zero: int) -> None:
    exact = Fraction(acc * mult, 1 << shift)
    expected = math.floor(exact + Fraction(1, 2)) + zero  # round half up
    expected = max(-128, min(127, expected))
    got = requantize(np.array([acc], np.int32), np.array(mult, np.int32), np.array(shift, np.int32), zero_point=zero)
    assert int(got[0]) == expected
