"""What the engine's tree rounds exchange: the job's boosting settings, the binning vector, a level's vector.

A ``[model] zoo = "gbdt"`` job of the built-in tabular app grows its trees on the features the
statistics round's preprocessing makes (``shared.tabular.Preprocessor``: standardised numeric
columns, one-hot categorical ones) and its encoded target. After the statistics round come:

- one **binning round** (kind ``bins``): each device sends :func:`bins_input`, its counts per cell
  of a fixed grid (:func:`grid_for`) followed by its label counts (or its target's sum) and rows;
  from the sum the coordinator takes the bin edges and XGBoost's ``base_score``
  (:func:`read_bins`) and registers version 0, the ensemble without trees;
- per boosting round and tree level one **level round** (kind ``level``): each device sends
  :func:`level_input`, the encoded histogram of the level's open slots.

The grid needs nothing beyond the preprocessing: a standardised column has mean 0 and deviation 1
over the cohort of the statistics round (its grid is ``[-6, 6)``), a one-hot column takes 0 or 1
(its grid is ``[0, 1)``, one edge between them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.gbdt.binning import CELLS, WIDTH, BinEdges, FineGrid, bin_codes, count_cells, quantile_edges
from shared.gbdt.growth import Growth, assign_slots
from shared.gbdt.histograms import SCALE, encode, level_histogram, vector_size
from shared.gbdt.model import BoostedModel
from shared.gbdt.objectives import base_scores, gradients, trees_per_round
from shared.gbdt.splits import TreeParams
from shared.gbdt.trees import Ensemble, leaves_from_codes, start_margin

if TYPE_CHECKING:
    from shared.jobspec import JobSpec

TREE_KINDS = ("bins", "level")
# Where a level round's SecAgg+ context names the trees its devices were sent.
_TREES_TAG = b"/trees/"
OBJECTIVES = {"binary": "binary:logistic", "multiclass": "multi:softprob", "regression": "reg:squarederror"}
_ONE_HOT_STD = 0.5 / WIDTH  # so that a one-hot column's grid is [0, 1)


def xgboost_params(spec: JobSpec, classes: int, nthread: int) -> dict[str, Any]:
    """XGBoost's own ``hist`` parameters for the job's ``[gbdt]`` settings: what the references it is
    measured against (pooled, or XGBoost's federated mode) train with."""
    task = spec.tabular.task
    g = spec.gbdt
    params: dict[str, Any] = {
        "objective": OBJECTIVES[task],
        "tree_method": "hist",
        "max_bin": g.bins,
        "max_depth": g.max_depth,
        "eta": g.eta,
        "lambda": g.reg_lambda,
        "gamma": g.gamma,
        "min_child_weight": g.min_child_weight,
        "nthread": nthread,
        "seed": spec.seed,
    }
    if task == "multiclass":
        params["num_class"] = classes
    return params


def is_boosted(spec: JobSpec) -> bool:
    """Whether the job grows trees: the built-in tabular app with ``[model] zoo = "gbdt"``."""
    return spec.model.app is None and spec.model.zoo == "gbdt"


@dataclass(frozen=True)
class BoostSetup:
    """A job's boosting, as both sides derive it from its spec and preprocessing."""

    objective: str
    num_class: int  # 0 unless softmax
    features: int
    one_hot: tuple[bool, ...]  # per feature: a one-hot column (else a standardised numeric one)
    bins: int
    tree: TreeParams
    cells: int = CELLS

    @property
    def trees(self) -> int:
        """Trees per boosting round: one, or one per class."""
        return trees_per_round(self.objective, self.num_class)

    @property
    def label_values(self) -> int:
        """How many values the label part of the binning vector holds (before its row count)."""
        return self.num_class if self.num_class else 1

    @property
    def bins_size(self) -> int:
        """The length of the binning vector: cell counts, label part, rows."""
        return self.features * self.cells + self.label_values + 1

    def level_size(self, slots: int) -> int:
        """The length of a level's vector for ``slots`` open nodes."""
        return vector_size(slots, self.features, self.bins + 1)

    def grid(self) -> FineGrid:
        """The grid devices count their values in (:func:`grid_for`)."""
        return grid_for(self.one_hot, self.cells)

    def empty(self, edges: BinEdges, base_score: tuple[float, ...]) -> BoostedModel:
        """Version 0: the edges and an ensemble without trees."""
        return BoostedModel(
            edges,
            Ensemble(
                objective=self.objective,
                base_score=base_score,
                num_feature=self.features,
                num_class=self.num_class,
            ),
        )


def boost_setup(spec: JobSpec, preprocess: Mapping[str, Any]) -> BoostSetup:
    """The job's :class:`BoostSetup` from its spec and its statistics round's preprocessing."""
    from shared.tabular import Preprocessor

    pre = Preprocessor.from_dict(dict(preprocess))
    task = spec.tabular.task
    objective = OBJECTIVES[task]
    one_hot: list[bool] = []
    for feature in spec.tabular.features:
        if feature.type == "numeric":
            one_hot.append(False)
        else:
            one_hot.extend([True] * len(pre.vocabularies[feature.name]))
    g = spec.gbdt
    return BoostSetup(
        objective=objective,
        num_class=len(pre.classes) if task == "multiclass" else 0,
        features=len(one_hot),
        one_hot=tuple(one_hot),
        bins=g.bins,
        tree=TreeParams(
            eta=g.eta,
            reg_lambda=g.reg_lambda,
            gamma=g.gamma,
            min_child_weight=g.min_child_weight,
            max_depth=g.max_depth,
        ),
    )


def grid_for(one_hot: tuple[bool, ...] | list[bool], cells: int = CELLS) -> FineGrid:
    """``[-6, 6)`` for a standardised column, ``[0, 1)`` for a one-hot one (see the module)."""
    flags = np.asarray(one_hot, dtype=bool)
    mean = np.where(flags, 0.5, 0.0)
    half = np.where(flags, WIDTH * _ONE_HOT_STD, WIDTH * 1.0)
    return FineGrid(low=mean - half, high=mean + half, cells=cells)


def bins_input(setup: BoostSetup, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A device's binning vector (uint64): its cell counts, its label counts or target sum, its rows."""
    counts = count_cells(x, setup.grid()).ravel()
    labels = np.asarray(y)
    if setup.num_class:
        label_part = np.bincount(labels.astype(np.int64), minlength=setup.num_class)[: setup.num_class]
    elif setup.objective == "binary:logistic":
        label_part = np.array([int(np.sum(labels >= 0.5))], dtype=np.int64)
    else:  # the target's sum, fixed point in two's complement as the histograms
        label_part = np.array([int(np.rint(np.sum(labels.astype(np.float64)) * SCALE))], dtype=np.int64)
    whole = np.concatenate([counts.astype(np.int64), label_part.astype(np.int64), [labels.shape[0]]])
    return whole.view(np.uint64)


def read_bins(setup: BoostSetup, total: np.ndarray) -> tuple[BinEdges, tuple[float, ...], int]:
    """The coordinator's step: the bin edges, ``base_score`` and the cohort's rows from the summed vector.

    ``ValueError`` for a sum of another length, negative counts, or no rows.
    """
    t = np.asarray(total, dtype=np.uint64).ravel()
    if t.size != setup.bins_size:
        raise ValueError(f"expected {setup.bins_size} values in the binning sum, got {t.size}")
    ints = t.view(np.int64)
    cells = setup.features * setup.cells
    counts = ints[:cells].reshape(setup.features, setup.cells)
    rows = int(ints[-1])
    label = ints[cells:-1]
    if (counts < 0).any() or rows <= 0:
        raise ValueError("the binning sum holds negative counts or no rows")
    edges = quantile_edges(counts, setup.grid(), setup.bins)
    if setup.num_class:
        base = base_scores(setup.objective, class_counts=label.tolist())
    elif setup.objective == "binary:logistic":
        base = base_scores(setup.objective, label_mean=float(label[0]) / rows)
    else:
        base = base_scores(setup.objective, label_mean=float(label[0]) / SCALE / rows)
    return edges, base, rows


def margins(ensemble: Ensemble, codes: np.ndarray, missing: int) -> np.ndarray:
    """The ensemble's raw margins of the coded rows, float32 ``(rows, outputs)``, as XGBoost adds them."""
    m = start_margin(ensemble, codes.shape[0])
    for tree, k in zip(ensemble.trees, ensemble.tree_class, strict=True):
        m[:, k] += tree.threshold[leaves_from_codes(tree, codes, missing)]
    return m


def level_input(
    setup: BoostSetup,
    model: BoostedModel,
    growth: Growth,
    codes: np.ndarray,
    y: np.ndarray,
    devices: int,
    grads: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """A device's level vector (uint64): its histogram of the open slots, encoded for ``devices``.

    ``codes``: its rows' bin codes (:func:`shared.gbdt.bin_codes` with the model's edges);
    ``grads``: its gradients and hessians under the model, when already computed.
    """
    if grads is None:
        grads = device_gradients(setup, model, codes, y)
    g, h = grads
    slots = assign_slots(growth, codes, model.edges.missing)
    hist = level_histogram(codes, slots, g, h, len(growth.open), model.edges.width)
    return encode(hist, devices)


def device_gradients(
    setup: BoostSetup, model: BoostedModel, codes: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients and hessians of the device's rows under the model so far, ``(rows, trees)`` each."""
    m = margins(model.ensemble, codes, model.edges.missing)
    return gradients(setup.objective, m if setup.trees > 1 else m[:, 0], y)


def codes_of(model: BoostedModel, x: np.ndarray) -> np.ndarray:
    """The rows' bin codes under the model's edges."""
    return bin_codes(x, model.edges)


def trees_digest(task: Mapping[str, Any]) -> str:
    """SHA-256 of a level round's task for its devices (the boosting round's trees so far, their open
    slots, the cohort size) as canonical JSON: the same on the coordinator and on every device."""
    text = json.dumps(task, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def bind_trees(context: bytes, task: Mapping[str, Any]) -> bytes:
    """A level round's SecAgg+ context, naming the trees its devices are sent.

    A device's level histogram is computed against the trees its task names; a coordinator that sent
    one device other trees than the rest could route that device's rows alone into a slot and read
    its histogram from the sum. The context enters every signature of the round (Bell et al.'s
    advertise and share stages): each device accepts only a context that names the trees it was sent
    (:func:`binds_trees`), so devices sent different trees hold different contexts, their
    neighbours' signatures fail and the round ends before any histogram is masked.
    """
    return context + _TREES_TAG + trees_digest(task).encode()


def binds_trees(context: bytes, task: Mapping[str, Any]) -> bool:
    """Whether a level round's context names exactly the trees ``task`` holds (:func:`bind_trees`)."""
    return context.endswith(_TREES_TAG + trees_digest(task).encode())
