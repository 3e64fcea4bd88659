"""Split finding from summed histograms: XGBoost's exact gain rule, run by the coordinator.

Chen & Guestrin, "XGBoost: A Scalable Tree Boosting System" (KDD 2016), eq. 7,
as ``src/tree/hist/evaluate_splits.h`` applies it: a node with gradient sum G
and hessian sum H has weight ``w = -G / (H + lambda)`` and score
``G**2 / (H + lambda)`` (0 when ``H < min_child_weight``); a split's
``loss_change`` is the children's scores less the node's. Every bin boundary
of every feature is a candidate, twice: missing values to the right (the
forward scan) and to the left (the backward scan); a candidate needs both
children to reach ``min_child_weight``. Ties go to the lower feature, then to
the forward scan, as in XGBoost. A split is made when ``loss_change`` exceeds
1e-6 and ``gamma`` (``min_split_loss``), both children have hessian, and the
node lies above ``max_depth``; a leaf's value is ``eta * w``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.gbdt.histograms import LevelHistogram

RT_EPS = 1e-6  # XGBoost's kRtEps: a smaller loss change is no split
_CHUNK = 16  # slots scored at a time, to bound the temporaries


@dataclass(frozen=True)
class TreeParams:
    """The tree hyperparameters, under XGBoost's names and defaults."""

    eta: float = 0.3
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    max_depth: int = 6

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.reg_lambda < 0 or self.gamma < 0 or self.min_child_weight < 0:
            raise ValueError("reg_lambda, gamma and min_child_weight must not be negative")
        if not 1 <= self.max_depth <= 16:
            raise ValueError(f"max_depth must be between 1 and 16, got {self.max_depth}")

    def xgboost(self) -> dict[str, float | int]:
        """The same settings as ``xgboost.train`` parameters."""
        return {
            "eta": self.eta,
            "lambda": self.reg_lambda,
            "gamma": self.gamma,
            "min_child_weight": self.min_child_weight,
            "max_depth": self.max_depth,
        }


@dataclass(frozen=True)
class Split:
    """The best split of one node: rows with ``code <= bin`` (``x < edges[feature][bin]``) go left."""

    feature: int
    bin: int
    default_left: bool
    loss_change: float
    left_grad: float
    left_hess: float
    right_grad: float
    right_hess: float


def weight(grad: float, hess: float, params: TreeParams) -> float:
    """A node's weight ``-G / (H + lambda)``, before the learning rate."""
    return -grad / (hess + params.reg_lambda)


def _score(g: np.ndarray, h: np.ndarray, lam: float) -> np.ndarray:
    return np.square(g) / (h + lam)


def best_splits(
    hist: LevelHistogram,
    node_grad: np.ndarray,
    node_hess: np.ndarray,
    edge_counts: np.ndarray,
    params: TreeParams,
) -> tuple[Split | None, ...]:
    """Each slot's best candidate split, or ``None`` where no candidate keeps both children heavy enough.

    ``node_grad``/``node_hess``: the slots' totals; ``edge_counts``: the
    number of edges of each feature (a split may follow bins
    ``0 .. count - 1``). Whether the best candidate is worth making is
    :func:`worth_splitting`'s question.
    """
    n_slots, features, width = hist.shape
    candidates = width - 2  # value bins are 0 .. width - 2; a split follows one of all but the last
    if candidates <= 0 or features == 0:
        return (None,) * n_slots
    lam, mcw = params.reg_lambda, params.min_child_weight
    allowed = np.arange(candidates)[None, :] < np.asarray(edge_counts)[:, None]  # (features, candidates)
    out: list[Split | None] = []
    for start in range(0, n_slots, _CHUNK):
        stop = min(start + _CHUNK, n_slots)
        g_node = np.asarray(node_grad[start:stop], dtype=np.float64)[:, None, None, None]
        h_node = np.asarray(node_hess[start:stop], dtype=np.float64)[:, None, None, None]
        g_left = np.cumsum(hist.grad[start:stop, :, :candidates], axis=2)
        h_left = np.cumsum(hist.hess[start:stop, :, :candidates], axis=2)
        g_missing = hist.grad[start:stop, :, -1:]
        h_missing = hist.hess[start:stop, :, -1:]
        # Axis 2: forward scan (missing right), then backward scan (missing left) from the top bin
        # down, so that argmax's first maximum is the candidate XGBoost keeps on a tie.
        gl = np.stack([g_left, (g_left + g_missing)[:, :, ::-1]], axis=2)
        hl = np.stack([h_left, (h_left + h_missing)[:, :, ::-1]], axis=2)
        gr, hr = g_node - gl, h_node - hl
        root = np.where(h_node < mcw, 0.0, _score(g_node, h_node, lam))
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = _score(gl, hl, lam) + _score(gr, hr, lam) - root
        ok = (hl >= mcw) & (hr >= mcw) & np.stack([allowed, allowed[:, ::-1]], axis=1)[None]
        loss = np.where(ok & np.isfinite(loss), loss, -np.inf)
        flat = loss.reshape(stop - start, -1)
        best = flat.argmax(axis=1)
        for i, k in enumerate(best.tolist()):
            if flat[i, k] == -np.inf:
                out.append(None)
                continue
            f, direction, c = np.unravel_index(k, loss.shape[1:])
            out.append(
                Split(
                    feature=int(f),
                    bin=int(c) if direction == 0 else candidates - 1 - int(c),
                    default_left=bool(direction == 1),
                    loss_change=float(flat[i, k]),
                    left_grad=float(gl[i, f, direction, c]),
                    left_hess=float(hl[i, f, direction, c]),
                    right_grad=float(gr[i, f, direction, c]),
                    right_hess=float(hr[i, f, direction, c]),
                )
            )
    return tuple(out)


def worth_splitting(split: Split | None, depth: int, params: TreeParams) -> bool:
    """XGBoost's test of a candidate (``IsValid``): gain above 1e-6 and gamma, hessian on both sides, depth left."""
    return (
        split is not None
        and split.loss_change > RT_EPS
        and split.left_hess != 0
        and split.right_hess != 0
        and split.loss_change >= params.gamma
        and depth < params.max_depth
    )
