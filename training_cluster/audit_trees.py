"""The SHAP audit of a ``[model] zoo = "gbdt"`` version: shap's ``TreeExplainer`` on its boosted trees.

A gbdt version (``shared.gbdt.model``: the bin edges and the ensemble) splits the same input
columns a zoo network reads (the job's preprocessing: standardised numerics, one-hot categories),
so everything but the explainer is the tabular audit's: the rows (:func:`draw_rows`), the sums
into features, validation, drift, the verdict, the plots and the report (:func:`summarise`).

The explainer is shap's ``TreeExplainer`` on the version's XGBoost export (the very model that
``aicfl models export --format xgboost`` hands out), interventional over the audit's background
rows (Lundberg et al., Nature Machine Intelligence 2020, "Independent Tree SHAP"): exact Shapley
values of the raw margin with the expected value over the background, which is what the
DeepExplainer of a network reports too, so that the exact or permutation validation over the same
background checks the numbers rather than approximates them. The path-dependent variant was left
aside because its expectation is weighted by each node's cover, here the cohort's summed hessians
(``p (1 - p)`` per row for logistic): not the mean output over any rows, and under dropouts a
child's cover need not add up to its parent's (docs/gbdt.md).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from shared.gbdt import Ensemble, dumps, predict_margin
from shared.gbdt.model import BoostedModel, ModelFormatError, from_bytes
from shared.jobspec import JobSpec
from shared.tabular import Preprocessor
from training_cluster.audit import (
    Attributions,
    AuditError,
    AuditResult,
    draw_rows,
    to_features,
)
from training_cluster.audit_drift import mean_abs_importance
from training_cluster.audit_report import summarise
from training_cluster.audit_tabular import _feature_data, feature_groups, output_description, preprocessor_for

_SHAP_FOR_TREES = (0, 50)


class EnsembleMargins(nn.Module):
    """An ensemble's raw margins ``(rows, outputs)`` as a module.

    The core's validation (exact or permutation Shapley values over the background) evaluates a
    module; trees have no gradient, only values, which is all that validation asks for. With a
    booster, XGBoost's own predictor computes them (a permutation estimate makes tens of thousands
    of rows per explained row, which it predicts about ten times faster than aicfl's numpy
    predictor); without one (no trees), aicfl's.
    """

    def __init__(self, ensemble: Ensemble, booster: Any = None):
        super().__init__()
        self.ensemble = ensemble
        self.booster = booster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().numpy()
        if self.booster is None:
            return torch.from_numpy(predict_margin(self.ensemble, rows))
        margins = self.booster.inplace_predict(rows, predict_type="margin")
        return torch.from_numpy(np.asarray(margins, dtype=np.float32).reshape(len(rows), -1))


def load_boosted(header: dict[str, Any], vector: np.ndarray) -> BoostedModel:
    """A gbdt version's content from its header and its bytes: the uint8 vector the registry stores (or
    the same values as floats, as a caller that reads every version as float32 holds them)."""
    arch = header.get("arch") or {}
    if arch.get("zoo") != "gbdt":
        raise AuditError(f"the model version is not a boosted ensemble (its arch is {arch.get('zoo')!r})")
    raw = np.asarray(vector)
    if raw.dtype != np.uint8:
        if raw.size and not (np.all(np.isfinite(raw)) and raw.min() >= 0 and raw.max() <= 255):
            raise AuditError("the boosted model's bytes are not byte values (0-255)")
        if not np.array_equal(raw, np.round(raw)):
            raise AuditError("the boosted model's bytes are not whole numbers")
        raw = raw.astype(np.uint8)
    try:
        return from_bytes(raw)
    except ModelFormatError as err:
        raise AuditError(f"cannot load the boosted model: {err}") from None


def booster_of(ensemble: Ensemble, threads: int | None = None) -> Any:
    """The ensemble's XGBoost export loaded in ``xgboost.Booster`` (``threads``: its threads, default 1);
    None when it has no trees."""
    if not ensemble.trees:
        return None
    try:
        import xgboost
    except ImportError:
        raise AuditError(
            "the SHAP audit of a gbdt version explains its XGBoost export: install xgboost"
            " (pip install 'xgboost-cpu>=3.0')"
        ) from None
    booster = xgboost.Booster()
    booster.load_model(bytearray(dumps(ensemble)))
    booster.set_param({"nthread": threads or 1})
    return booster


def explain_trees(ensemble: Ensemble, booster: Any, x: np.ndarray, background: np.ndarray) -> Attributions:
    """Interventional TreeSHAP values of the ensemble's margins for the rows ``x`` against ``background``.

    ``booster``: :func:`booster_of` the ensemble. ``values``: ``(rows, columns, outputs)``;
    ``expected``: the mean margin over the background; ``outputs``: the margins, both by aicfl's
    predictor (``shared.gbdt.predict_margin``), so that the additivity check also holds the export
    to it. shap reads only the first of XGBoost's per-class ``base_score`` values, so its own
    ``expected_value`` is off by the difference for the other classes of a softmax ensemble; the
    Shapley values, differences of margins, are not affected. An ensemble without trees (a gbdt
    job's version 0) is a constant: every value is 0.
    """
    xr = np.ascontiguousarray(x, dtype=np.float32)
    xb = np.ascontiguousarray(background, dtype=np.float32)
    outputs = predict_margin(ensemble, xr).astype(np.float64)
    expected = predict_margin(ensemble, xb).astype(np.float64).mean(axis=0)
    values = np.zeros((xr.shape[0], xr.shape[1], ensemble.outputs), dtype=np.float64)
    if booster is not None and len(xr):
        import shap

        if tuple(int(part) for part in shap.__version__.split(".")[:2]) < _SHAP_FOR_TREES:
            # Earlier releases cannot read the vector base_score XGBoost 3.1 writes for every model.
            raise AuditError(
                f"the SHAP audit of a gbdt version needs shap >= 0.50 (this worker has {shap.__version__})"
            )
        explainer = shap.TreeExplainer(
            booster, data=xb, feature_perturbation="interventional", model_output="raw"
        )
        raw = explainer.shap_values(xr, check_additivity=False)
        values = np.asarray(raw, dtype=np.float64).reshape(values.shape)
    return Attributions(values=values, expected=expected, outputs=outputs, explainer="tree")


def _prepared(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    version: int,
    seed: int,
    job_preprocess: dict[str, Any] | None,
) -> tuple[Preprocessor, BoostedModel, np.ndarray, np.ndarray, np.ndarray]:
    """The preprocessing, the model, the input columns and the positions of the explained and background rows."""
    pre = preprocessor_for(header, job_preprocess)
    model = load_boosted(header, vector)
    x = pre.transform_features(reference)
    if x.shape[1] != model.ensemble.num_feature:
        raise AuditError(
            f"the preprocessing makes {x.shape[1]} input columns, the ensemble splits {model.ensemble.num_feature}"
        )
    rows, background = draw_rows(len(x), spec.audit, seed, version)
    return pre, model, x, rows, background


def _without_trees(previous: dict[str, Any] | None) -> bool:
    importance = (previous or {}).get("importance") or {}
    return bool(importance) and not any(float(v) > 0 for v in importance.values())


def tree_version_importance(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    *,
    version: int,
    seed: int | None = None,
    job_preprocess: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """A gbdt version's feature importances exactly as its own audit reports them (no validation, no plots).

    For drift against a previous version whose report is missing or failed.
    """
    seed = spec.seed if seed is None else seed
    pre, model, x, rows, background = _prepared(
        spec, header, vector, reference, version, seed, job_preprocess
    )
    booster = booster_of(model.ensemble, threads)
    attributions = explain_trees(model.ensemble, booster, x[rows], x[background])
    features, groups = feature_groups(pre)
    return mean_abs_importance(to_features(attributions.values, groups), features)


def audit_tree_version(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    *,
    version: int | None = None,
    previous: dict[str, Any] | None = None,
    previous_version: int | None = None,
    baseline: dict[str, Any] | None = None,
    seed: int | None = None,
    job_preprocess: dict[str, Any] | None = None,
    plots: bool = True,
    threads: int | None = None,
) -> AuditResult:
    """Audit one gbdt version on the job's reference rows; the arguments are
    :func:`~training_cluster.audit_tabular.audit_version`'s, ``vector`` being the version's bytes.

    A previous version whose importances are all 0 (a constant: a version without trees, the base
    score alone) is not compared with: against it every feature's share would have "moved" from nothing.
    Raises :class:`AuditError` (or the preprocessor's ``DataSchemaError``) when the inputs do not fit
    together.
    """
    started = time.perf_counter()
    version = int(header.get("version", 0) if version is None else version)
    seed = spec.seed if seed is None else seed
    if _without_trees(previous):
        previous = None
    if previous_version is None and previous is not None:
        previous_version = previous.get("version")
    pre, model, x, rows, background = _prepared(
        spec, header, vector, reference, version, seed, job_preprocess
    )
    xr, xb = x[rows], x[background]
    booster = booster_of(model.ensemble, threads)
    attributions = explain_trees(model.ensemble, booster, xr, xb)
    features, groups = feature_groups(pre)
    values = to_features(attributions.values, groups)

    fitted = attributions.expected[None, :] + attributions.values.sum(axis=1)
    additivity = float(np.max(np.abs(fitted - attributions.outputs))) if len(rows) else 0.0
    return summarise(
        spec,
        started=started,
        version=version,
        seed=seed,
        previous=previous,
        previous_version=previous_version,
        baseline=baseline,
        model=EnsembleMargins(model.ensemble, booster),
        xr=xr,
        xb=xb,
        groups=groups,
        attributions=attributions,
        values=values,
        features=features,
        classes=pre.classes if spec.tabular.task == "multiclass" else None,
        output=output_description(pre),
        additivity=additivity,
        threads=threads,
        plots=plots,
        swarm_data=lambda: _feature_data(reference.iloc[rows], pre),
    )
