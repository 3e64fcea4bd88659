"""The objectives: gradients and hessians per row, the starting margin, the output transform.

The formulas are XGBoost's (``src/objective/regression_loss.h`` and
``multiclass_obj.cu``): squared error ``g = m - y, h = 1``; logistic
``g = p - y, h = max(p (1 - p), 1e-16)``; softmax per class
``g = p_k - [y = k], h = max(2 p_k (1 - p_k), 1e-16)``. A multiclass boosting
round grows one tree per class, each on its own column of gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OBJECTIVES = ("binary:logistic", "multi:softmax", "multi:softprob", "reg:squarederror")
_EPS = 1e-16
# What one row can add to a node's sums: the checks of a device's histogram hold it to these.
HESSIAN_MAX = {"binary:logistic": 0.25, "multi:softmax": 0.5, "multi:softprob": 0.5, "reg:squarederror": 1.0}
GRADIENT_BOUNDED = ("binary:logistic", "multi:softmax", "multi:softprob")  # |g| <= 1 per row


def check_objective(objective: str, num_class: int) -> None:
    """Raise ValueError for an objective aicfl does not grow, or a class count that does not fit it."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if objective.startswith("multi:") and num_class < 2:
        raise ValueError(f"{objective} needs num_class >= 2, got {num_class}")
    if not objective.startswith("multi:") and num_class not in (0, 1):
        raise ValueError(f"{objective} takes no classes, got num_class={num_class}")


def trees_per_round(objective: str, num_class: int) -> int:
    """How many trees one boosting round grows: one per class for softmax, else one."""
    return num_class if objective.startswith("multi:") else 1


def base_margin(objective: str, base_score: float) -> float:
    """The margin every prediction starts from, given XGBoost's ``base_score`` (a probability for logistic)."""
    if objective == "binary:logistic":
        if not 0.0 < base_score < 1.0:
            raise ValueError(f"a logistic base_score must lie in (0, 1), got {base_score}")
        return float(-np.log(1.0 / base_score - 1.0))
    return float(base_score)


def base_scores(
    objective: str, *, label_mean: float = 0.0, class_counts: Sequence[int] = ()
) -> tuple[float, ...]:
    """XGBoost's ``base_score`` from what the statistics round yields: the label mean, or the class counts.

    Logistic: the positive rate, kept inside (0, 1); squared error: the mean;
    softmax: one margin per class, the log of its share less their average
    (the constant that minimises the softmax loss; XGBoost 3 also writes one
    value per class).
    """
    if objective.startswith("multi:"):
        counts = np.asarray(class_counts, dtype=np.float64)
        if counts.size < 2 or (counts < 0).any() or counts.sum() <= 0:
            raise ValueError("softmax needs the counts of at least two classes")
        log_share = np.log(np.maximum(counts / counts.sum(), 1e-6))
        return tuple(float(v) for v in log_share - log_share.mean())
    if objective == "binary:logistic":
        return (float(min(max(label_mean, 1e-6), 1.0 - 1e-6)),)
    return (float(label_mean),)


def gradients(objective: str, margin: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian per row and tree, float64 ``(rows, trees)``.

    ``margin`` is ``(rows,)`` (or ``(rows, 1)``) for one tree a round and
    ``(rows, classes)`` for softmax; ``labels`` are 0/1, class indices or
    real values.
    """
    m = np.asarray(margin, dtype=np.float64)
    y = np.asarray(labels)
    if objective.startswith("multi:"):
        if m.ndim != 2 or m.shape[0] != y.shape[0]:
            raise ValueError(f"softmax needs a (rows, classes) margin, got {m.shape} for {y.shape[0]} labels")
        z = np.exp(m - m.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        g = p.copy()
        g[np.arange(y.shape[0]), y.astype(np.int64)] -= 1.0
        return g, np.maximum(2.0 * p * (1.0 - p), _EPS)
    m = m.reshape(-1)
    if m.shape[0] != y.shape[0]:
        raise ValueError(f"{m.shape[0]} margins for {y.shape[0]} labels")
    target = y.astype(np.float64)
    if objective == "binary:logistic":
        p = 1.0 / (1.0 + np.exp(-m))
        return (p - target)[:, None], np.maximum(p * (1.0 - p), _EPS)[:, None]
    if objective == "reg:squarederror":
        return (m - target)[:, None], np.ones((m.shape[0], 1))
    raise ValueError(f"unknown objective {objective!r}")


def transform(objective: str, margin: np.ndarray) -> np.ndarray:
    """Predictions from margins, as ``xgboost.Booster.predict`` gives them, in float32."""
    m = np.asarray(margin, dtype=np.float32)
    if objective == "binary:logistic":
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-m))).astype(np.float32)
    if objective == "multi:softprob":
        z = np.exp(m - m.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    if objective == "multi:softmax":
        return m.argmax(axis=1).astype(np.float32)
    return m
