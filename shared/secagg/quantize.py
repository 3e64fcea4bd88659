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


_BLOCK = 1 << 15  # values per block: the float64 work arrays stay small and in cache


def quantize(
    values: np.ndarray,
    clip: float,
    bits: int,
    rng: np.random.Generator,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint64 values in ``[0, 2**bits - 1]``: clip, scale, then round stochastically.

    Stochastic rounding needs unbiasedness, not secrecy, so any well-seeded
    generator will do; on devices seed it from the operating system's CSPRNG,
    e.g. ``np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(16))))``,
    so that no two devices share a rounding pattern. Non-finite values raise
    ValueError: they would otherwise quantise to an arbitrary level. The result
    goes into ``out`` (a uint64 array of the same size) when given. Computed
    in float64 one block at a time, so that no temporary as large as the
    update is ever made (on an edge device, and wherever first touching fresh
    memory is slow).
    """
    levels = _levels(bits)
    x = np.asarray(values).ravel()
    if not np.isfinite(x).all():
        raise ValueError("update holds non-finite values (NaN or infinity)")
    if out is None:
        out = np.empty(x.size, dtype=np.uint64)
    elif out.dtype != np.uint64 or out.shape != (x.size,):
        raise ValueError(f"out must be a uint64 array of {x.size} values")
    scale = levels / (2.0 * clip)
    block = min(_BLOCK, x.size) or 1
    work = np.empty(block, dtype=np.float64)
    draw = np.empty(block, dtype=np.float64)
    for start in range(0, x.size, block):
        n = min(block, x.size - start)
        w, r = work[:n], draw[:n]
        w[...] = x[start : start + n]  # to float64 first: clipping in float32 could step below -clip
        np.clip(w, -clip, clip, out=w)
        w += clip
        w *= scale
        # floor(s + u), u uniform in [0, 1): s rounded up with probability equal to its fractional part.
        w += rng.random(out=r)
        np.floor(w, out=w)
        q = out[start : start + n]
        q[...] = w  # exact: whole numbers in [0, levels + 1]
        np.minimum(q, np.uint64(levels), out=q)  # s + u can round up to levels + 1 when s is levels
    return out


def dequantize_weighted_mean(total: np.ndarray, weight_total: int, clip: float, bits: int) -> np.ndarray:
    """The example-weighted mean, as float32, of the values behind ``total = sum_i n_i * q_i``.

    Exact up to quantisation: the error per coordinate is below
    :func:`quantisation_bound` (plus float32 rounding of the result).
    """
    if weight_total <= 0:
        raise ValueError(f"the total weight must be positive, got {weight_total}")
    levels = _levels(bits)
    total = np.asarray(total, dtype=np.uint64).ravel()
    out = np.empty(total.size, dtype=np.float32)
    step = 2.0 * clip / levels
    block = min(_BLOCK, total.size) or 1
    work = np.empty(block, dtype=np.float64)
    for start in range(0, total.size, block):
        n = min(block, total.size - start)
        w = work[:n]
        w[...] = total[start : start + n]
        w /= float(weight_total)
        w *= step
        w -= clip
        out[start : start + n] = w
    return out


def quantisation_bound(clip: float, bits: int) -> float:
    """The largest error per coordinate of the dequantised weighted mean: one quantisation step.

    Each device's stochastic rounding moves a (clipped) value by less than one
    step, and a weighted mean of such errors is again below one step.
    """
    return 2.0 * clip / _levels(bits)
