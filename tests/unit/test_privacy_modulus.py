"""The wrap-around bound refuses parameters whose noised sum could wrap modulo 2**64, and its noise tail holds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.privacy import SkellamParams, check_no_wrap, noise_bound, skellam_noise, skellam_tail, wrap_bound


def test_typical_rounds_fit_with_room_to_spare() -> None:
    params = SkellamParams(clip=1.0, bits=16, dim=1_000_000, noise_multiplier=1.0, min_contributors=100)
    bound = check_no_wrap(params, devices=10_000)
    assert bound.fits and bound.total < 2**50
    assert bound.signal == 10_000 * 2**15


def test_the_bound_refuses_parameters_that_would_overflow() -> None:
    # 2**32 steps per clip, weights up to 2**20 and 100,000 devices: 2**16.6 * 2**20 * 2**31 > 2**63.
    params = SkellamParams(clip=1.0, bits=32, dim=1000, noise_multiplier=1.0, min_contributors=100)
    with pytest.raises(ValueError, match=r"could wrap modulo 2\*\*64.*lower bits"):
        check_no_wrap(params, devices=100_000, weight_cap=2**20)
    # Noise alone can break it too: a huge multiplier on a large cohort.
    loud = SkellamParams(clip=1.0, bits=40, dim=10, noise_multiplier=1e6, min_contributors=1)
    assert not wrap_bound(
        devices=100, bits=40, weight_cap=1, local_variance=loud.local_variance, coordinates=11
    ).fits
    with pytest.raises(ValueError, match="noise"):
        check_no_wrap(loud, devices=100)


def test_a_bound_one_step_over_the_limit_is_refused_and_one_under_accepted() -> None:
    # Signal only (no noise): devices * weight_cap * 2**(bits-1) against 2**63 - 1.
    at_edge = wrap_bound(devices=2**20, bits=24, weight_cap=2**20, local_variance=0.0, coordinates=1)
    assert at_edge.signal == 2**63 and not at_edge.fits
    under = wrap_bound(devices=2**20 - 1, bits=24, weight_cap=2**20, local_variance=0.0, coordinates=1)
    assert under.fits


def test_a_sum_past_the_bound_really_reads_back_wrong() -> None:
    # Why the bound matters: past 2**63 the int64 reading of the uint64 sum flips sign.
    big = np.array([2**62], dtype=np.int64).view(np.uint64)
    total = big + big
    assert int(total.view(np.int64)[0]) != 2**63


@pytest.mark.parametrize("variance", [3.0, 400.0, 1e5])
def test_the_skellam_tail_bound_holds_empirically(variance: float) -> None:
    rng = np.random.default_rng(9)
    x = np.abs(skellam_noise(variance, 1_000_000, rng))
    for k in (1.0, 2.0, 3.0, 4.0):
        t = k * math.sqrt(variance)
        assert float(np.mean(x >= t)) <= skellam_tail(variance, t)


def test_the_noise_bound_is_the_smallest_that_meets_the_probability() -> None:
    t = noise_bound(1e6, 1000, 1e-12)
    assert 1000 * skellam_tail(1e6, t) <= 1e-12 < 1000 * skellam_tail(1e6, t - 1)
    assert 7 * 1000 < t < 12 * 1000  # about 8.5 standard deviations
