"""Grown trees and the ensemble, in XGBoost's node layout, and aicfl's own predictor.

A :class:`Tree` holds XGBoost's ``RegTree`` arrays: node 0 is the root, a
leaf has ``left == -1`` and its value in ``threshold`` (XGBoost's
``split_conditions``). A row goes left when its float32 value is below the
threshold, or when it is missing and ``default_left``. The predictor adds
the leaves in float32, tree after tree from the base margin, as XGBoost's
CPU predictor does, so that the two agree to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.gbdt.objectives import base_margin, transform


@dataclass(frozen=True, eq=False)
class Tree:
    """One regression tree: per node, XGBoost's arrays (int32, bool, float32)."""

    left: np.ndarray
    right: np.ndarray
    parent: np.ndarray
    feature: np.ndarray
    split_bin: np.ndarray  # the bin a split follows (codes <= it go left); -1 at leaves
    threshold: np.ndarray  # split condition; the leaf value at a leaf
    default_left: np.ndarray
    base_weight: np.ndarray
    loss_change: np.ndarray
    sum_hessian: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(self.left.size)

    @property
    def is_leaf(self) -> np.ndarray:
        return self.left < 0


@dataclass(frozen=True, eq=False)
class Ensemble:
    """A boosted ensemble: the objective, XGBoost's ``base_score`` (one per class for softmax), the trees.

    ``tree_class[i]`` is the class whose margin tree ``i`` adds to (0 unless
    softmax); a softmax boosting round appends one tree per class in class
    order. ``num_class`` is 0 unless softmax, as XGBoost writes it.
    """

    objective: str
    base_score: tuple[float, ...]
    num_feature: int
    num_class: int
    trees: tuple[Tree, ...] = ()
    tree_class: tuple[int, ...] = ()

    @property
    def outputs(self) -> int:
        return max(self.num_class, 1)

    @property
    def rounds(self) -> int:
        return len(self.trees) // self.outputs


def with_round(ensemble: Ensemble, trees: tuple[Tree, ...]) -> Ensemble:
    """The ensemble with one more boosting round (one tree, or one per class)."""
    if len(trees) != ensemble.outputs:
        raise ValueError(f"a boosting round adds {ensemble.outputs} trees, got {len(trees)}")
    return Ensemble(
        objective=ensemble.objective,
        base_score=ensemble.base_score,
        num_feature=ensemble.num_feature,
        num_class=ensemble.num_class,
        trees=ensemble.trees + tuple(trees),
        tree_class=ensemble.tree_class + tuple(range(len(trees))),
    )


def _route(tree: Tree, n: int, goes_left: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """The leaf each row reaches; ``goes_left(rows, nodes)`` decides at internal nodes."""
    node = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        at = node[active]
        inner = tree.left[at] >= 0
        active, at = active[inner], at[inner]
        if not active.size:
            break
        left = goes_left(active, at)
        node[active] = np.where(left, tree.left[at], tree.right[at])
    return node


def leaves_from_values(tree: Tree, x: np.ndarray) -> np.ndarray:
    """The leaf of each row of float32 ``x`` (XGBoost's rule: ``x < threshold``, missing by ``default_left``)."""

    def goes_left(rows: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        value = x[rows, tree.feature[nodes]]
        return np.where(np.isnan(value), tree.default_left[nodes], value < tree.threshold[nodes])

    return _route(tree, x.shape[0], goes_left)


def leaves_from_codes(tree: Tree, codes: np.ndarray, missing: int) -> np.ndarray:
    """The leaf of each row from its bin codes; the same leaf as :func:`leaves_from_values` for the coded rows."""

    def goes_left(rows: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        code = codes[rows, tree.feature[nodes]].astype(np.int64)
        return np.where(code == missing, tree.default_left[nodes], code <= tree.split_bin[nodes])

    return _route(tree, codes.shape[0], goes_left)


def start_margin(ensemble: Ensemble, n: int) -> np.ndarray:
    """The base margins, float32 ``(n, outputs)``."""
    base = [base_margin(ensemble.objective, s) for s in ensemble.base_score]
    return np.tile(np.asarray(base, dtype=np.float32), (n, 1))


def predict_margin(ensemble: Ensemble, x: np.ndarray) -> np.ndarray:
    """Raw margins, float32 ``(rows, outputs)``: the base margin plus each tree's leaf, in order."""
    values = np.asarray(x, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != ensemble.num_feature:
        raise ValueError(f"expected a matrix of {ensemble.num_feature} columns, got shape {values.shape}")
    margin = start_margin(ensemble, values.shape[0])
    for tree, k in zip(ensemble.trees, ensemble.tree_class, strict=True):
        margin[:, k] += tree.threshold[leaves_from_values(tree, values)]
    return margin


def predict(ensemble: Ensemble, x: np.ndarray) -> np.ndarray:
    """What ``xgboost.Booster.predict`` returns: probabilities, classes or values; ``(rows,)`` unless softprob."""
    out = transform(ensemble.objective, predict_margin(ensemble, x))
    return out if ensemble.objective == "multi:softprob" else out.reshape(-1)
