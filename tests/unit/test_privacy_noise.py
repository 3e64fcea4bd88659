"""The distributed Skellam noise: its moments, the variance of the devices' shares summed, and the integer rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.privacy import (
    SkellamParams,
    decode_total,
    honest_floor,
    noised_input,
    randomised_round,
    rounded_l2_bound,
    skellam_noise,
)


def _z(estimate: float, expected: float, std_error: float) -> float:
    return abs(estimate - expected) / std_error


@pytest.mark.parametrize("variance", [0.5, 7.0, 3e4, 2.5e7])
def test_skellam_noise_has_mean_zero_and_the_requested_variance(variance: float) -> None:
    rng = np.random.default_rng(11)
    n = 400_000
    x = skellam_noise(variance, n, rng)
    assert x.dtype == np.int64
    # Standard errors of the sample mean and variance (Skellam's excess kurtosis is 1 / variance).
    assert _z(float(x.mean()), 0.0, math.sqrt(variance / n)) < 5
    var_se = variance * math.sqrt((2.0 + 1.0 / variance) / n)
    assert _z(float(x.var()), variance, var_se) < 5


def test_the_sum_of_n_device_shares_has_the_target_variance() -> None:
    # Skellam is closed under summation: n shares of variance mu / n sum to variance mu, for any n survivors.
    params = SkellamParams(clip=1.0, bits=12, dim=20_000, noise_multiplier=0.8, min_contributors=10)
    rng = np.random.default_rng(5)
    for survivors in (10, 13):
        total = sum(skellam_noise(params.local_variance, params.dim, rng) for _ in range(survivors))
        expected = params.local_variance * survivors
        assert expected >= params.variance  # more survivors than the minimum: never less noise
        var_se = expected * math.sqrt(2.0 / params.dim)
        assert _z(float(np.var(total)), expected, var_se) < 5
        assert _z(float(np.mean(total)), 0.0, math.sqrt(expected / params.dim)) < 5


def test_the_devices_vectors_sum_to_the_clipped_updates_plus_the_calibrated_noise() -> None:
    params = SkellamParams(clip=2.0, bits=14, dim=5_000, noise_multiplier=1.2, min_contributors=8)
    rng = np.random.default_rng(8)
    updates = [rng.normal(0, 0.1, params.dim) for _ in range(8)]
    total = np.zeros(params.coordinates, dtype=np.uint64)
    for u in updates:
        total += noised_input(u, params, rng)
    decoded = decode_total(total, params)
    assert decoded.contributors == 8
    clipped_sum = np.sum([u * min(1.0, 2.0 / float(np.linalg.norm(u))) for u in updates], axis=0)
    error = decoded.total - clipped_sum
    # Noise std in update units is sqrt(variance) / scale; rounding adds at most 8 / scale per coordinate.
    std = math.sqrt(params.variance) / params.scale
    assert _z(float(np.std(error)), std, std * math.sqrt(2.0 / params.dim) * 2) < 5
    assert abs(float(np.mean(error))) < 5 * std / math.sqrt(params.dim)


def test_conditional_rounding_is_unbiased_and_keeps_the_integer_norm_bound() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 1_000)
    x *= 30.0 / np.linalg.norm(x)
    bound = rounded_l2_bound(30.0, x.size)
    assert bound < 30.0 + math.sqrt(x.size)  # the conditional bound is the tighter one here
    draws = np.stack([randomised_round(x, bound, rng) for _ in range(2_000)])
    assert (np.linalg.norm(draws, axis=1) <= bound).all()
    assert np.abs(draws - x).max() < 1.0
    # Rejection barely biases the rounding when beta is small relative to the spread; it stays within noise.
    assert np.abs(draws.mean(axis=0) - x).max() < 0.1


def test_conditional_rounding_redraws_until_the_norm_is_within_the_bound() -> None:
    # A bound near the typical rounded norm: plain rounding exceeds it about half the time.
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, 1_000)
    x *= 30.0 / np.linalg.norm(x)
    frac = x - np.floor(x)
    bound = math.sqrt(float(np.sum(x * x) + np.sum(frac * (1 - frac))))
    plain = np.floor(x) + (rng.random((500, x.size)) < frac)
    assert np.mean(np.linalg.norm(plain, axis=1) > bound) > 0.2
    draws = np.stack([randomised_round(x, bound, rng) for _ in range(500)])
    assert (np.linalg.norm(draws, axis=1) <= bound).all()


def test_the_integer_sensitivity_is_at_least_the_scaled_clip() -> None:
    params = SkellamParams(clip=0.5, bits=16, dim=1_000_000, noise_multiplier=1.0, min_contributors=100)
    assert params.scale * params.clip == (1 << 15) - 1
    assert params.scale * params.clip <= params.update_l2 <= params.scale * params.clip + 1_000
    assert params.variance == pytest.approx((params.noise_multiplier * params.l2_sensitivity) ** 2)
    assert params.local_variance * 100 == pytest.approx(params.variance)


def test_the_clip_bit_rides_as_one_more_coordinate_and_decodes_to_the_fraction_under() -> None:
    params = SkellamParams(
        clip=1.0, bits=16, dim=50, noise_multiplier=1.0, min_contributors=200, indicator_noise=2.0
    )
    kappa = params.indicator_scale
    assert kappa >= 1 and params.l2_sensitivity**2 == pytest.approx(params.update_l2**2 + kappa**2)
    assert params.indicator_std == pytest.approx(2.0, rel=0.05)
    rng = np.random.default_rng(4)
    total = np.zeros(params.coordinates, dtype=np.uint64)
    norms = [0.5] * 150 + [3.0] * 50  # 75 % under the clip
    for norm in norms:
        u = rng.normal(size=params.dim)
        total += noised_input(u * norm / np.linalg.norm(u), params, rng)
    decoded = decode_total(total, params)
    assert decoded.fraction_under is not None
    assert decoded.fraction_under == pytest.approx(0.75, abs=5 * params.indicator_std / 200)


def test_the_noise_is_calibrated_for_the_honest_minimum() -> None:
    assert honest_floor(100, 0.1) == 90
    assert honest_floor(3, 0.5) == 1
