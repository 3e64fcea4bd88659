"""Which devices drop out of a round, and at which stage: drawn afresh for every round.

``rate`` is the share of a round's cohort that drops out, as ``secagg.dropout`` is the share a
secure round tolerates: ``round(rate * cohort)`` devices, drawn at random, each at a stage drawn
uniformly from the round's stages. A device that drops at a stage sends nothing from that stage
on (the coordinator waits out the stage's deadline and counts it dropped; at the unmask stage its
masked input is already in the sum and only its shares are missing). It is back for the next round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def draw_dropouts(
    devices: Sequence[str], stages: Sequence[str], rate: float, rng: np.random.Generator
) -> dict[str, int]:
    """``{device: index of the stage it stops answering at}`` for the devices that drop this round."""
    if not 0 <= rate < 1:
        raise ValueError(f"the dropout rate must be in [0, 1), got {rate}")
    n = int(round(rate * len(devices)))
    if n == 0 or not stages:
        return {}
    chosen = rng.choice(len(devices), size=n, replace=False)
    at = rng.integers(0, len(stages), size=n)
    return {devices[int(i)]: int(s) for i, s in zip(chosen, at, strict=True)}


def silent(drops: dict[str, int], device: str, stage_index: int) -> bool:
    """Whether ``device`` sends nothing at the stage of ``stage_index``."""
    at = drops.get(device)
    return at is not None and stage_index >= at
