"""Privacy accounting: epsilon at delta after each round, noise calibration, and the budget check.

Gaussian rounds (central DP, ``central.py``; per-example DP-SGD) are
accounted by Google's ``dp-accounting`` package as it stands: a
``GaussianDpEvent`` with the round's noise multiplier, wrapped in
``PoissonSampledDpEvent`` for Poisson sampling of the cohort, or in
``SampledWithoutReplacementDpEvent`` for a uniformly drawn cohort of fixed
size, composed over the rounds by its RDP accountant (Mironov, Talwar and
Zhang 2019 for Poisson; Wang, Balle and Kasiviswanathan, AISTATS 2019, for
sampling without replacement) or its PLD accountant (Koskela et al. 2020;
Doroshenko et al. 2022; pessimistic discretisation, so an upper bound).

Distributed Skellam rounds (``skellam.py``) have no DpEvent in
``dp-accounting``, so their RDP curve is computed here and converted with
``dp-accounting``'s own RDP-to-(epsilon, delta) conversion
(``rdp_privacy_accountant.compute_epsilon``, Canonne, Kamath and Steinke
2020, Proposition 12 of arXiv 2004.00010). Each step is an upper bound:

1. Agarwal, Kairouz and Liu (NeurIPS 2021), the Skellam mechanism's RDP:
   for integer alpha > 1, integer L2 and L1 sensitivities D2 and D1 and
   noise variance mu per coordinate,
   ``eps(alpha) <= alpha D2**2 / (2 mu) + min(((2 alpha - 1) D2**2 + 6 D1) / (4 mu**2), 3 D1 / (2 mu))``:
   the Gaussian mechanism's RDP with the same variance plus the bracket,
   the price of the noise being integer. D2 and D1 are bounds on the
   rounded integer vector (``SkellamParams``), not the clip, and mu is the
   variance of ``min_contributors`` shares: more survivors add more noise,
   and the bound only falls as mu grows.
2. Poisson subsampling: the general upper bound of Zhu and Wang, "Poisson
   Subsampled Renyi Differential Privacy", ICML 2019, Theorem 6, valid for
   any mechanism at integer orders (the tight formula dp-accounting uses
   for the Gaussian needs properties proved only for the Gaussian). Never
   above the unsampled curve, which is kept where it is smaller.
3. Composition adds RDP curves, order by order (Mironov 2017).

Fixed-size sampling has no general RDP bound here, so Skellam rounds are
accounted with Poisson sampling or with none (sampling rate 1, always valid,
however the cohort was chosen). Sampling amplification is only claimed when
the coordinator really samples so, and keeps the draw from the adversary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

from shared.privacy.skellam import SkellamParams

Accountant = Literal["rdp", "pld"]
Sampling = Literal["none", "poisson", "fixed"]

# Integer orders: the Skellam bound and Zhu and Wang's subsampling bound hold at integer orders.
INTEGER_ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512)
PLD_DISCRETISATION = 1e-4  # dp-accounting's default value_discretization_interval


@dataclass(frozen=True)
class RoundCost:
    """What one released round cost, as the accountant needs it; build with :func:`gaussian_round` or :func:`skellam_round`.

    ``noise_multiplier``: the Gaussian mechanism's standard deviation over
    the L2 sensitivity (for Skellam, sqrt(variance) over the integer D2).
    ``sampling``, ``sampling_rate``: how the cohort was drawn and with what
    probability (or, for ``fixed``, ``cohort / population``). ``skellam``:
    (D2, D1, variance) of a Skellam round, None for a Gaussian one.
    """

    noise_multiplier: float
    sampling: Sampling = "none"
    sampling_rate: float = 1.0
    cohort: int | None = None
    population: int | None = None
    skellam: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}"
            )
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must lie in (0, 1], got {self.sampling_rate}")
        if self.sampling == "none" and self.sampling_rate != 1:
            raise ValueError("sampling 'none' means a sampling rate of 1")
        if self.sampling == "fixed" and (self.cohort is None or self.population is None):
            raise ValueError("fixed-size sampling needs the cohort and the population")
        if self.skellam is not None and self.sampling == "fixed":
            raise ValueError(
                "Skellam rounds are accounted with poisson sampling or none: there is no bound for fixed-size"
                " sampling of the Skellam mechanism here"
            )


def gaussian_round(
    noise_multiplier: float,
    sampling: Sampling = "none",
    *,
    sampling_rate: float = 1.0,
    cohort: int | None = None,
    population: int | None = None,
) -> RoundCost:
    """A Gaussian round: noise std ``noise_multiplier * clip`` on the sum of updates clipped to ``clip``.

    ``poisson``: each device joins with probability ``sampling_rate``.
    ``fixed``: ``cohort`` devices drawn uniformly from ``population``; the
    rate is their ratio. ``none``: no amplification claimed.
    """
    if sampling == "fixed":
        if cohort is None or population is None or not 1 <= cohort <= population:
            raise ValueError("fixed-size sampling needs 1 <= cohort <= population")
        sampling_rate = cohort / population
    return RoundCost(noise_multiplier, sampling, sampling_rate, cohort, population)


def skellam_round(
    params: SkellamParams, sampling: Sampling = "none", sampling_rate: float = 1.0
) -> RoundCost:
    """A distributed Skellam round with ``params``, its devices Poisson-sampled at ``sampling_rate`` (or not sampled)."""
    variance = params.variance
    return RoundCost(
        math.sqrt(variance) / params.l2_sensitivity,
        sampling,
        sampling_rate,
        skellam=(params.l2_sensitivity, params.l1_sensitivity, variance),
    )


def dp_event(cost: RoundCost) -> dp_accounting.DpEvent:
    """The ``dp-accounting`` event of a Gaussian round (ValueError for Skellam, which has none).

    Under fixed-size sampling the neighbouring relation is replacing one
    device (the population size is public), which doubles the sum's L2
    sensitivity to ``2 * clip``: the event's noise multiplier is halved.
    """
    if cost.skellam is not None:
        raise ValueError("a Skellam round has no dp-accounting event; it is accounted by its RDP curve")
    if cost.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            cost.sampling_rate, dp_accounting.GaussianDpEvent(cost.noise_multiplier)
        )
    if cost.sampling == "fixed":
        assert cost.population is not None and cost.cohort is not None
        return dp_accounting.SampledWithoutReplacementDpEvent(
            cost.population, cost.cohort, dp_accounting.GaussianDpEvent(cost.noise_multiplier / 2.0)
        )
    return dp_accounting.GaussianDpEvent(cost.noise_multiplier)


def _relation(costs: Sequence[RoundCost]) -> dp_accounting.NeighboringRelation:
    kinds = {c.sampling == "fixed" for c in costs}
    if len(kinds) > 1:
        raise ValueError(
            "one job accounts rounds under one neighbouring relation: fixed-size sampling or not"
        )
    fixed = kinds == {True}
    return (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if fixed
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )


def _runs(costs: Sequence[RoundCost]) -> list[tuple[RoundCost, int]]:
    # Consecutive equal rounds compose as one self-composed event: the usual job is one run.
    runs: list[tuple[RoundCost, int]] = []
    for cost in costs:
        if runs and runs[-1][0] == cost:
            runs[-1] = (cost, runs[-1][1] + 1)
        else:
            runs.append((cost, 1))
    return runs


def skellam_rdp(
    l2: float, l1: float, variance: float, orders: Sequence[int] = INTEGER_ORDERS
) -> npt.NDArray[np.float64]:
    """Agarwal, Kairouz and Liu (NeurIPS 2021, Theorem 3.5) RDP of one Skellam release at integer ``orders``."""
    a = np.asarray(orders, dtype=np.float64)
    if (a < 2).any() or (a != np.floor(a)).any():
        raise ValueError("the Skellam bound is for integer orders of at least 2")
    mu = float(variance)
    gaussian = a * l2 * l2 / (2.0 * mu)
    integer_price = np.minimum(
        ((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * mu * mu), 3.0 * l1 / (2.0 * mu)
    )
    return np.asarray(gaussian + integer_price, dtype=np.float64)


def poisson_subsampled_rdp(
    rdp_of: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
    q: float,
    orders: Sequence[int] = INTEGER_ORDERS,
) -> npt.NDArray[np.float64]:
    """Zhu and Wang (ICML 2019, Theorem 6): RDP at integer ``orders`` of any mechanism, Poisson-sampled at ``q``.

    ``rdp_of`` gives the unsampled mechanism's RDP at an array of integer
    orders. For each order alpha,
    ``(1/(alpha-1)) log[(1-q)**(alpha-1) (alpha q - q + 1) + C(alpha,2) q**2 (1-q)**(alpha-2) e**eps(2)
    + 3 sum_{l=3..alpha} C(alpha,l) q**l (1-q)**(alpha-l) e**((l-1) eps(l))]``,
    never above ``eps(alpha)`` itself.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    orders_arr = np.asarray(orders, dtype=np.int64)
    unsampled = rdp_of(orders_arr.astype(np.float64))
    if q == 1:
        return unsampled
    top = int(orders_arr.max())
    ls = np.arange(2, top + 1, dtype=np.float64)
    eps_l = rdp_of(ls)  # eps(l) for l = 2..top
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = np.empty(orders_arr.size, dtype=np.float64)
    for i, alpha in enumerate(orders_arr.tolist()):
        l_vals = ls[: alpha - 1]  # 2..alpha
        log_terms = (
            special.gammaln(alpha + 1)
            - special.gammaln(l_vals + 1)
            - special.gammaln(alpha - l_vals + 1)
            + l_vals * log_q
            + (alpha - l_vals) * log_1q
            + (l_vals - 1) * eps_l[: alpha - 1]
        )
        weights = np.full(l_vals.size, 3.0)
        weights[0] = 1.0  # the l = 2 term carries e**eps(2) with coefficient 1
        first = (alpha - 1) * log_1q + math.log(alpha * q - q + 1)
        log_a = special.logsumexp(np.concatenate(([first], log_terms)), b=np.concatenate(([1.0], weights)))
        out[i] = min(float(log_a) / (alpha - 1), float(unsampled[i]))
    return out


def _skellam_curve(cost: RoundCost, orders: Sequence[int]) -> npt.NDArray[np.float64]:
    assert cost.skellam is not None
    l2, l1, variance = cost.skellam

    def rdp_of(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return skellam_rdp(l2, l1, variance, a.astype(np.int64).tolist())

    return poisson_subsampled_rdp(rdp_of, cost.sampling_rate, orders)


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def epsilon_after_each(
    costs: Sequence[RoundCost], delta: float, accountant: Accountant = "rdp"
) -> list[float]:
    """Epsilon at ``delta`` after each of the rounds in ``costs`` (the composition of the first i + 1)."""
    _check_delta(delta)
    out: list[float] = []
    for i in range(len(costs)):
        out.append(epsilon(costs[: i + 1], delta, accountant))
    return out


def epsilon(costs: Sequence[RoundCost], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` of all the rounds in ``costs`` composed, with the RDP or the PLD accountant.

    Gaussian rounds go through ``dp-accounting``'s accountant of that kind
    with its defaults (what :func:`dp_event` of each round, composed there,
    gives); Skellam rounds need ``rdp`` (their bound is an RDP bound), and
    a ledger holding them is accounted at :data:`INTEGER_ORDERS`, its
    Gaussian rounds by ``dp-accounting``'s RDP at the same orders.
    """
    _check_delta(delta)
    if not costs:
        return 0.0
    relation = _relation(costs)
    runs = _runs(costs)
    has_skellam = any(c.skellam is not None for c, _ in runs)
    if accountant == "pld":
        if has_skellam:
            raise ValueError(
                "the PLD accountant has no Skellam mechanism: account device-level rounds with rdp"
            )
        if relation == dp_accounting.NeighboringRelation.REPLACE_ONE:
            raise ValueError(
                "the PLD accountant has no sampling without replacement: account fixed-size cohorts with rdp"
            )
        pld = dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETISATION)
        for cost, count in runs:
            pld.compose(dp_event(cost), count)
        return float(pld.get_epsilon(delta))
    if accountant != "rdp":
        raise ValueError(f"accountant must be rdp or pld, got {accountant!r}")
    orders = list(INTEGER_ORDERS) if has_skellam else None
    rdp = dp_accounting.rdp.RdpAccountant(orders, relation)
    for cost, count in runs:
        if cost.skellam is None:
            rdp.compose(dp_event(cost), count)
    if not has_skellam:
        return float(rdp.get_epsilon(delta))
    curve = np.array(rdp.rdp, dtype=np.float64)
    for cost, count in runs:
        if cost.skellam is not None:
            curve = curve + count * _skellam_curve(cost, INTEGER_ORDERS)
    eps, _ = rdp_privacy_accountant.compute_epsilon(list(INTEGER_ORDERS), curve.tolist(), delta)
    return float(eps)


def next_round_fits(
    spent: Sequence[RoundCost],
    next_round: RoundCost,
    target_epsilon: float,
    delta: float,
    accountant: Accountant = "rdp",
) -> bool:
    """Whether running ``next_round`` after the ``spent`` rounds keeps epsilon at ``delta`` within ``target_epsilon``.

    Asked before the round starts, with the round's own cost (its sampling
    rate, its noise): a False answer means the job stops with the budget
    unspent rather than overspent. Charge a round as spent once its sum is
    unmasked (or its noised aggregate computed), whether or not the model
    is then applied.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    return epsilon([*spent, next_round], delta, accountant) <= target_epsilon


def calibrate_noise_multiplier(
    make_round: Callable[[float], RoundCost],
    rounds: int,
    target_epsilon: float,
    delta: float,
    accountant: Accountant = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within ``rel_tol``) whose ``rounds`` rounds stay within ``target_epsilon`` at ``delta``.

    ``make_round(z)`` builds one round's cost with noise multiplier z
    (e.g. ``lambda z: gaussian_round(z, "poisson", sampling_rate=0.1)``, or
    a Skellam round from ``SkellamParams(noise_multiplier=z, ...)``).
    Bisection on z, epsilon falling as z grows: the answer is always the
    upper end of the final bracket, so its epsilon never exceeds the
    target; it lies within ``rel_tol`` of the exact multiplier.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")

    def eps(z: float) -> float:
        return epsilon([make_round(z)] * rounds, delta, accountant)

    # A bracket with eps(lo) > target >= eps(hi), by doubling or halving from 1.
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(
                f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon} at delta {delta}"
            )
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
        if lo < 1e-3:
            return hi  # a budget this loose needs almost no noise; tinier multipliers are not worth finding
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2.0
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def dpsgd_costs(noise_multiplier: float, sampling_rate: float, steps: int) -> list[RoundCost]:
    """One device's DP-SGD in one round (example level): ``steps`` Poisson-sampled Gaussian steps.

    Each step of DP-SGD (Abadi et al., CCS 2016) releases the sum of the
    per-example gradients of a Poisson sample at rate ``sampling_rate``, each
    clipped to ``clip``, plus ``N(0, (noise_multiplier * clip)^2)`` per
    coordinate: the Poisson-sampled Gaussian mechanism of
    :func:`gaussian_round`, once per step, the unit being one example of the
    device's data. ``shared.privacy.example.DpSgdReport`` gives the three
    values; append the list to the device's ledger and call :func:`epsilon`.
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    return [gaussian_round(noise_multiplier, "poisson", sampling_rate=sampling_rate)] * steps


def calibrate_dpsgd(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: Accountant = "rdp",
    rel_tol: float = 1e-3,
) -> float:
    """The noise multiplier whose DP-SGD over ``rounds`` rounds of ``steps_per_round`` steps stays within ``target_epsilon``.

    Per device, for the rounds it is planned to take part in (all of them
    unless the cohort samples): :func:`calibrate_noise_multiplier` over
    ``rounds * steps_per_round`` steps at ``sampling_rate``, so its epsilon
    at ``delta`` never exceeds the target.
    """
    if steps_per_round < 1:
        raise ValueError(f"steps_per_round must be at least 1, got {steps_per_round}")
    return calibrate_noise_multiplier(
        lambda z: gaussian_round(z, "poisson", sampling_rate=sampling_rate),
        rounds * steps_per_round,
        target_epsilon,
        delta,
        accountant,
        rel_tol,
    )
