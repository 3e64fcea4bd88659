"""The round state machine as pure functions over data.

A round of any kind walks through the stages of its protocol. In every stage
each active participant owes one message; the stage ends when all have sent
it or its deadline passes, whichever is first. Those who missed the deadline
count as dropped. If fewer than the round's minimum remain, the round is
abandoned and the model does not change. The secure-aggregation protocol adds
its stages (advertise keys, share keys, masked input, unmask) to this list.
A round whose aggregate is non-finite or out of bounds (docs/robustness.md) is
rejected: like an abandoned one it leaves the model as it was.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

STAGES: dict[str, tuple[str, ...]] = {
    "stats": ("configure", "input"),
    "train": ("configure", "input"),
    "evaluate": ("configure", "input"),
    # A gbdt job's binning round and tree levels (docs/gbdt.md): summed like a training update.
    "bins": ("configure", "input"),
    "level": ("configure", "input"),
}
# The kinds whose inputs are summed: under SecAgg+ when the job is secure (evaluation rounds never are).
SUMMED_KINDS: tuple[str, ...] = ("train", "stats", "bins", "level")
# A training round under SecAgg+ (Bell et al., CCS 2020): its unmask stage needs,
# for each device, t answers among its neighbours rather than a minimum of devices.
SECURE_STAGES: tuple[str, ...] = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")


def stages_of(kind: str, secure: bool = False) -> tuple[str, ...]:
    return SECURE_STAGES if secure and kind in SUMMED_KINDS else STAGES[kind]


ACTIVE = "active"
DROPPED = "dropped"
DECLINED = "declined"
EXCLUDED = "excluded"

# Round statuses. A round that ends without a new model is abandoned (too few devices, a failed
# aggregation) or rejected (its aggregate is out of bounds); both count toward failing the job.
ABANDONED = "abandoned"
REJECTED = "rejected"
ENDED_WITHOUT_MODEL: tuple[str, ...] = (ABANDONED, REJECTED)


def stage_index(kind: str, stage: str | None, secure: bool = False) -> int:
    """Position of a stage in its protocol; -1 for none yet."""
    if stage is None:
        return -1
    return stages_of(kind, secure).index(stage)


def next_stage(kind: str, stage: str, secure: bool = False) -> str | None:
    stages = stages_of(kind, secure)
    i = stages.index(stage)
    return stages[i + 1] if i + 1 < len(stages) else None


@dataclass(frozen=True)
class ParticipantView:
    device_id: str
    status: str
    stage_done: str | None


@dataclass(frozen=True)
class RoundView:
    kind: str
    stage: str
    deadline: float
    minimum: int
    participants: tuple[ParticipantView, ...]
    secure: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do with a round now.

    ``advance``: move to ``next_stage``; ``finish``: the last stage is done,
    aggregate; ``abandon``: give up with ``reason``; ``wait``: nothing yet.
    ``drop`` lists the devices that missed this stage's deadline.
    """

    action: Literal["wait", "advance", "finish", "abandon"]
    next_stage: str | None = None
    drop: tuple[str, ...] = field(default=())
    reason: str | None = None


def decide(view: RoundView, now: float) -> Decision:
    """The transition a round takes at time ``now``."""
    active = [p for p in view.participants if p.status == ACTIVE]
    here = stage_index(view.kind, view.stage, view.secure)
    done = [p for p in active if stage_index(view.kind, p.stage_done, view.secure) >= here]
    late = tuple(
        sorted(p.device_id for p in active if stage_index(view.kind, p.stage_done, view.secure) < here)
    )

    if view.secure and view.stage == "unmask":
        # Every masked input is already in the sum: a device that does not answer here
        # is not dropped; whether enough shares arrived is for the unmasking to decide.
        return Decision("wait") if late and now < view.deadline else Decision("finish")

    if len(active) < view.minimum:
        return Decision(
            "abandon",
            drop=late,
            reason=f"only {len(active)} devices remain in stage {view.stage!r}; the minimum is {view.minimum}",
        )
    if late and now < view.deadline:
        return Decision("wait")
    if len(done) < view.minimum:
        return Decision(
            "abandon",
            drop=late,
            reason=(
                f"only {len(done)} of {len(active)} devices completed stage {view.stage!r} "
                f"before its deadline; the minimum is {view.minimum}"
            ),
        )
    following = next_stage(view.kind, view.stage, view.secure)
    if following is None:
        return Decision("finish", drop=late)
    return Decision("advance", next_stage=following, drop=late)


def select_cohort(
    eligible: Sequence[str],
    *,
    target: int,
    minimum: int,
    seed: int,
    round_number: int,
    waited: float | None,
    selection_timeout: float,
) -> list[str] | None:
    """Choose a round's cohort, or ``None`` to keep waiting.

    With the target checked in, select at once; with at least the minimum,
    select after ``selection_timeout`` seconds of waiting for more. The draw
    is reproducible from the job's seed and the round number.
    """
    pool = sorted(set(eligible))
    if len(pool) < minimum:
        return None
    if len(pool) < target and (waited is None or waited < selection_timeout):
        return None
    rng = random.Random(f"{seed}:{round_number}")
    return sorted(rng.sample(pool, min(target, len(pool))))
