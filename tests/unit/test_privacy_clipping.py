"""L2 clipping never leaves an update above its bound, and the adaptive clip follows the target quantile."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.privacy import QuantileClip, clip_l2, l2_norm, under_clip, update_noise_multiplier

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
bounds = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=finite), bounds)
def test_a_clipped_update_never_exceeds_its_norm(update: np.ndarray, bound: float) -> None:
    clipped = clip_l2(update, bound)
    assert l2_norm(clipped.values) <= bound
    assert float(np.linalg.norm(clipped.values)) <= bound
    assert clipped.within == (l2_norm(update) <= bound)


@settings(max_examples=100, deadline=None)
@given(
    arrays(
        np.float32, st.integers(1, 100), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
    ),
    bounds,
)
def test_float32_updates_and_huge_values_clip_too(update: np.ndarray, bound: float) -> None:
    clipped = clip_l2(update, bound)
    assert clipped.values.dtype == np.float64
    assert l2_norm(clipped.values) <= bound


def test_an_update_within_the_norm_is_unchanged_and_one_above_keeps_its_direction() -> None:
    small = np.array([0.3, -0.4])
    assert np.array_equal(clip_l2(small, 1.0).values, small)
    big = np.array([3.0, -4.0])
    out = clip_l2(big, 1.0)
    assert not out.within and out.norm == 5.0
    assert np.allclose(out.values, [0.6, -0.8], rtol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_and_bounds_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_l2(np.array([1.0, bad]), 1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_l2(np.array([1.0]), bad)
    with pytest.raises(ValueError, match="clip"):
        clip_l2(np.array([1.0]), 0.0)


def test_the_clip_bit_is_one_exactly_when_the_norm_is_within() -> None:
    assert under_clip(1.0, 1.0) == 1
    assert under_clip(1.0 + 1e-12, 1.0) == 0


def test_the_geometric_update_moves_the_clip_toward_the_target_quantile() -> None:
    # Andrew et al. 2021: C <- C exp(-eta (b - gamma)); too many under the clip shrinks it, too few grows it.
    state = QuantileClip(clip=1.0, target_quantile=0.5, learning_rate=0.2)
    assert state.next(0.9).clip == pytest.approx(math.exp(-0.2 * 0.4))
    assert state.next(0.1).clip == pytest.approx(math.exp(0.2 * 0.4))
    assert state.next(0.5).clip == 1.0

    # With norms drawn from a known distribution, the clip settles at their target quantile.
    rng = np.random.default_rng(3)
    state = QuantileClip(clip=0.01, target_quantile=0.8, learning_rate=0.2, indicator_noise=5.0)
    for _ in range(400):
        norms = rng.lognormal(0.0, 0.5, 100)
        noised = (np.sum(norms <= state.clip) + rng.normal(0, state.indicator_noise)) / 100
        state = state.next(float(noised))
    assert state.clip == pytest.approx(np.exp(0.5 * 0.8416), rel=0.1)  # the 0.8 quantile of the lognormal


def test_the_update_noise_multiplier_leaves_the_total_budget_unchanged() -> None:
    # Andrew et al. 2021, Theorem 1: z**-2 = z_delta**-2 + (2 sigma_b)**-2.
    z, sigma_b = 1.0, 5.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError, match="no budget"):
        update_noise_multiplier(1.0, 0.5)


def test_values_whose_squares_overflow_still_clip() -> None:
    huge = np.full(4, 1e200)
    assert l2_norm(huge) == pytest.approx(2e200)
    out = clip_l2(huge, 3.0)
    assert l2_norm(out.values) <= 3.0 and np.allclose(out.values, 1.5)
    assert clip_l2(huge, 1e300).within and clip_l2(huge, 1e200).values[0] == pytest.approx(5e199)
