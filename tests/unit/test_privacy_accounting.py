"""The accountant: epsilon equal to dp-accounting's own, Skellam bounded above honestly, calibration and budget never overspent."""

from __future__ import annotations

import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from shared.privacy import SkellamParams
from shared.privacy.accounting import (
    INTEGER_ORDERS,
    RoundCost,
    calibrate_noise_multiplier,
    dp_event,
    epsilon,
    epsilon_after_each,
    gaussian_round,
    next_round_fits,
    poisson_subsampled_rdp,
    skellam_rdp,
    skellam_round,
)

DELTA = 1e-5
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns about fractional orders it skips


def _direct_rdp(event: dp_accounting.DpEvent, relation: dp_accounting.NeighboringRelation) -> float:
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def _direct_pld(event: dp_accounting.DpEvent) -> float:
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def test_poisson_sampled_gaussian_epsilon_equals_dp_accounting_rdp_and_pld() -> None:
    # 1,000 devices, cohorts of 100 drawn by Poisson sampling (q = 0.1), 20 rounds at noise multiplier 1.
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 20
    )
    rounds = [gaussian_round(1.0, "poisson", sampling_rate=0.1)] * 20
    assert epsilon(rounds, DELTA, "rdp") == _direct_rdp(event, ADD_REMOVE)
    assert epsilon(rounds, DELTA, "pld") == _direct_pld(event)
    assert epsilon(rounds, DELTA, "rdp") == pytest.approx(4.224, abs=1e-3)
    assert epsilon(rounds, DELTA, "pld") == pytest.approx(3.591, abs=1e-3)


def test_unsampled_and_fixed_size_rounds_equal_dp_accounting() -> None:
    plain = [gaussian_round(2.0)] * 5
    assert epsilon(plain, DELTA) == _direct_rdp(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 5), ADD_REMOVE
    )
    # A fixed cohort of 100 of 1,000 is sampling without replacement, under replacing one device:
    # the sum's sensitivity is twice the clip, so the event's multiplier is half the round's.
    fixed = [gaussian_round(2.0, "fixed", cohort=100, population=1000)] * 5
    assert dp_event(fixed[0]) == dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 100, dp_accounting.GaussianDpEvent(1.0)
    )
    assert epsilon(fixed, DELTA) == _direct_rdp(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(1000, 100, dp_accounting.GaussianDpEvent(1.0)), 5
        ),
        dp_accounting.NeighboringRelation.REPLACE_ONE,
    )
    with pytest.raises(ValueError, match="one neighbouring relation"):
        epsilon([plain[0], fixed[0]], DELTA)
    with pytest.raises(ValueError, match="without replacement"):
        epsilon(fixed, DELTA, "pld")


def test_epsilon_after_each_round_grows_and_ends_at_the_whole_job() -> None:
    rounds = [gaussian_round(1.0, "poisson", sampling_rate=0.1)] * 6
    series = epsilon_after_each(rounds, DELTA)
    assert all(a < b for a, b in zip(series, series[1:], strict=False))
    assert series[-1] == epsilon(rounds, DELTA)


def test_skellam_rdp_is_the_papers_bound_converted_by_dp_accounting() -> None:
    params = SkellamParams(clip=1.0, bits=10, dim=10_000, noise_multiplier=1.0, min_contributors=50)
    d2, d1, mu = params.l2_sensitivity, params.l1_sensitivity, params.variance
    a = np.array(INTEGER_ORDERS, dtype=np.float64)
    by_hand = a * d2**2 / (2 * mu) + np.minimum(
        ((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
    )
    assert np.allclose(skellam_rdp(d2, d1, mu), by_hand, rtol=1e-12)
    expected, _ = rdp_privacy_accountant.compute_epsilon(list(INTEGER_ORDERS), (10 * by_hand).tolist(), DELTA)
    assert epsilon([skellam_round(params)] * 10, DELTA) == pytest.approx(expected, rel=1e-12)


def test_skellam_is_never_cheaper_than_the_gaussian_with_the_same_variance() -> None:
    # The Skellam bound is the Gaussian's RDP plus a non-negative price for integer noise.
    for bits, z in ((8, 0.7), (16, 1.0), (20, 3.0)):
        params = SkellamParams(clip=1.0, bits=bits, dim=100_000, noise_multiplier=z, min_contributors=100)
        skellam = epsilon([skellam_round(params, "poisson", 0.1)] * 20, DELTA)
        gaussian = epsilon([gaussian_round(z, "poisson", sampling_rate=0.1)] * 20, DELTA)
        assert skellam >= gaussian
    gaussian_at_integer_orders = INTEGER_ORDERS[0] / (2.0 * 16.0)
    assert skellam_rdp(4.0, 16.0, 16.0 * 16.0)[0] > gaussian_at_integer_orders


def test_the_general_subsampling_bound_is_above_the_tight_gaussian_one_and_close_to_it() -> None:
    # Zhu and Wang's Theorem 6 holds for any mechanism: on the Gaussian it must not undercut the exact
    # Poisson-subsampled Gaussian RDP that dp-accounting computes.
    q, z = 0.05, 1.1
    orders = list(range(2, 65))
    general = poisson_subsampled_rdp(lambda a: a / (2 * z * z), q, orders)
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    tight = np.asarray(acc.rdp)
    assert (general >= tight * (1 - 1e-9)).all()
    assert (general <= 3.5 * tight + 1e-12).all()
    assert (general <= np.asarray(orders) / (2 * z * z)).all()  # never above the unsampled curve


def test_the_general_subsampling_bound_is_zhu_and_wangs_formula() -> None:
    # At order 3 the sum has three terms: (1-q)**2 (2q + 1), 3 q**2 (1-q) e**eps(2), and 3 * q**3 e**(2 eps(3)).
    q = 0.2

    def eps(a: np.ndarray) -> np.ndarray:
        return 0.5 * a

    by_hand = (
        math.log(
            (1 - q) ** 2 * (3 * q - q + 1) + 3 * q**2 * (1 - q) * math.exp(1.0) + 3 * q**3 * math.exp(2 * 1.5)
        )
        / 2
    )
    assert poisson_subsampled_rdp(eps, q, [3])[0] == pytest.approx(by_hand, rel=1e-12)


def test_pld_is_refused_for_skellam_rounds() -> None:
    params = SkellamParams(clip=1.0, bits=16, dim=10, noise_multiplier=1.0, min_contributors=5)
    with pytest.raises(ValueError, match="rdp"):
        epsilon([skellam_round(params)], DELTA, "pld")


@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibration_reaches_the_target_epsilon_within_tolerance_and_never_above(target: float) -> None:
    def make(z: float) -> RoundCost:
        return gaussian_round(z, "poisson", sampling_rate=0.1)

    z = calibrate_noise_multiplier(make, 20, target, DELTA, rel_tol=1e-3)
    reached = epsilon([make(z)] * 20, DELTA)
    assert reached <= target
    assert reached >= 0.99 * target
    assert epsilon([make(z * (1 - 2e-3))] * 20, DELTA) > target  # a little less noise would overspend


def test_skellam_calibration_never_exceeds_the_target() -> None:
    def make(z: float) -> RoundCost:
        return skellam_round(
            SkellamParams(clip=1.0, bits=16, dim=10_000, noise_multiplier=z, min_contributors=80),
            "poisson",
            0.1,
        )

    z = calibrate_noise_multiplier(make, 20, 3.0, DELTA)
    reached = epsilon([make(z)] * 20, DELTA)
    assert 0.99 * 3.0 <= reached <= 3.0


def test_pld_calibration_never_exceeds_the_target() -> None:
    # Unsampled rounds: the PLD of a Poisson-sampled Gaussian takes a second each, too slow to bisect here.
    z = calibrate_noise_multiplier(gaussian_round, 4, 2.0, DELTA, accountant="pld", rel_tol=1e-2)
    assert 0.97 * 2.0 <= epsilon([gaussian_round(z)] * 4, DELTA, "pld") <= 2.0


def test_the_budget_check_stops_before_overspending() -> None:
    target = 3.0  # one round at z = 1, q = 0.1 already costs 2.1 at delta = 1e-5
    spent: list[RoundCost] = []
    for _ in range(1000):
        cost = gaussian_round(1.0, "poisson", sampling_rate=0.1)
        if not next_round_fits(spent, cost, target, DELTA):
            break
        spent.append(cost)
    assert 0 < len(spent) < 1000
    assert epsilon(spent, DELTA) <= target  # never overspent
    assert epsilon([*spent, spent[-1]], DELTA) > target  # and stopped only when the next round would
    assert not math.isnan(epsilon(spent, DELTA))
