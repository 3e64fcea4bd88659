"""What an audit compares a version's importances with: the previous version's (drift) and the AutoML
leader's TreeSHAP contributions; the reasons for a ``drift`` verdict.

Pure functions over importances (mean |SHAP| per feature), used by every audit through
:func:`training_cluster.audit_report.summarise` and by the worker's importances of a previous version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.jobspec import AuditSpec


def mean_abs_importance(values: np.ndarray, features: list[str]) -> dict[str, float]:
    """Mean |SHAP| per feature, summed over the outputs (the total of a stacked bar)."""
    per = np.abs(values).mean(axis=0).sum(axis=1)
    return {name: float(v) for name, v in zip(features, per, strict=True)}


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when undefined (constant or < 2 items)."""
    from scipy.stats import spearmanr

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def shares(importance: dict[str, float]) -> dict[str, float]:
    total = sum(importance.values())
    if total <= 0:
        return dict.fromkeys(importance, 0.0)
    return {name: value / total for name, value in importance.items()}


def top_features(importance: dict[str, float], k: int) -> list[str]:
    return [name for name, _ in sorted(importance.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def compare_with_previous(
    importance: dict[str, float], previous: dict[str, float] | None, audit: AuditSpec
) -> tuple[dict[str, Any], list[str]]:
    """The drift section of a report and the reasons for a ``drift`` verdict (none: ``ok``).

    Drift when the Spearman correlation of the importances with the previous
    version's is below ``audit.min_rank_correlation``, or when a feature's share
    of the total importance moved by more than ``audit.max_share_shift``. With
    no previous importances there is nothing to compare: no drift.
    """
    thresholds = {
        "min_rank_correlation": audit.min_rank_correlation,
        "max_share_shift": audit.max_share_shift,
    }
    if previous is None:
        return {"rank_correlation": None, "shifted": [], "thresholds": thresholds}, []
    common = [name for name in importance if name in previous]
    rho = spearman([importance[n] for n in common], [float(previous[n]) for n in common])
    after = shares(importance)
    before = shares({name: float(v) for name, v in previous.items()})
    moves = []
    for name in sorted(set(after) | set(before)):
        was, now = before.get(name, 0.0), after.get(name, 0.0)
        if abs(now - was) > audit.max_share_shift:
            moves.append((name, was, now))
    moves.sort(key=lambda m: -abs(m[2] - m[1]))
    shifted = [{"feature": name, "share_before": was, "share_after": now} for name, was, now in moves]
    reasons = []
    if rho is not None and rho < audit.min_rank_correlation:
        reasons.append(
            f"rank correlation of feature importances with the previous version is {rho:.3f},"
            f" below {audit.min_rank_correlation:g}"
        )
    for name, was, now in moves:
        reasons.append(
            f"{name}'s share of total importance moved from {was:.1%} to {now:.1%}"
            f" (more than {audit.max_share_shift:.0%})"
        )
    return {"rank_correlation": rho, "shifted": shifted, "thresholds": thresholds}, reasons


def compare_with_baseline(
    importance: dict[str, float], baseline: dict[str, Any] | None, top: int
) -> dict[str, Any] | None:
    """Agreement with the AutoML leader's mean |TreeSHAP| per feature: rank correlation and top-k overlap."""
    if not baseline:
        return None
    contributions = baseline.get("contributions") or {}
    theirs = contributions.get("features") or {}
    if not theirs:
        return None
    theirs = {str(k): float(v) for k, v in theirs.items()}
    common = [name for name in importance if name in theirs]
    k = min(top, len(common)) if common else 0
    ours_top = set(top_features({n: importance[n] for n in common}, k))
    their_top = set(top_features({n: theirs[n] for n in common}, k))
    return {
        "model": contributions.get("model") or baseline.get("leader"),
        "rank_correlation": spearman([importance[n] for n in common], [theirs[n] for n in common]),
        "top_overlap": len(ours_top & their_top) / k if k else None,
        "features": len(common),
    }
