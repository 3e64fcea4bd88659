"""Bin edges from cell counts summed like SecAgg+ sums them; bin codes that follow XGBoost's split rule."""

from __future__ import annotations

import numpy as np

from shared.gbdt.binning import (
    bin_codes,
    count_cells,
    decode_counts,
    encode_counts,
    fine_grid,
    quantile_edges,
)
from shared.gbdt.simulation import secure_sum


def test_summed_cell_counts_equal_the_pooled_counts() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size=(n, 2)) for n in (50, 400, 7)]
    pooled = np.concatenate(parts)
    grid = fine_grid(pooled.mean(axis=0), pooled.std(axis=0))
    total = decode_counts(secure_sum([encode_counts(count_cells(p, grid)) for p in parts]), grid)
    assert np.array_equal(total, count_cells(pooled, grid))
    assert total.sum() == pooled.size  # values beyond the grid count in its end cells, none lost


def test_edges_split_continuous_values_into_near_equal_bins() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20_000, 1))
    grid = fine_grid([0.0], [1.0])
    edges = quantile_edges(count_cells(x, grid), grid, bins=16)
    assert 12 <= edges.edges[0].size <= 15  # at most bins - 1
    assert edges.edges[0].dtype == np.float32 and (np.diff(edges.edges[0]) > 0).all()
    per_bin = np.bincount(bin_codes(x, edges)[:, 0])
    assert per_bin.max() <= 2.5 * x.shape[0] / 16


def test_few_distinct_values_get_an_edge_in_every_gap() -> None:
    x = np.repeat(np.arange(10.0), 30)[:, None]
    grid = fine_grid([x.mean()], [x.std()])
    cut = quantile_edges(count_cells(x, grid), grid, bins=256).edges[0]
    assert cut.size == 9
    assert ((cut > np.arange(9)) & (cut < np.arange(1, 10))).all()


def test_constant_column_gets_no_edge() -> None:
    x = np.full((100, 1), 4.2)
    grid = fine_grid([4.2], [0.0])
    assert quantile_edges(count_cells(x, grid), grid, bins=32).edges[0].size == 0


def test_bin_codes_follow_xgboosts_rule_and_code_missing_values_apart() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 3))
    x[rng.random(x.shape) < 0.1] = np.nan
    grid = fine_grid(np.nanmean(x, axis=0), np.nanstd(x, axis=0))
    edges = quantile_edges(count_cells(x, grid), grid, bins=8)
    codes = bin_codes(x, edges)
    assert codes.dtype == np.uint8
    assert (codes[np.isnan(x)] == edges.missing).all()
    for f, cut in enumerate(edges.edges):
        present = ~np.isnan(x[:, f])
        for b, edge in enumerate(cut):
            # A split after bin b sends left exactly the values below edges[b] (float32, as XGBoost reads them).
            assert np.array_equal(codes[present, f] <= b, x[present, f].astype(np.float32) < edge)


def test_a_value_equal_to_an_edge_goes_right_as_in_xgboost() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 1))
    grid = fine_grid([0.0], [1.0])
    edges = quantile_edges(count_cells(x, grid), grid, bins=16)
    cut = edges.edges[0]
    codes = bin_codes(cut[:, None], edges)[:, 0]
    assert np.array_equal(codes, np.arange(1, cut.size + 1))  # x == edges[b] is not < edges[b]: bin b + 1
