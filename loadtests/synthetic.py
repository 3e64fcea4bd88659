"""What the load-test devices contribute to a round, and the aggregate that must come out of it.

Every device of a run sends the same synthetic update ``U`` (drawn once per
process from a fixed seed, uniform in [-1.1 clip, 1.1 clip) as
``bench/secagg.py`` draws its updates) times its own scale ``s`` in
[0.5, 1.5), weighted by ``EXAMPLES`` examples. The device writes each
contribution the coordinator accepted (round, secure or not, scale) to a
ledger file, one JSON line each, so that ``loadtests/run.py`` can compute the
aggregate the round must produce without holding any device's vector:

- plaintext FedAvg: the new model minus the old is ``sum(n s U) / sum(n)``;
- SecAgg+: each input is clipped to [-clip, clip] before quantising, so the
  difference is ``sum(n clip(s U)) / sum(n)``, within the quantisation bound.

This module does not import locust (which patches the standard library on import).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = 64
UPDATE_SEED = 20260
CLIP = 0.5
LEDGER_ENV = "AICFL_LOAD_LEDGER"


def base_update(numel: int, clip: float = CLIP) -> np.ndarray:
    """``U``: ``numel`` float32 values uniform in [-1.1 clip, 1.1 clip), the same in every process."""
    u = np.random.default_rng(UPDATE_SEED).random(numel, dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(2.2 * clip)
    return u


def scaled(u: np.ndarray, scale: float) -> np.ndarray:
    """One device's update: ``U`` times its scale, in float32 (a new array; ``U`` is shared)."""
    return u * np.float32(scale)


def ledger_path(directory: str | os.PathLike[str], kind: str) -> Path:
    """This process's file of ``kind`` records (``contrib`` or ``bytes``) in the ledger folder."""
    return Path(directory) / f"{kind}-{os.getpid()}.jsonl"


def read_ledger(directory: Path, kind: str) -> list[dict[str, Any]]:
    """Every ``kind`` record written by every process of the run."""
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob(f"{kind}-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def expected_delta(numel: int, records: Iterable[dict[str, Any]], secure: bool, clip: float) -> np.ndarray:
    """The new model minus the old that a round with these contributions must produce (float64)."""
    u = base_update(numel, clip)
    total = np.zeros(numel, dtype=np.float64)
    weight = 0
    for rec in records:
        x = scaled(u, rec["scale"])
        if secure:
            x = np.clip(x, -clip, clip)
        n = int(rec["examples"])
        total += n * x.astype(np.float64)
        weight += n
    if weight == 0:
        raise ValueError("no contribution recorded for this round")
    return total / weight
