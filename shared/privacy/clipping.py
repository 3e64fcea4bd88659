"""L2 clipping of an update, and the adaptive clip that follows a quantile of the update norms.

Clipping bounds what one device can add to the sum, the sensitivity every
noise calibration in this package starts from (Abadi et al., CCS 2016;
McMahan et al., ICLR 2018). The adaptive clip is Andrew, Thakkar, McMahan and
Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS
2021: each device also reports one bit, whether its update norm was at most
the clip; the noised fraction of such devices moves the clip geometrically
toward a target quantile of the norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

_SHRINK = 1.0 - 2.0**-50  # a few ulps below one: each retry of clip_l2 shrinks the factor by that much
_MAX_SHRINKS = 64


def l2_norm(values: np.ndarray) -> float:
    """The L2 norm of ``values`` in float64, without overflow or underflow of the squares.

    Dividing by the largest magnitude first keeps the squares in range: a
    vector of 1e200s has a finite norm, which ``sqrt(sum(x**2))`` would call
    infinite. Non-finite values raise ValueError.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("update holds non-finite values (NaN or infinity)")
    if x.size == 0:
        return 0.0
    peak = float(np.max(np.abs(x)))
    if peak == 0.0:
        return 0.0
    scaled = x / peak
    return peak * math.sqrt(float(np.dot(scaled, scaled)))


@dataclass(frozen=True)
class Clipped:
    """An update clipped to an L2 norm: the float64 values, the norm before clipping, and whether it was within."""

    values: F64
    norm: float
    within: bool


def clip_l2(update: np.ndarray, bound: float) -> Clipped:
    """``update * min(1, bound / ||update||)`` as float64, its :func:`l2_norm` never above ``bound``.

    The factor ``bound / norm`` rounds, and so do the products, so the
    clipped norm can come out an ulp or two above the bound; the factor then
    shrinks by a few ulps until :func:`l2_norm` of the result is at most the
    bound, by this function and by ``np.linalg.norm`` alike (a couple of
    tries at most). ``within`` is the bit that adaptive
    clipping sums (:func:`under_clip`): the norm was at most the bound, and
    the values are the update's, unchanged. Non-finite values raise
    ValueError, as does a bound that is not a positive finite number.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"clip must be a positive finite number, got {bound}")
    x = np.array(update, dtype=np.float64).ravel()
    norm = l2_norm(x)
    within = norm <= bound
    if within and _at_most(x, bound):
        return Clipped(x, norm, True)
    factor = min(1.0, bound / norm)
    for _ in range(_MAX_SHRINKS):
        factor *= _SHRINK
        out = x * factor
        if _at_most(out, bound):
            return Clipped(out, norm, within)
    raise AssertionError("clip_l2 could not bring the norm under the bound")  # unreachable: see _SHRINK


def _at_most(values: F64, bound: float) -> bool:
    # Both ways of computing the norm that a reader may check with: ours, and numpy's plain one (whose
    # squares overflow to infinity past 1e154, where only ours can answer).
    with np.errstate(over="ignore"):
        plain = float(np.linalg.norm(values))
    return l2_norm(values) <= bound and (plain <= bound or math.isinf(plain))


def under_clip(norm: float, clip: float) -> int:
    """The bit a device reports for adaptive clipping: 1 when its update norm was at most the clip, else 0.

    It travels in the same masked vector as the update, as one more integer
    coordinate with its own share of noise (``shared/privacy/skellam.py``,
    ``indicator_noise``), so the coordinator only ever sees the noised count
    of such devices, never one device's bit.
    """
    return 1 if norm <= clip else 0


@dataclass(frozen=True)
class QuantileClip:
    """The state and settings of the adaptive clip (Andrew et al., NeurIPS 2021, Algorithm 1).

    ``clip`` is this round's clip; ``target_quantile`` (gamma) is the share
    of devices whose norm should end up under the clip (0.5 tracks the
    median norm); ``learning_rate`` (eta_C) the step of the geometric update;
    ``indicator_noise`` (sigma_b) the standard deviation of the noise on the
    count of devices under the clip, in devices (the paper suggests the
    expected cohort size over 20).
    """

    clip: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    indicator_noise: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must lie in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        if not (math.isfinite(self.indicator_noise) and self.indicator_noise > 0):
            raise ValueError(f"indicator_noise must be a positive finite number, got {self.indicator_noise}")

    def next(self, noised_fraction_under: float) -> QuantileClip:
        """The next round's state: ``clip * exp(-eta_C * (b - gamma))`` with b the noised fraction under the clip.

        Geometric, so the clip stays positive and moves by the same factor
        whatever its scale. ``b`` is noised and may leave [0, 1]; it is used
        as it is, as in the paper (clamping it would bias the update).
        """
        if not math.isfinite(noised_fraction_under):
            raise ValueError(f"the noised fraction must be finite, got {noised_fraction_under}")
        factor = math.exp(-self.learning_rate * (noised_fraction_under - self.target_quantile))
        return QuantileClip(
            self.clip * factor, self.target_quantile, self.learning_rate, self.indicator_noise
        )


def update_noise_multiplier(noise_multiplier: float, indicator_noise: float) -> float:
    """The noise multiplier left for the update when the clip bit shares the round's budget.

    Andrew et al. (NeurIPS 2021, Theorem 1): releasing the update sum with
    noise multiplier z_delta and the centred bit count with standard
    deviation sigma_b together costs what one Gaussian mechanism with
    ``z = (z_delta**-2 + (2 sigma_b)**-2) ** -0.5`` costs, so
    ``z_delta = (z**-2 - (2 sigma_b)**-2) ** -0.5``. It needs
    ``2 sigma_b > z``: the bit alone would otherwise spend the whole budget.
    """
    if not (noise_multiplier > 0 and indicator_noise > 0):
        raise ValueError("noise_multiplier and indicator_noise must be positive")
    rest = noise_multiplier**-2 - (2.0 * indicator_noise) ** -2
    if rest <= 0:
        raise ValueError(
            f"indicator_noise={indicator_noise} leaves no budget for the update at noise_multiplier="
            f"{noise_multiplier}: it must exceed noise_multiplier / 2"
        )
    return rest**-0.5
