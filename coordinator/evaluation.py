"""Federated evaluation: the devices' holdout metrics, weighted by their example counts."""

from __future__ import annotations


def weighted_mean(items: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of per-device metrics (the federated evaluation)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    examples = 0
    for n, metrics in items:
        if n <= 0:
            continue
        examples += n
        for name, value in metrics.items():
            if name == "examples":
                continue
            totals[name] = totals.get(name, 0.0) + n * float(value)
            weights[name] = weights.get(name, 0.0) + n
    out = {name: totals[name] / weights[name] for name in totals}
    if examples:
        out["examples"] = float(examples)
    return out
