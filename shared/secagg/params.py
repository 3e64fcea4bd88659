"""SecAgg+ parameters: neighbours per device, reconstruction threshold, quantisation.

The formulas follow Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+),
which replaces the complete graph of Bonawitz et al. (CCS 2017) by a random
k-regular graph with k = O(log n).
"""

from __future__ import annotations

import math
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


def derive_params(
    n: int,
    *,
    dropout: float = 0.2,
    corruption: float = 0.1,
    k: int | None = None,
    t: int | None = None,
    clip: float = 1.0,
    bits: int = 16,
    weight_cap: int = 2**20,
) -> SecAggParams:
    """Choose k and t for a cohort of ``n`` devices (SecAgg+, Bell et al., CCS 2020).

    Neighbours: ``k = min(n - 1, max(4, ceil(3 * log2 n)))``, raised by one when
    ``n * k`` is odd (no k-regular graph exists then). Bell et al. show that a
    random k-regular graph with k = O(log n) keeps both privacy and correctness
    with overwhelming probability; the factor 3 is the practical choice here
    (n = 10 gives the complete graph, 50 gives 17, 100 gives 20, 10 000 gives
    40). A device expands k + 1 masks, so k is the client's cost.

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

    Reachability: the expected survivors of a neighbourhood,
    ``k - floor(dropout * k)``, must still reach t; while they do not, k grows
    (keeping ``n * k`` even) up to ``n - 1``, and a ValueError says so when
    even the complete graph cannot reach t (dropout near or above one half).

    ``k`` and ``t`` given explicitly override the formulas and are only
    validated (``1 <= t <= k <= n - 1``, ``n * k`` even). With n = 2 the
    formula gives t = k = 1: the two devices are protected from the server,
    not from each other (the sum reveals the other's update anyway).

    The modulus is 2**64 (numpy uint64 wraps by itself); ``n * weight_cap *
    (2**bits - 1)`` must stay below it, or a ValueError says what to lower.
    """
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 devices, got n={n}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not 0 <= corruption < 1:
        raise ValueError(f"corruption must be in [0, 1), got {corruption}")
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
            while k - math.floor(dropout * k) < threshold(k) and k < n - 1:
                k += 1
                if not _regular_ok(n, k):
                    k = min(k + 1, n - 1)
            if k - math.floor(dropout * k) < threshold(k):
                raise ValueError(
                    f"with dropout={dropout} the expected survivors of a neighbourhood "
                    f"cannot reach the threshold even on the complete graph (n={n}): lower the dropout fraction"
                )
    else:
        if not 1 <= k <= n - 1:
            raise ValueError(f"k must be between 1 and n - 1 = {n - 1}, got k={k}")
        if not _regular_ok(n, k):
            raise ValueError(f"no {k}-regular graph exists on {n} devices (n * k is odd): choose an even k")
    if t is None:
        t = threshold(k)
    elif not 1 <= t <= k:
        raise ValueError(f"t must be between 1 and k = {k}, got t={t}")
    return SecAggParams(k=k, t=t, clip=clip, bits=bits, weight_cap=weight_cap)
