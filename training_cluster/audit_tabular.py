"""The SHAP audit of a zoo model on tabular rows: its preprocessing, its features and its report."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from shared.jobspec import JobSpec
from shared.tabular import Preprocessor
from shared.zoo import build_model, load_flat_parameters
from training_cluster.audit import (
    AuditError,
    AuditResult,
    ExplainerName,
    draw_rows,
    explain,
    to_features,
)
from training_cluster.audit_drift import mean_abs_importance
from training_cluster.audit_report import summarise


def load_model(header: dict[str, Any], vector: np.ndarray) -> nn.Module:
    """The zoo module a model version's header describes, with its parameters, in eval mode."""
    try:
        model = build_model(header["arch"])
        load_flat_parameters(model, np.asarray(vector, dtype=np.float32))
    except (KeyError, TypeError, ValueError) as err:
        raise AuditError(f"cannot load the model: {err}") from None
    return model.eval()


def preprocessor_for(header: dict[str, Any], fallback: dict[str, Any] | None = None) -> Preprocessor:
    """The preprocessing a version was trained with (its header's), else the job's."""
    description = header.get("preprocess") or fallback
    if description is None:
        raise AuditError("the model version has no preprocessing description")
    try:
        return Preprocessor.from_dict(description)
    except ValueError as err:
        raise AuditError(str(err)) from None


def feature_groups(pre: Preprocessor) -> tuple[list[str], np.ndarray]:
    """The original features and the ``(columns, features)`` 0/1 matrix that sums columns into them."""
    features = [f.name for f in pre.schema.features]
    index = {name: i for i, name in enumerate(features)}
    owners = pre.column_features
    matrix = np.zeros((len(owners), len(features)), dtype=np.float64)
    matrix[np.arange(len(owners)), [index[o] for o in owners]] = 1.0
    return features, matrix


def _feature_data(reference: pd.DataFrame, pre: Preprocessor) -> np.ndarray:
    """Colour values for the beeswarm: numeric features as they are, categorical ones grey (NaN)."""
    columns = []
    for feature in pre.schema.features:
        if feature.type == "numeric":
            columns.append(pd.to_numeric(reference[feature.name], errors="coerce").to_numpy(dtype=np.float64))
        else:
            columns.append(np.full(len(reference), np.nan))
    return np.column_stack(columns) if columns else np.zeros((len(reference), 0))


def output_description(pre: Preprocessor) -> str:
    """What the SHAP values explain, in words: the model's raw output for the task."""
    schema = pre.schema
    if schema.task == "binary":
        return f"logit of P({schema.target} = {pre.positive})"
    if schema.task == "multiclass":
        return f"logit of each class of {schema.target} (before softmax)"
    return f"{schema.target} standardised: (value - {pre.target_mean:.6g}) / {pre.target_std:.6g}"


def version_importance(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    *,
    version: int,
    seed: int | None = None,
    job_preprocess: dict[str, Any] | None = None,
    explainer: ExplainerName | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """A version's feature importances exactly as its own audit reports them (no validation, no plots).

    For drift against a previous version whose report is missing or failed.
    """
    pre = preprocessor_for(header, job_preprocess)
    model = load_model(header, vector)
    x = pre.transform_features(reference)
    rows, background = draw_rows(len(x), spec.audit, spec.seed if seed is None else seed, version)
    attributions = explain(model, x[rows], x[background], explainer=explainer, seed=version, threads=threads)
    features, groups = feature_groups(pre)
    return mean_abs_importance(to_features(attributions.values, groups), features)


def audit_version(
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
    explainer: ExplainerName | None = None,
    plots: bool = True,
    threads: int | None = None,
) -> AuditResult:
    """Audit one model version on the job's reference rows.

    ``header``: the version's header (``arch``, ``preprocess``, ``version``);
    ``vector``: its flat parameters. ``previous``: the previous version's report
    (at least its ``importance``), or None for the first version.
    ``baseline``: the job's AutoML baseline (its ``contributions``), or None.
    ``seed``: the job's seed (default ``spec.seed``); rows are drawn from it
    and the version. Raises :class:`AuditError` (or the preprocessor's
    ``DataSchemaError``) when the inputs do not fit together.
    """
    started = time.perf_counter()
    version = int(header.get("version", 0) if version is None else version)
    seed = spec.seed if seed is None else seed
    if previous_version is None and previous is not None:
        previous_version = previous.get("version")
    pre = preprocessor_for(header, job_preprocess)
    model = load_model(header, vector)
    x = pre.transform_features(reference)
    if x.shape[1] != int(header["arch"]["input_dim"]):
        raise AuditError(
            f"the preprocessing makes {x.shape[1]} input columns, the model takes {header['arch']['input_dim']}"
        )
    rows, background = draw_rows(len(x), spec.audit, seed, version)
    xr, xb = x[rows], x[background]
    attributions = explain(model, xr, xb, explainer=explainer, seed=version, threads=threads)
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
        model=model,
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
