"""Bin edges per numeric feature, found from a histogram summed under SecAgg+.

XGBoost's ``hist`` method cuts each feature at up to ``max_bin`` quantiles of
its values. A federation cannot pool the values, nor ask each device for its
quantiles: both reveal one device's data. Instead the coordinator fixes a
fine grid per feature (:data:`CELLS` equal cells over ``mean ± WIDTH · std``,
the moments coming from the statistics round), each device counts its values
in those cells (:func:`count_cells`, an integer vector SecAgg+ can sum), and
from the summed counts alone the coordinator chooses at most ``bins - 1``
edges at cell boundaries near the global quantiles (:func:`quantile_edges`).
Values outside the grid count in its first or last cell: the tails lose
resolution, not rows. Each device then maps its values to bin indices once
(:func:`bin_codes`).

Edges are float32, as XGBoost stores split conditions and compares float32
feature values: a value ``x`` lands in bin ``b`` when
``edges[b - 1] <= x < edges[b]``, so a split after bin ``b`` sends left
exactly the values with ``x < edges[b]``, XGBoost's rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CELLS = 1024
WIDTH = 6.0


@dataclass(frozen=True, eq=False)
class FineGrid:
    """``cells`` equal cells per feature over ``[low, high)``; what devices count their values in."""

    low: np.ndarray  # float64, one per feature
    high: np.ndarray
    cells: int = CELLS

    @property
    def n_features(self) -> int:
        return int(self.low.size)


@dataclass(frozen=True, eq=False)
class BinEdges:
    """The cut points of each feature (float32, strictly increasing), for at most ``bins`` bins each.

    Bin codes run from 0 to ``len(edges[f])``; :attr:`missing` (= ``bins``)
    is the code of a missing value, whatever the feature.
    """

    edges: tuple[np.ndarray, ...]
    bins: int

    @property
    def n_features(self) -> int:
        return len(self.edges)

    @property
    def missing(self) -> int:
        return self.bins

    @property
    def width(self) -> int:
        """Histogram slots per feature: ``bins`` value bins and the missing one."""
        return self.bins + 1

    @property
    def counts(self) -> np.ndarray:
        """The number of edges of each feature (int64): a split may follow bins ``0 .. count - 1``."""
        return np.array([e.size for e in self.edges], dtype=np.int64)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint8 if self.bins <= np.iinfo(np.uint8).max else np.uint16


def fine_grid(
    means: Sequence[float], stds: Sequence[float], cells: int = CELLS, width: float = WIDTH
) -> FineGrid:
    """The grid over ``mean ± width · std`` of each feature, from the global moments of the statistics round.

    A constant column (std 0) gets a unit-wide grid around its mean: one
    occupied cell, so no edge.
    """
    if cells < 2:
        raise ValueError(f"a grid needs at least 2 cells, got {cells}")
    mean = np.asarray(means, dtype=np.float64)
    std = np.asarray(stds, dtype=np.float64)
    if mean.shape != std.shape or mean.ndim != 1:
        raise ValueError("means and stds must be two sequences of the same length")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise ValueError("means and stds must be finite, stds not negative")
    half = np.where(std > 0, width * std, 0.5)
    return FineGrid(low=mean - half, high=mean + half, cells=cells)


def grid_from_statistics(
    merged: Mapping[str, Any], columns: Sequence[str], cells: int = CELLS, width: float = WIDTH
) -> FineGrid:
    """The grid of ``columns`` from the statistics round's merged totals (``shared.tabular.merge_statistics``).

    Reads each column's ``count``, ``sum`` and ``sum_sq`` and takes the mean
    and deviation as the tabular preprocessor does; a column without values
    gets a grid around 0.
    """
    means, stds = [], []
    for column in columns:
        moments = merged["numeric"][column]
        count = moments.get("count", 0)
        mean = moments["sum"] / count if count > 0 else 0.0
        variance = max(moments["sum_sq"] / count - mean * mean, 0.0) if count > 0 else 0.0
        means.append(float(mean))
        stds.append(float(np.sqrt(variance)))
    return fine_grid(means, stds, cells=cells, width=width)


def count_cells(x: np.ndarray, grid: FineGrid) -> np.ndarray:
    """A device's counts of its values per (feature, cell), int64 ``(features, cells)``; missing values skipped."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != grid.n_features:
        raise ValueError(f"expected a matrix of {grid.n_features} columns, got shape {values.shape}")
    scaled = (values - grid.low) * (grid.cells / (grid.high - grid.low))
    present = ~np.isnan(scaled)
    cell = np.clip(np.floor(np.where(present, scaled, 0.0)), 0, grid.cells - 1).astype(np.int64)
    keys = (cell + np.arange(grid.n_features, dtype=np.int64) * grid.cells)[present]
    counts = np.bincount(keys, minlength=grid.n_features * grid.cells)
    return counts.reshape(grid.n_features, grid.cells)


def encode_counts(counts: np.ndarray) -> np.ndarray:
    """The cell counts as the uint64 vector a device masks; their modular sum is the exact total below 2**63."""
    c = np.asarray(counts)
    if c.dtype.kind not in "iu" or (c < 0).any():
        raise ValueError("cell counts must be non-negative integers")
    return c.astype(np.uint64).ravel()


def decode_counts(total: np.ndarray, grid: FineGrid) -> np.ndarray:
    """The summed cell counts, int64 ``(features, cells)``, from the unmasked sum of :func:`encode_counts`."""
    t = np.asarray(total, dtype=np.uint64).ravel()
    if t.size != grid.n_features * grid.cells:
        raise ValueError(f"expected {grid.n_features * grid.cells} counts, got {t.size}")
    ints = t.view(np.int64)
    if (ints < 0).any():
        raise ValueError("a summed cell count is negative: the sum wrapped around or was tampered with")
    return ints.reshape(grid.n_features, grid.cells).copy()


def _feature_edges(counts: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    cells = counts.size
    occupied = np.flatnonzero(counts)
    if occupied.size < 2:
        return np.empty(0, dtype=np.float32)
    # One candidate per gap between consecutive occupied cells, at the gap's middle boundary:
    # every candidate in a gap splits the rows alike, the middle one generalises best.
    boundary = (occupied[:-1] + 1 + occupied[1:]) // 2
    below = np.cumsum(counts)[occupied[:-1]]
    if boundary.size > bins - 1:
        total = below[-1] + counts[occupied[-1]]
        targets = np.arange(1, bins) * (total / bins)
        pick = np.unique(np.minimum(np.searchsorted(below, targets), boundary.size - 1))
        boundary = boundary[pick]
    values = (low + boundary * ((high - low) / cells)).astype(np.float32)
    return np.unique(values)  # float32 rounding can merge neighbours; unique also sorts


def quantile_edges(total_counts: np.ndarray, grid: FineGrid, bins: int) -> BinEdges:
    """At most ``bins - 1`` edges per feature near the quantiles of the summed cell counts (the coordinator's step).

    A feature with few occupied cells gets an edge in every gap between them,
    as XGBoost cuts at every distinct value when there are fewer than
    ``max_bin``.
    """
    if not 2 <= bins <= 65_534:
        raise ValueError(f"bins must be between 2 and 65534, got {bins}")
    counts = np.asarray(total_counts)
    if counts.shape != (grid.n_features, grid.cells):
        raise ValueError(f"expected counts of shape {(grid.n_features, grid.cells)}, got {counts.shape}")
    edges = tuple(
        _feature_edges(counts[f], float(grid.low[f]), float(grid.high[f]), bins)
        for f in range(grid.n_features)
    )
    return BinEdges(edges=edges, bins=bins)


def bin_codes(x: np.ndarray, edges: BinEdges) -> np.ndarray:
    """Each value's bin, ``(rows, features)`` of :attr:`BinEdges.dtype`; missing values get :attr:`BinEdges.missing`.

    Values are compared as float32, as XGBoost reads them.
    """
    values = np.asarray(x, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != edges.n_features:
        raise ValueError(f"expected a matrix of {edges.n_features} columns, got shape {values.shape}")
    out = np.empty(values.shape, dtype=edges.dtype)
    for f, cut in enumerate(edges.edges):
        column = values[:, f]
        codes = np.searchsorted(cut, column, side="right")
        out[:, f] = np.where(np.isnan(column), edges.missing, codes)
    return out
