"""The wrap-around bound: a noised sum modulo 2**64 must read back as the true signed sum.

SecAgg+ adds the devices' vectors modulo 2**64 (``shared/secagg/params.py``);
the signed values of the distributed Skellam mechanism
(``shared/privacy/skellam.py``) are read back from the sum in two's
complement, which is the true sum only while every coordinate lies in
``[-2**63, 2**63)``. The papers choose a small modulus and clip modularly,
accepting rare wrap-arounds (Kairouz et al., ICML 2021, section 4.2); with
64 bits there is room for a bound that holds outright for the signal and
with negligible failure probability for the noise, so parameters that break
it are refused instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.privacy.skellam import SkellamParams

SIGNED_LIMIT = (1 << 63) - 1  # the largest coordinate the int64 reading of a uint64 sum gives back
DEFAULT_WRAP_PROB = 2.0**-40  # per round, over all coordinates: far below every other failure of a round


def skellam_tail(variance: float, t: float) -> float:
    """An upper bound on ``P[|X| >= t]`` for X ~ Skellam(variance), from the moment generating function.

    ``E exp(theta X) = exp(mu (cosh theta - 1))``, so Chernoff's bound with
    the best ``theta = asinh(t / mu)`` gives, for each tail,
    ``exp(mu (sqrt(1 + (t / mu)**2) - 1) - t asinh(t / mu))``; twice that
    for both.
    """
    if variance <= 0:
        return 0.0 if t > 0 else 1.0
    if t <= 0:
        return 1.0
    r = t / variance
    log_one = variance * (math.sqrt(1.0 + r * r) - 1.0) - t * math.asinh(r)
    return min(1.0, 2.0 * math.exp(log_one))


def noise_bound(variance: float, coordinates: int, wrap_prob: float = DEFAULT_WRAP_PROB) -> int:
    """The smallest integer t with ``coordinates * P[|Skellam(variance)| >= t] <= wrap_prob`` (union bound)."""
    if coordinates < 1 or not 0 < wrap_prob < 1:
        raise ValueError("coordinates must be at least 1 and wrap_prob in (0, 1)")
    if variance <= 0:
        return 0
    per = wrap_prob / coordinates
    hi = 1
    while skellam_tail(variance, hi) > per:
        hi *= 2
    lo = hi // 2  # the tail at lo is above per (or lo is 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if skellam_tail(variance, mid) > per:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class WrapBound:
    """How large a coordinate of the noised sum can get: the signal for sure, the noise but with ``wrap_prob``."""

    signal: int
    noise: int
    wrap_prob: float

    @property
    def total(self) -> int:
        """The largest magnitude of a coordinate of the sum, but with probability ``wrap_prob``."""
        return self.signal + self.noise

    @property
    def fits(self) -> bool:
        """Whether that magnitude reads back exactly from the int64 view of the sum modulo 2**64."""
        return self.total <= SIGNED_LIMIT


def wrap_bound(
    *,
    devices: int,
    bits: int,
    weight_cap: int,
    local_variance: float,
    coordinates: int,
    indicator_scale: int = 0,
    wrap_prob: float = DEFAULT_WRAP_PROB,
) -> WrapBound:
    """The bound for ``devices`` contributors (the most a round can have: the cohort target, not its minimum).

    Signal: a device's clipped update scaled to ``2**(bits - 1) - 1`` steps
    per clip has every coordinate within ``2**(bits - 1)`` after rounding
    (``|x_j| <= ||x|| <= clip``, and rounding moves it by less than one), the
    clip bit within ``indicator_scale``, the count within 1; times its weight
    (at most ``weight_cap``; 1 under DP, see ``skellam.py``) and summed over
    the devices. Noise: the sum of the devices' shares is
    Skellam(``devices * local_variance``); with probability at least
    ``1 - wrap_prob`` none of the ``coordinates`` exceeds
    :func:`noise_bound` in magnitude.
    """
    if devices < 1 or weight_cap < 1 or not 1 <= bits <= 62 or indicator_scale < 0:
        raise ValueError("devices and weight_cap must be at least 1, bits in [1, 62], indicator_scale >= 0")
    per_device = max(1 << (bits - 1), indicator_scale, 1)
    signal = devices * weight_cap * per_device
    noise = noise_bound(devices * local_variance, coordinates, wrap_prob)
    return WrapBound(signal, noise, wrap_prob)


def check_no_wrap(
    params: SkellamParams, devices: int, weight_cap: int = 1, wrap_prob: float = DEFAULT_WRAP_PROB
) -> WrapBound:
    """The :func:`wrap_bound` of a round with ``params`` and at most ``devices`` contributors; ValueError if it does not fit.

    The message says what to lower. Call it when a round's parameters are
    fixed (the cohort target is known), before any device adds noise.
    """
    if devices < params.min_contributors:
        raise ValueError(
            f"devices ({devices}) must be at least the min_contributors ({params.min_contributors}) "
            "the noise is calibrated for"
        )
    bound = wrap_bound(
        devices=devices,
        bits=params.bits,
        weight_cap=weight_cap,
        local_variance=params.local_variance,
        coordinates=params.coordinates - 1,
        indicator_scale=params.indicator_scale,
        wrap_prob=wrap_prob,
    )
    if not bound.fits:
        raise ValueError(
            f"the noised sum of {devices} devices could wrap modulo 2**64: a coordinate may reach "
            f"{bound.signal} (signal) + {bound.noise} (noise) > 2**63 - 1; lower bits (now {params.bits}), "
            f"the weight cap (now {weight_cap}), the noise multiplier or the cohort size"
        )
    return bound
