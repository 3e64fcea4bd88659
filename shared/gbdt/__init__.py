"""Federated gradient-boosted trees whose histograms are summed under SecAgg+ (docs/gbdt.md).

Pure functions and frozen dataclasses over numpy arrays, no I/O: the device
side (:func:`count_cells`, :func:`bin_codes`, :func:`gradients`,
:func:`assign_slots`, :func:`level_histogram`, :func:`encode`), the
coordinator side (:func:`quantile_edges`, :func:`decode`,
:func:`check_histogram`, :func:`grow_level`), the predictor and the export as
an XGBoost JSON model. :func:`train_in_memory` runs the protocol in one
process.
"""

from shared.gbdt.binning import (
    BinEdges,
    FineGrid,
    bin_codes,
    count_cells,
    decode_counts,
    encode_counts,
    fine_grid,
    grid_from_statistics,
    quantile_edges,
)
from shared.gbdt.growth import Growth, assign_slots, finish_round, grow_level, start_round
from shared.gbdt.histograms import (
    HistogramError,
    LevelHistogram,
    check_histogram,
    decode,
    encode,
    level_histogram,
)
from shared.gbdt.objectives import base_scores, gradients, trees_per_round
from shared.gbdt.simulation import BoostConfig, train_in_memory
from shared.gbdt.splits import Split, TreeParams, best_splits
from shared.gbdt.trees import Ensemble, Tree, predict, predict_margin, with_round
from shared.gbdt.xgboost_json import dumps, to_xgboost_json

__all__ = [
    "BinEdges",
    "BoostConfig",
    "Ensemble",
    "FineGrid",
    "Growth",
    "HistogramError",
    "LevelHistogram",
    "Split",
    "Tree",
    "TreeParams",
    "assign_slots",
    "base_scores",
    "best_splits",
    "bin_codes",
    "check_histogram",
    "count_cells",
    "decode",
    "decode_counts",
    "dumps",
    "encode",
    "encode_counts",
    "fine_grid",
    "finish_round",
    "gradients",
    "grid_from_statistics",
    "grow_level",
    "level_histogram",
    "predict",
    "predict_margin",
    "quantile_edges",
    "start_round",
    "to_xgboost_json",
    "train_in_memory",
    "trees_per_round",
    "with_round",
]
