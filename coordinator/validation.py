"""Checks of what devices and the central cluster send, before anything is stored.

Pure functions over parsed payloads: each raises with a message that names the field, so that a bad
message gets a 4xx the sender can act on and never reaches a round's arithmetic or the database.
"""

from __future__ import annotations

import math
from typing import Any

from coordinator.errors import Conflict, Invalid

MAX_EXAMPLES = 1_000_000_000


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_metrics(metrics: dict[str, Any]) -> None:
    if len(metrics) > 64:
        raise ValueError("too many metrics (at most 64)")
    for name, value in metrics.items():
        if not finite(value):
            raise ValueError(f"metric {name!r} must be a finite number")


def check_update_header(header: dict[str, Any], round_id: int) -> dict[str, Any]:
    if header.get("kind") != "update":
        raise Invalid("update: header kind must be 'update'")
    if header.get("round_id") != round_id:
        raise Conflict(f"update was made for round {header.get('round_id')}, not round {round_id}")
    n = header.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES:
        raise Invalid(f"update: num_examples must be an integer from 1 to {MAX_EXAMPLES}")
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict):
        raise Invalid("update: metrics must be a table")
    try:
        check_metrics(metrics)
    except ValueError as err:
        raise Invalid(f"update: {err}") from None
    loss = header.get("train_loss", 0.0)
    if not finite(loss):
        raise Invalid("update: train_loss must be a finite number")
    holdout = header.get("holdout_examples", 0)
    if not isinstance(holdout, int) or holdout < 0:
        raise Invalid("update: holdout_examples must be a non-negative integer")
    out = {"num_examples": n, "metrics": metrics, "train_loss": float(loss), "holdout_examples": holdout}
    if "dp" in header:  # example-level DP: the device's DP-SGD cost, checked by coordinator/privacy.py
        dp = header["dp"]
        if not isinstance(dp, dict) or len(dp) > 8 or not all(finite(v) for v in dp.values()):
            raise Invalid(
                "update: dp must be a table of finite numbers (noise_multiplier, sampling_rate, steps)"
            )
        out["dp"] = dp
    return out


_BASELINE_FIELDS = (("metrics", dict), ("leaderboard", list), ("contributions", dict), ("provenance", dict))


def check_baseline(data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """An AutoML baseline as the cluster uploads it: its leader, algorithm and JSON fields, checked."""
    leader = data.get("leader")
    if not isinstance(leader, str) or not leader.strip() or len(leader) > 300:
        raise Invalid("baseline: 'leader' must be the leader's model id (a non-empty string)")
    fields: dict[str, Any] = {}
    for name, kind in _BASELINE_FIELDS:
        value = data.get(name, kind())
        if not isinstance(value, kind):
            raise Invalid(f"baseline: '{name}' must be a JSON {'object' if kind is dict else 'array'}")
        fields[name] = value
    if not all(isinstance(v, int | float) and finite(v) for v in fields["metrics"].values()):
        raise Invalid("baseline: every metric must be a finite number")
    features = fields["contributions"].get("features", {})
    if not isinstance(features, dict) or not all(
        isinstance(v, int | float) and finite(v) for v in features.values()
    ):
        raise Invalid("baseline: contributions.features must map feature names to finite numbers")
    unknown_extra = set(data) - {"leader", "algorithm", *(name for name, _ in _BASELINE_FIELDS)}
    if unknown_extra:
        raise Invalid(f"baseline: unknown field(s) {', '.join(sorted(unknown_extra))}")
    return leader, str(data.get("algorithm", ""))[:64], fields
