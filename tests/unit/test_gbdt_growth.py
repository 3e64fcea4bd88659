"""Growing a level when another cohort sent it: every split's sides add up to the node it divides."""

from __future__ import annotations

import numpy as np

from shared.gbdt.binning import BinEdges, bin_codes
from shared.gbdt.growth import assign_slots, grow_level, start_round
from shared.gbdt.histograms import level_histogram
from shared.gbdt.objectives import gradients
from shared.gbdt.splits import TreeParams


def test_open_nodes_take_their_sums_from_their_own_levels_histogram_when_devices_dropped() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(np.float64)
    edges = BinEdges(edges=tuple(np.linspace(-2, 2, 15, dtype=np.float32) for _ in range(3)), bins=16)
    codes = bin_codes(x, edges)
    g, h = gradients("binary:logistic", np.zeros(400), y)
    params = TreeParams(max_depth=3, min_child_weight=0.5)

    first = start_round(1)
    slots = assign_slots(first, codes, edges.missing)
    grown = grow_level(first, level_histogram(codes, slots, g, h, 1, edges.width), edges, params)
    assert len(grown.open) == 2

    # The next level comes from a smaller cohort: the rows of the devices that did not drop.
    kept = np.arange(400) < 250
    slots = assign_slots(grown, codes, edges.missing)[kept]
    second = level_histogram(codes[kept], slots, g[kept], h[kept], len(grown.open), edges.width)
    after = grow_level(grown, second, edges, params)

    level_grad, level_hess = second.node_sums()
    for s, (t, nid) in enumerate(grown.open):
        node = after.trees[t][nid]
        assert (node.grad, node.hess) == (float(level_grad[s]), float(level_hess[s]))
        if node.left >= 0:  # a split: its children's sums add up to the node's, from one histogram
            left, right = after.trees[t][node.left], after.trees[t][node.right]
            assert np.isclose(left.grad + right.grad, node.grad) and np.isclose(
                left.hess + right.hess, node.hess
            )
