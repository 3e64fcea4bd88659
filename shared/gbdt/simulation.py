"""The whole federated protocol in one process: devices' partitions in memory, sums in plain sight.

Every step the engine will take runs here in its order, with the real device
and coordinator functions; only SecAgg+ is replaced by the plain sum modulo
2**64 of the devices' vectors, which is exactly (and only) what SecAgg+
yields. The steps: the statistics round (moments and label counts, here
summed in the clear, in the engine under ``shared/secagg/statistics.py``);
the binning round (cell counts, one secure sum); then, per boosting round
and tree level, one secure sum of the level's histograms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.gbdt.binning import (
    CELLS,
    WIDTH,
    BinEdges,
    FineGrid,
    bin_codes,
    count_cells,
    decode_counts,
    encode_counts,
    grid_from_statistics,
    quantile_edges,
)
from shared.gbdt.growth import assign_slots, finish_round, grow_level, start_round
from shared.gbdt.histograms import check_histogram, decode, encode, level_histogram
from shared.gbdt.objectives import base_scores, check_objective, gradients, trees_per_round
from shared.gbdt.splits import TreeParams
from shared.gbdt.trees import Ensemble, leaves_from_codes, start_margin, with_round


@dataclass(frozen=True)
class BoostConfig:
    """What a federated boosting job fixes: objective, rounds, ``max_bin``, the tree hyperparameters, the grid."""

    objective: str
    num_class: int = 0
    rounds: int = 50
    bins: int = 256
    tree: TreeParams = field(default_factory=TreeParams)
    cells: int = CELLS
    width: float = WIDTH


@dataclass(frozen=True)
class Trace:
    """What the coordinator saw: the bin edges and how many secure sums (binning plus levels) it took."""

    edges: BinEdges
    secure_sums: int


def secure_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2**64 of the devices' uint64 vectors: what SecAgg+ hands the coordinator."""
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total += v  # uint64 addition wraps modulo 2**64
    return total


def _statistics(partitions: Sequence[tuple[np.ndarray, np.ndarray]], config: BoostConfig) -> dict:
    features = partitions[0][0].shape[1]
    merged: dict = {
        "numeric": {},
        "rows": 0,
        "label_sum": 0.0,
        "class_counts": np.zeros(max(config.num_class, 1)),
    }
    for x, y in partitions:
        present = ~np.isnan(x)
        values = np.where(present, x, 0.0)
        for f in range(features):
            m = merged["numeric"].setdefault(str(f), {"count": 0, "sum": 0.0, "sum_sq": 0.0})
            m["count"] += int(present[:, f].sum())
            m["sum"] += float(values[:, f].sum())
            m["sum_sq"] += float(np.square(values[:, f]).sum())
        merged["rows"] += len(y)
        merged["label_sum"] += float(np.sum(y))
        if config.num_class:
            merged["class_counts"] += np.bincount(np.asarray(y, dtype=np.int64), minlength=config.num_class)
    return merged


def train_in_memory(
    partitions: Sequence[tuple[np.ndarray, np.ndarray]], config: BoostConfig, grid: FineGrid | None = None
) -> tuple[Ensemble, Trace]:
    """Boost ``config.rounds`` rounds over the devices' ``(x, y)`` partitions; the ensemble and the trace.

    Each summed level histogram passes :func:`check_histogram` against the
    cohort's row count before the coordinator grows the level. ``grid``: the
    cells devices count their values in (default: from the partitions'
    moments, :func:`grid_from_statistics`); the engine fixes its own
    (``shared.gbdt.rounds.grid_for``).
    """
    check_objective(config.objective, config.num_class)
    devices = len(partitions)
    features = partitions[0][0].shape[1]
    stats = _statistics(partitions, config)
    if grid is None:
        grid = grid_from_statistics(
            stats, [str(f) for f in range(features)], cells=config.cells, width=config.width
        )
    counts = decode_counts(secure_sum([encode_counts(count_cells(x, grid)) for x, _ in partitions]), grid)
    edges = quantile_edges(counts, grid, config.bins)
    sums = 1
    codes = [bin_codes(x, edges) for x, _ in partitions]
    labels = [np.asarray(y) for _, y in partitions]
    base = base_scores(
        config.objective,
        label_mean=stats["label_sum"] / stats["rows"],
        class_counts=stats["class_counts"].tolist(),
    )
    trees = trees_per_round(config.objective, config.num_class)
    ensemble = Ensemble(
        objective=config.objective,
        base_score=base,
        num_feature=features,
        num_class=config.num_class if trees > 1 else 0,
    )
    margins = [start_margin(ensemble, len(y)) for y in labels]
    for _ in range(config.rounds):
        grads = [
            gradients(config.objective, m if trees > 1 else m[:, 0], y)
            for m, y in zip(margins, labels, strict=True)
        ]
        growth = start_round(trees)
        while not growth.done:
            shape = (len(growth.open), features, edges.width)
            vectors = []
            for c, (g, h) in zip(codes, grads, strict=True):
                slots = assign_slots(growth, c, edges.missing)
                vectors.append(encode(level_histogram(c, slots, g, h, shape[0], edges.width), devices))
            total = decode(secure_sum(vectors), *shape)
            check_histogram(
                total,
                n_slots=shape[0],
                features=features,
                width=edges.width,
                objective=config.objective,
                rows=stats["rows"],
                trees=trees,
                devices=devices,
            )
            growth = grow_level(growth, total, edges, config.tree)
            sums += 1
        new_trees = finish_round(growth)
        ensemble = with_round(ensemble, new_trees)
        for c, m in zip(codes, margins, strict=True):
            for k, tree in enumerate(new_trees):
                m[:, k] += tree.threshold[leaves_from_codes(tree, c, edges.missing)]
    return ensemble, Trace(edges=edges, secure_sums=sums)
