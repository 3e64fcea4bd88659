"""Clipping and stochastic rounding of updates into integers that SecAgg+ can add modulo 2**64.

Each value is clipped to ``[-clip, clip]`` and mapped affinely onto
``[0, 2**bits - 1]``; rounding down or up at random, with the probability of
rounding up equal to the fractional part, makes the quantised value unbiased
(Bonawitz et al., CCS 2017, and the quantisation of Bell et al., CCS 2020).
"""

from __future__ import annotations

import numpy as np


def _levels(bits: int) -> int:
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be between 1 and 32, got {bits}")
    return (1 << bits) - 1


def quantize(values: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """uint64 values in ``[0, 2**bits - 1]``: clip, scale, then round stochastically.

    Stochastic rounding needs unbiasedness, not secrecy, so any well-seeded
    generator will do; on devices seed it from the operating system's CSPRNG,
    e.g. ``np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16))))``,
    so that no two devices share a rounding pattern. Non-finite values raise
    ValueError: they would otherwise quantise to an arbitrary level.
    """
    levels = _levels(bits)
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("update holds non-finite values (NaN or infinity)")
    scaled = (np.clip(x, -clip, clip) + clip) * (levels / (2.0 * clip))
    low = np.floor(scaled)
    up = rng.random(scaled.shape[0]) < (scaled - low)
    q = low.astype(np.uint64) + up.astype(np.uint64)
    return np.minimum(q, np.uint64(levels))


def dequantize_weighted_mean(total: np.ndarray, weight_total: int, clip: float, bits: int) -> np.ndarray:
    """The example-weighted mean, as float32, of the values behind ``total = sum_i n_i * q_i``.

    Exact up to quantisation: the error per coordinate is below
    :func:`quantisation_bound` (plus float32 rounding of the result).
    """
    if weight_total <= 0:
        raise ValueError(f"the total weight must be positive, got {weight_total}")
    levels = _levels(bits)
    mean_q = np.asarray(total, dtype=np.uint64).astype(np.float64) / float(weight_total)
    return (mean_q * (2.0 * clip / levels) - clip).astype(np.float32)


def quantisation_bound(clip: float, bits: int) -> float:
    """The largest error per coordinate of the dequantised weighted mean: one quantisation step.

    Each device's stochastic rounding moves a (clipped) value by less than one
    step, and a weighted mean of such errors is again below one step.
    """
    return 2.0 * clip / _levels(bits)
