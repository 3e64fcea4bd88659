"""The coordinator's checks of how far one device can move a round (docs/robustness.md).

Where the coordinator sees single updates (plaintext rounds) it refuses one that is non-finite,
claims more than ``robustness.max_weight`` or is longer than ``robustness.max_update_norm``, and
excludes its sender from the round with the reason; it combines the updates with the job's robust
rule when it has one. Every round's aggregate is checked before it becomes a version
(:func:`check_plain_aggregate` here, ``shared.secagg.protocol.check_weighted_total`` under SecAgg+,
``strategies.apply_strategy`` for every strategy's result): one out of bounds raises
``AggregateRejected`` and the driver records the round as ``rejected``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from sqlalchemy.orm import Session

from coordinator import registry, secure
from coordinator.context import EngineContext
from coordinator.errors import Invalid
from coordinator.models import Round, RoundMessage
from coordinator.strategies import robust_mean
from shared import codec
from shared.jobspec import ROBUST_STRATEGIES, JobSpec
from shared.robustness import AggregateRejected, aggregate_problem, update_problem


class _Receiver(Protocol):
    ctx: EngineContext

    def _exclude(self, device_id: str, round_id: int, reason: str) -> None: ...


def _spec(ctx: EngineContext, job_id: int) -> JobSpec:
    with ctx.device_read() as s:
        return ctx.spec(secure.orm(s), job_id)


def check_plain_update(
    receiver: _Receiver, device_id: str, round_id: int, job_id: int, weighted: np.ndarray, weight: int
) -> None:
    """Refuse a plain update out of the job's bounds: its sender is excluded from the round with the
    reason (the round goes on without waiting for it), and ``Invalid`` tells the device why."""
    bounds = _spec(receiver.ctx, job_id).robustness
    problem = update_problem(weighted, weight, bounds.max_update_norm, bounds.max_weight)
    if problem is None:
        return
    reason = f"update refused: {problem}"
    receiver._exclude(device_id, round_id, reason)
    raise Invalid(f"device excluded from round {round_id}: {reason}")


def check_plain_aggregate(
    ctx: EngineContext, s: Session, r: Round, msgs: list[RoundMessage], total: np.ndarray, examples: int
) -> tuple[np.ndarray, int]:
    """A plain round's weighted sum and weight, through the job's robust rule if it has one, checked.

    ``total`` is the running sum of the devices' weighted updates. With a robust strategy, the
    single updates are read back from the blob store and combined (``strategies.robust_mean``);
    the result is returned as ``mean * examples`` so that the caller's ``total / examples`` is the
    robust mean. ``AggregateRejected`` when the model it leads to is non-finite or has a parameter
    above ``robustness.max_parameter``.
    """
    spec = ctx.spec(s, r.job_id)
    numel = total.size
    if spec.strategy.name in ROBUST_STRATEGIES:
        updates, weights = [], []
        for m in msgs:
            n = int(m.payload["num_examples"])
            vec = codec.decode(ctx.blobs.get(m.blob_sha256 or ""), expected_numel=numel)[1]
            updates.append(vec.astype(np.float32) / np.float32(n))
            weights.append(n)
        total = robust_mean(spec.strategy, updates, weights) * np.float32(examples)
    _, current = ctx.vector(r.job_id, registry.get_version(s, r.job_id, r.model_version_in))
    with np.errstate(over="ignore", invalid="ignore"):
        candidate = current + total / np.float32(max(examples, 1))
    problem = aggregate_problem(candidate, spec.robustness.max_parameter)
    if problem is not None:
        raise AggregateRejected(problem)
    return total, examples
