"""SecAgg+ parameters: neighbours per device, reconstruction threshold, quantisation.

The formulas follow Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+),
which replaces the complete graph of Bonawitz et al. (CCS 2017) by a random
k-regular graph with k = O(log n).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

MODULUS_BITS = 64  # masked vectors are numpy uint64: every add wraps modulo 2**64


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round must agree on.

    ``k`` neighbours per device, ``t`` shares needed to reconstruct a secret,
    update values clipped to ``[-clip, clip]`` and quantised to ``bits`` bits,
    and ``weight_cap`` the largest example count a device may claim (it bounds
    the weighted sum so that the modulus cannot wrap).
    """

    k: int
    t: int
    clip: float
    bits: int = 16
    weight_cap: int = 2**20

    def __post_init__(self) -> None:
        if not 1 <= self.t <= self.k:
            raise ValueError(f"need 1 <= t <= k, got t={self.t}, k={self.k}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be between 1 and 32, got {self.bits}")
        if self.weight_cap < 1:
            raise ValueError(f"weight_cap must be at least 1, got {self.weight_cap}")

    @property
    def levels(self) -> int:
        """The largest quantised value, ``2**bits - 1``."""
        return (1 << self.bits) - 1


def modulus_ok(n: int, bits: int, weight_cap: int) -> bool:
    """True when the sum over ``n`` devices of ``n_i * q_i`` (and of ``n_i``) cannot wrap modulo 2**64.

    Each coordinate of a weighted input is at most ``weight_cap * (2**bits - 1)``
    and its last coordinate (the example count) at most ``weight_cap``.
    """
    limit = 1 << MODULUS_BITS
    return n * weight_cap * ((1 << bits) - 1) < limit and n * weight_cap < limit


def _regular_ok(n: int, k: int) -> bool:
    # A k-regular graph on n nodes exists iff k <= n - 1 and n * k is even.
    return k <= n - 1 and (n * k) % 2 == 0


DEFAULT_FAIL_PROB = 1e-4  # per round; why this value: derive_params's docstring


def neighbourhood_shortfall(k: int, t: int, dropout: float) -> float:
    """``P[Binomial(k, 1 - dropout) < t]``: the chance that fewer than t of a device's k neighbours survive.

    Each neighbour survives independently with probability ``1 - dropout``;
    the device's secrets can then not be rebuilt and the round is abandoned
    (Bell et al., CCS 2020, correctness of SecAgg+). The sum is exact up to
    floating point: it starts at the tail's term nearest the mode (``log C(k,
    j)`` from ``lgamma``: ``math.comb`` takes milliseconds at k in the
    thousands) and walks away from the mode until the rest of the tail,
    bounded by a geometric series, cannot change the result.
    """
    if t <= 0:
        return 0.0
    if t > k:
        return 1.0
    if dropout <= 0:
        return 0.0
    if dropout >= 1:
        return 1.0
    p = 1.0 - dropout
    if t - 1 < math.floor((k + 1) * p):  # the lower tail sits below the mode: sum it
        return _tail(k, p, t - 1, -1)
    return max(0.0, 1.0 - _tail(k, p, t, +1))  # it holds the mode: one minus the upper tail


def _pmf(k: int, p: float, j: int) -> float:
    # P[Binomial(k, p) = j], through logarithms: C(k, j) alone overflows a float from k = 1030 on.
    log_pmf = math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1)
    return math.exp(log_pmf + j * math.log(p) + (k - j) * math.log1p(-p))


def _tail(k: int, p: float, start: int, step: int) -> float:
    # Sum of the Binomial(k, p) pmf from ``start`` outwards (step -1 down to 0, +1 up to k), ``start`` on
    # the far side of the mode, where each term is the previous times a ratio that only shrinks.
    q = 1.0 - p
    term = _pmf(k, p, start)
    total = term
    j, end = start, (0 if step < 0 else k)
    while j != end:
        ratio = j * q / ((k - j + 1) * p) if step < 0 else (k - j) * p / ((j + 1) * q)
        term *= ratio
        j += step
        total += term
        # The rest is at most term * (ratio + ratio**2 + ...) since the ratio keeps shrinking.
        if ratio < 1 and term * ratio / (1 - ratio) <= total * 1e-17:
            break
    return min(total, 1.0)


def derive_params(
    n: int,
    *,
    dropout: float = 0.1,
    corruption: float = 0.1,
    k: int | None = None,
    t: int | None = None,
    clip: float = 1.0,
    bits: int = 16,
    weight_cap: int = 2**20,
    fail_prob: float = DEFAULT_FAIL_PROB,
) -> SecAggParams:
    """Choose k and t for a cohort of ``n`` devices (SecAgg+, Bell et al., CCS 2020).

    Neighbours start at ``k = min(n - 1, max(4, ceil(3 * log2 n)))``, raised
    by one when ``n * k`` is odd (no k-regular graph exists then). Bell et al.
    show that a random k-regular graph with k = O(log n) keeps both privacy
    and correctness with overwhelming probability. A device expands k + 1
    masks, so k is the client's cost.

    Threshold: ``t = max(floor(k / 2) + 1, ceil(corruption * k) + 1)``, at
    most k: the smallest strict majority of the neighbours unless corruption
    asks for more. ``t > k / 2`` carries the honest-majority argument of
    Bonawitz et al. into each neighbourhood (two disjoint sets of responders
    cannot both reach t, so a server that tells half the neighbours "v
    survived" and the other half "v dropped" still cannot rebuild both b_v
    and s_sk_v); ``t > corruption * k`` means the corrupted neighbours of a
    device cannot rebuild its secrets on their own. Small cohorts pay for
    this: n = 3 gives k = t = 2, so any dropout after sharing abandons the
    round.

    Reachability: each device drops independently with probability
    ``dropout``, so the survivors among a device's k neighbours are
    Binomial(k, 1 - dropout), and a device with fewer than t of them left
    makes the whole sum unrecoverable. k grows (keeping ``n * k`` even, up to
    ``n - 1``) until the union bound over the n neighbourhoods,
    ``n * P[Binomial(k, 1 - dropout) < t(k)]`` (``neighbourhood_shortfall``),
    is at most ``fail_prob``. The default 1e-4 makes this cause of an
    abandoned round rarer than one round in ten thousand at the stated
    dropout (the real rate is lower still, see below), a small cost beside
    the rounds that churn beyond the stated dropout abandons anyway; the tail
    falls exponentially in k, so each tenfold stricter bound costs about ten
    neighbours at n = 1000 and dropout 0.2 (k = 51, 61, 71 for 1e-3, 1e-4,
    1e-5), and k is the client's cost. The union bound needs no independence
    between neighbourhoods, which overlap, and it errs on the safe side: for
    the old k = 30 at n = 1000 it gives 0.23 where 0.06 is measured. With
    corruption 0.1, n = 100, 1000 and 10 000 get k = 23, 30 and 40 at dropout
    0.1 (the default); 51, 61 and 71 at 0.2; 99 (the complete graph), 155 and
    181 at 0.3. At dropout 0 the start value stands (n = 10 gives the
    complete graph, 50 gives 17, 100 gives 20, 1000 gives 30, 10 000 gives
    40). Asking only that the expected survivors ``k - floor(dropout * k)``
    reach t, as this rule did before, kept those start values at dropout 0.2
    too, and lost about one round of 1000 devices in fifteen.

    Small cohorts cannot meet the bound even on the complete graph (its union
    bound is 0.2 for n = 10 and 4e-3 for n = 30 at dropout 0.2). They get the
    complete graph, k = n - 1, as long as its expected survivors,
    ``k - floor(dropout * k)``, reach t: no graph tolerates more dropouts, it
    is the graph of Bonawitz et al.'s original protocol, and refusing would
    leave small cohorts without secure aggregation at the dropout rates
    deployments see. Only when even that fails (dropout near or above one
    half) does a ValueError say so, naming dropout and n.

    ``k`` and ``t`` given explicitly override the formulas. A k above
    ``n - 1`` (a spec written for more devices than checked in) is capped at
    ``n - 1``, the complete graph, and a t given with it is scaled by the same
    factor, rounded up, so its ratio to k (a majority, more than the
    corrupted share) never drops; abandoning the round instead would punish a
    smaller turnout than planned. What cannot be meant is still refused:
    ``k < 1``, ``t < 1`` or ``t > k`` as given, and an ``n * k`` that is odd.
    With n = 2 the formula gives t = k = 1: the two devices are protected
    from the server, not from each other (the sum reveals the other's update
    anyway).

    The modulus is 2**64 (numpy uint64 wraps by itself); ``n * weight_cap *
    (2**bits - 1)`` must stay below it, or a ValueError says what to lower.
    """
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 devices, got n={n}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0 <= corruption < 1:
        raise ValueError(f"corruption must be in [0, 1), got {corruption}")
    if not 0 < fail_prob < 1:
        raise ValueError(f"fail_prob must be in (0, 1), got {fail_prob}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")
    if weight_cap < 1:
        raise ValueError(f"weight_cap must be at least 1, got {weight_cap}")
    if not modulus_ok(n, bits, weight_cap):
        raise ValueError(
            f"the sum of {n} devices with weight_cap={weight_cap} and bits={bits} could wrap modulo 2**64: "
            "lower bits, weight_cap or the cohort size"
        )

    def threshold(kk: int) -> int:
        return min(kk, max(kk // 2 + 1, math.ceil(corruption * kk) + 1))

    if k is None:
        k = min(n - 1, max(4, math.ceil(3 * math.log2(n))))
        if not _regular_ok(n, k):
            k += 1  # k < n - 1 here, since n * (n - 1) is always even
        if t is None:
            k = _reachable_degree(n, k, dropout, threshold, fail_prob)
    else:
        if k < 1:
            raise ValueError(f"k must be at least 1, got k={k}")
        if t is not None and not 1 <= t <= k:
            raise ValueError(f"t must be between 1 and k = {k}, got t={t}")
        if k > n - 1:
            if t is not None:
                t = math.ceil(t * (n - 1) / k)
            k = n - 1
        if not _regular_ok(n, k):
            raise ValueError(f"no {k}-regular graph exists on {n} devices (n * k is odd): choose an even k")
    if t is None:
        t = threshold(k)
    elif not 1 <= t <= k:
        raise ValueError(f"t must be between 1 and k = {k}, got t={t}")
    return SecAggParams(k=k, t=t, clip=clip, bits=bits, weight_cap=weight_cap)


def _reachable_degree(
    n: int, k: int, dropout: float, threshold: Callable[[int], int], fail_prob: float
) -> int:
    # The smallest valid degree from k up whose n neighbourhoods all keep t survivors but with
    # probability fail_prob; else the complete graph if its expected survivors reach t.
    while not _meets_bound(n, k, threshold(k), dropout, fail_prob):
        if k >= n - 1:
            if k - math.floor(dropout * k) < threshold(k):
                raise ValueError(
                    f"with dropout={dropout} the expected survivors of a neighbourhood "
                    f"cannot reach the threshold even on the complete graph (n={n}): lower the dropout fraction"
                )
            return k
        k += 1
        if not _regular_ok(n, k):
            k = min(k + 1, n - 1)
    return k


def _meets_bound(n: int, k: int, t: int, dropout: float, fail_prob: float) -> bool:
    # The one term P[survivors = t - 1] already exceeds the bound for most k below the answer: checking
    # it first (O(1)) keeps a search that climbs to k in the thousands from summing every tail.
    if 1 <= t <= k and dropout > 0 and n * _pmf(k, 1.0 - dropout, t - 1) > fail_prob:
        return False
    return n * neighbourhood_shortfall(k, t, dropout) <= fail_prob
