"""Split finding from a histogram agrees with a brute-force search over the rows themselves."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shared.gbdt.histograms import level_histogram
from shared.gbdt.splits import TreeParams, best_splits, worth_splitting


def brute_force(
    codes: np.ndarray, missing: int, edge_counts: list[int], g: np.ndarray, h: np.ndarray, params: TreeParams
) -> tuple[float, int, int, bool]:
    """The best (loss change, feature, bin, default_left) by trying every partition of the rows."""
    lam, mcw = params.reg_lambda, params.min_child_weight

    def score(mask: np.ndarray) -> float:
        return float(g[mask].sum() ** 2 / (h[mask].sum() + lam))

    everything = np.ones(len(g), dtype=bool)
    root = score(everything) if h.sum() >= mcw else 0.0
    best = (-np.inf, -1, -1, False)
    for f, count in enumerate(edge_counts):
        is_missing = codes[:, f] == missing
        for b, default_left in itertools.product(range(count), (False, True)):
            left = ((codes[:, f] <= b) & ~is_missing) | (is_missing & default_left)
            if h[left].sum() < mcw or h[~left].sum() < mcw:
                continue
            loss = score(left) + score(~left) - root
            if loss > best[0] + 1e-9:
                best = (loss, f, b, default_left)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_split_matches_brute_force_on_a_tiny_case(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, features, bins = 30, 3, 5
    codes = rng.integers(0, bins, size=(n, features)).astype(np.uint8)
    codes[rng.random(codes.shape) < 0.2] = bins  # missing values, to exercise both directions
    edge_counts = [4, 2, 3]  # features with fewer bins: splits past their last edge are not allowed
    for f, count in enumerate(edge_counts):
        present = codes[:, f] != bins
        codes[present, f] = np.minimum(codes[present, f], count)
    g = rng.normal(size=n)
    h = rng.uniform(0.05, 0.25, size=n)
    params = TreeParams(reg_lambda=0.7, min_child_weight=0.8)
    hist = level_histogram(codes, np.zeros((n, 1), dtype=np.int32), g[:, None], h[:, None], 1, bins + 1)
    (split,) = best_splits(hist, np.array([g.sum()]), np.array([h.sum()]), np.array(edge_counts), params)
    loss, feature, bin_, _ = brute_force(codes, bins, edge_counts, g, h, params)
    if loss == -np.inf:
        assert split is None
        return
    assert split is not None
    assert split.loss_change == pytest.approx(loss, rel=1e-9, abs=1e-12)
    # The chosen partition is one of the best (ties may pick another bin or direction of the same gain).
    left = ((codes[:, split.feature] <= split.bin) & (codes[:, split.feature] != bins)) | (
        (codes[:, split.feature] == bins) & split.default_left
    )
    assert split.left_grad == pytest.approx(g[left].sum()) and split.left_hess == pytest.approx(h[left].sum())
    assert split.right_grad == pytest.approx(g[~left].sum())
    assert (split.feature, split.bin) == (feature, bin_) or split.loss_change == pytest.approx(loss)


def test_gamma_and_depth_decide_whether_the_best_split_is_made() -> None:
    codes = np.array([[0], [0], [1], [1]], dtype=np.uint8)
    g = np.array([-1.0, -1.0, 1.0, 1.0])
    h = np.ones(4)
    hist = level_histogram(codes, np.zeros((4, 1), dtype=np.int32), g[:, None], h[:, None], 1, 3)
    (split,) = best_splits(hist, np.array([0.0]), np.array([4.0]), np.array([1]), TreeParams(reg_lambda=0.0))
    assert split is not None and split.loss_change == pytest.approx(4.0)  # 2²/2 + 2²/2 − 0
    assert worth_splitting(split, 0, TreeParams(gamma=3.9))
    assert not worth_splitting(split, 0, TreeParams(gamma=4.1))
    assert not worth_splitting(split, 6, TreeParams(max_depth=6))
    heavy = TreeParams(min_child_weight=2.5)
    assert best_splits(hist, np.array([0.0]), np.array([4.0]), np.array([1]), heavy) == (None,)
