"""How far one device can move a round's aggregate, as pure functions both sides use.

Two numbers bound a device's pull on the example-weighted mean: the size of its update and the
weight it claims. Devices cap their weight at ``max_weight`` (:func:`capped_weight`); under SecAgg+
the update is also clipped per coordinate to ``[-clip, clip]`` before quantisation, so the protocol's
arithmetic bounds what the coordinator cannot see. Where the coordinator can see, it checks: a plain
update's norm and weight (:func:`update_problem`), and every round's new model
(:func:`aggregate_problem`). The bounds, as formulas, are in docs/robustness.md.
"""

from __future__ import annotations

import math

import numpy as np


class AggregateRejected(ValueError):
    """A round's aggregate is non-finite or out of bounds: the round is rejected, the model kept."""


def capped_weight(examples: int, max_weight: int) -> int:
    """The weight a device counts with: its example count, at most ``max_weight`` (and at least 1)."""
    return max(1, min(int(examples), int(max_weight)))


def update_norm(update: np.ndarray) -> float:
    """The L2 norm of an update, computed in float64 (a float32 sum of squares overflows at 1.8e19)."""
    x = np.asarray(update).ravel()
    return math.sqrt(float(np.dot(x.astype(np.float64), x.astype(np.float64)))) if x.size else 0.0


def update_problem(weighted: np.ndarray, weight: int, max_update_norm: float, max_weight: int) -> str | None:
    """Why a plain update ``weighted = weight * delta`` is refused, or None when it is within bounds.

    Refused: a weight above ``max_weight`` (agents cap theirs, :func:`capped_weight`), a non-finite
    value, or a per-example update ``delta`` whose L2 norm exceeds ``max_update_norm``.
    """
    if weight > max_weight:
        return f"num_examples {weight} exceeds robustness.max_weight = {max_weight}"
    x = np.asarray(weighted)
    if not np.isfinite(x).all():
        return "the update holds non-finite values (NaN or infinity)"
    norm = update_norm(x) / weight
    if not norm <= max_update_norm:  # also false for an overflow to inf
        return f"the update's L2 norm per example is {norm:.4g}, above robustness.max_update_norm = {max_update_norm:g}"
    return None


def aggregate_problem(model: np.ndarray, max_parameter: float) -> str | None:
    """Why a round's new model is rejected (a non-finite parameter, or one above ``max_parameter``), or None."""
    x = np.asarray(model)
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        return f"the aggregate holds {bad} non-finite parameters"
    largest = float(np.max(np.abs(x))) if x.size else 0.0
    if largest > max_parameter:
        return f"the aggregate's largest parameter is {largest:.4g}, above robustness.max_parameter = {max_parameter:g}"
    return None


def plain_influence(max_update_norm: float, max_weight: int, others_weight: int) -> float:
    """The largest L2 distance one device can move a plain FedAvg aggregate.

    With every accepted update ``delta_i`` of norm at most ``B`` (``max_update_norm``), the mean
    with device ``u`` minus the mean without it is ``w_u / W * (delta_u - mean_others)``, so its norm
    is at most ``2 * B * w_u / (w_u + W_others)`` with ``w_u <= max_weight``.
    """
    w = float(max_weight)
    return 2.0 * max_update_norm * w / (w + max(0, others_weight))


def secure_influence(
    clip: float, max_weight: int, others_weight: int, parameters: int
) -> tuple[float, float]:
    """The largest move of a SecAgg+ aggregate by one device following the protocol's arithmetic.

    Per coordinate ``2 * clip * w_u / (w_u + W_others)`` (clipped values lie in ``[-clip, clip]``),
    and in L2 that times ``sqrt(parameters)``; plus at most one quantisation step per coordinate.
    Returns (per coordinate, L2).
    """
    per = 2.0 * clip * max_weight / (max_weight + max(0, others_weight))
    return per, per * math.sqrt(parameters)
