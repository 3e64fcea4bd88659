"""One boosting round's trees, grown level by level from summed histograms: pure functions over a frozen state.

A round starts with one root per tree (:func:`start_round`); its open nodes
are the *slots* of the first level. At each level every device routes its
rows to the slots (:func:`assign_slots`) and sends its histogram; the
coordinator grows the level from the sum (:func:`grow_level`): each slot
becomes a split, whose children open the next level, or a leaf. Children at
``max_depth``, or too light to ever split (hessian below twice
``min_child_weight``), close at once as leaves from their parent's sums, so
a round of depth d takes at most d secure exchanges. When no slot is left
the round is done (:func:`finish_round`). Growth is depth-wise, as XGBoost's
default ``grow_policy``; node ids follow the order of expansion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from shared.gbdt.binning import BinEdges
from shared.gbdt.histograms import HistogramError, LevelHistogram
from shared.gbdt.splits import TreeParams, best_splits, weight, worth_splitting
from shared.gbdt.trees import Tree, leaves_from_codes


@dataclass(frozen=True)
class Node:
    """A node of a tree being grown; ``leaf`` is set once it is closed as a leaf (its value, ``eta * w``)."""

    depth: int
    parent: int
    grad: float = math.nan  # sums of its rows: an open node takes them from its level's histogram
    hess: float = math.nan
    left: int = -1
    right: int = -1
    feature: int = 0
    split_bin: int = -1
    threshold: float = 0.0
    default_left: bool = False
    loss_change: float = 0.0
    base_weight: float = 0.0
    leaf: float | None = None


@dataclass(frozen=True)
class Growth:
    """The round's trees so far and the open nodes of the current level, one ``(tree, node)`` per slot."""

    trees: tuple[tuple[Node, ...], ...]
    open: tuple[tuple[int, int], ...]
    depth: int = 0

    @property
    def done(self) -> bool:
        return not self.open


def start_round(trees: int) -> Growth:
    """The first level of a round: one open root per tree (one, or one per class)."""
    return Growth(
        trees=tuple((Node(depth=0, parent=-1),) for _ in range(trees)),
        open=tuple((t, 0) for t in range(trees)),
    )


def assign_slots(growth: Growth, codes: np.ndarray, missing: int) -> np.ndarray:
    """Each row's slot in each tree, int32 ``(rows, trees)``; -1 where the row sits in a closed leaf (device side)."""
    slot_of = {(t, nid): s for s, (t, nid) in enumerate(growth.open)}
    out = np.full((codes.shape[0], len(growth.trees)), -1, dtype=np.int32)
    for t, nodes in enumerate(growth.trees):
        tree = _draft_tree(nodes)
        leaf = leaves_from_codes(tree, codes, missing)
        table = np.array([slot_of.get((t, nid), -1) for nid in range(len(nodes))], dtype=np.int32)
        out[:, t] = table[leaf]
    return out


def grow_level(growth: Growth, hist: LevelHistogram, edges: BinEdges, params: TreeParams) -> Growth:
    """The next level from this level's summed histogram (the coordinator's step).

    Raises :class:`HistogramError` (``shape``) when the histogram does not
    match the open slots and the edges.
    """
    expected = (len(growth.open), edges.n_features, edges.width)
    if hist.shape != expected:
        raise HistogramError("shape", f"the level needs sums of shape {expected}, got {hist.shape}")
    hist_grad, hist_hess = hist.node_sums()
    nodes = [list(t) for t in growth.trees]
    sums = []
    for s, (t, nid) in enumerate(growth.open):
        node = nodes[t][nid]
        # Each open node's sums come from this level's histogram, not from its parent's split: the same
        # rows either way, but under dropouts another cohort may have sent this level, and a split's two
        # sides must add up to the node it divides.
        node = nodes[t][nid] = replace(node, grad=float(hist_grad[s]), hess=float(hist_hess[s]))
        sums.append((node.grad, node.hess))
    node_grad = np.array([g for g, _ in sums])
    node_hess = np.array([h for _, h in sums])
    splits = best_splits(hist, node_grad, node_hess, edges.counts, params)
    following: list[tuple[int, int]] = []
    for (t, nid), split in zip(growth.open, splits, strict=True):
        node = nodes[t][nid]
        w = weight(node.grad, node.hess, params)
        if split is None or not worth_splitting(split, node.depth, params):
            # XGBoost keeps a root leaf's weight before eta, a child's after (InitRoot, ExpandNode).
            nodes[t][nid] = replace(node, base_weight=w if nid == 0 else params.eta * w, leaf=params.eta * w)
            continue
        left, right = len(nodes[t]), len(nodes[t]) + 1
        nodes[t][nid] = replace(
            node,
            left=left,
            right=right,
            feature=split.feature,
            split_bin=split.bin,
            threshold=float(edges.edges[split.feature][split.bin]),
            default_left=split.default_left,
            loss_change=split.loss_change,
            base_weight=w,
        )
        for child, g, h in (
            (left, split.left_grad, split.left_hess),
            (right, split.right_grad, split.right_hess),
        ):
            depth = node.depth + 1
            child_node = Node(depth=depth, parent=nid, grad=g, hess=h)
            if depth >= params.max_depth or h < 2 * params.min_child_weight:
                cw = weight(g, h, params)
                child_node = replace(child_node, base_weight=params.eta * cw, leaf=params.eta * cw)
            else:
                following.append((t, child))
            nodes[t].append(child_node)
    return Growth(trees=tuple(tuple(t) for t in nodes), open=tuple(following), depth=growth.depth + 1)


def finish_round(growth: Growth) -> tuple[Tree, ...]:
    """The round's finished trees; refuses a round with open nodes."""
    if not growth.done:
        raise ValueError(f"the round still has {len(growth.open)} open nodes")
    return tuple(_draft_tree(nodes) for nodes in growth.trees)


def _draft_tree(nodes: tuple[Node, ...] | list[Node]) -> Tree:
    """XGBoost's arrays of a (possibly unfinished) tree; an open node acts as a leaf of value 0."""
    n = len(nodes)
    leaf = np.array([nd.left < 0 for nd in nodes])
    # A leaf's base weight is its value (XGBoost's ExpandNode); an inner node keeps w before eta.
    return Tree(
        left=np.array([nd.left for nd in nodes], dtype=np.int32),
        right=np.array([nd.right for nd in nodes], dtype=np.int32),
        parent=np.array([nd.parent for nd in nodes], dtype=np.int32),
        feature=np.where(leaf, 0, [nd.feature for nd in nodes]).astype(np.int32).reshape(n),
        split_bin=np.array([nd.split_bin for nd in nodes], dtype=np.int32),
        threshold=np.array(
            [nd.threshold if nd.left >= 0 else (nd.leaf or 0.0) for nd in nodes], dtype=np.float32
        ),
        default_left=np.array([nd.default_left for nd in nodes], dtype=bool),
        base_weight=np.array([nd.base_weight for nd in nodes], dtype=np.float32),
        loss_change=np.array([nd.loss_change for nd in nodes], dtype=np.float32),
        sum_hessian=np.array([0.0 if math.isnan(nd.hess) else nd.hess for nd in nodes], dtype=np.float32),
    )
