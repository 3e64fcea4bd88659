"""An audit's report: once a version is explained, the steps every audit shares (importances,
validation, drift, the verdict, the plots) and the JSON report the worker sends
(docs/audit.md, "The report")."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from shared.jobspec import JobSpec
from training_cluster.audit import DEFAULT_THREADS, Attributions, AuditResult, torch_threads, validate
from training_cluster.audit_drift import (
    compare_with_baseline,
    compare_with_previous,
    mean_abs_importance,
    shares,
    top_features,
)
from training_cluster.audit_plots import beeswarm_plot, importance_plot


def summarise(
    spec: JobSpec,
    *,
    started: float,
    version: int,
    seed: int,
    previous: dict[str, Any] | None,
    previous_version: int | None,
    baseline: dict[str, Any] | None,
    model: nn.Module,
    xr: np.ndarray,
    xb: np.ndarray,
    groups: np.ndarray | None,
    attributions: Attributions,
    values: np.ndarray,
    features: list[str],
    classes: Sequence[str] | None,
    output: str,
    additivity: float,
    threads: int | None,
    plots: bool,
    swarm_data: Callable[[], np.ndarray],
    shape: dict[str, Any] | None = None,
    more_plots: Callable[[], dict[str, bytes]] | None = None,
) -> AuditResult:
    """The steps both audits share once a version is explained: importances (per class when
    ``classes`` names the outputs), validation, drift against ``previous``, the verdict, the plots and
    the report.

    ``values``: per-feature attributions ``(rows, features, outputs)``; ``groups`` sums the model's
    columns into them for the validation (None: one column a feature). ``shape``: report fields
    that follow ``background``; ``more_plots``: plots after the beeswarm.
    """
    audit = spec.audit
    importance = mean_abs_importance(values, features)
    by_class: dict[str, dict[str, float]] | None = None
    if classes is not None:
        per_class = np.abs(values).mean(axis=0)
        by_class = {
            label: {name: float(per_class[i, j]) for i, name in enumerate(features)}
            for j, label in enumerate(classes)
        }

    validation = None
    if audit.validate_rows > 0:
        k = min(audit.validate_rows, len(xr))
        with torch_threads(threads or DEFAULT_THREADS):
            validation = validate(model, xr[:k], xb, values[:k], groups, seed=seed)

    previous_importance = None
    if previous is not None and previous.get("importance"):
        previous_importance = {str(k): float(v) for k, v in previous["importance"].items()}
    drift, reasons = compare_with_previous(importance, previous_importance, audit)
    verdict = "drift" if reasons else "ok"

    images: dict[str, bytes] = {}
    if plots:
        order = top_features(importance, len(importance))
        title = f"{spec.name} v{version}: {output}"
        images["importance.png"] = importance_plot(by_class or {"all": importance}, order, title)
        if classes is not None:
            # One value per row: towards the class the model predicts for that row.
            predicted = attributions.outputs.argmax(axis=1)
            swarm = values[np.arange(len(xr)), :, predicted]
            swarm_title = f"{spec.name} v{version}: SHAP towards each row's predicted class"
        else:
            swarm, swarm_title = values[:, :, 0], title
        images["beeswarm.png"] = beeswarm_plot(swarm, swarm_data(), features, swarm_title)
        if more_plots is not None:
            images.update(more_plots())

    report: dict[str, Any] = {
        "version": version,
        "previous_version": previous_version if previous_importance is not None else None,
        "explainer": attributions.explainer,
        "output": output,
        "rows": int(len(xr)),
        "background": int(len(xb)),
        **(shape or {}),
        "expected_value": [float(v) for v in attributions.expected],
        "importance": importance,
        "importance_by_class": by_class,
        "shares": shares(importance),
        "top_features": top_features(importance, audit.top),
        "additivity_max_error": additivity,
        "validation": validation,
        "drift": drift,
        "baseline": compare_with_baseline(importance, baseline, audit.top),
        "verdict": verdict,
        "reasons": reasons,
        "seconds": time.perf_counter() - started,
    }
    return AuditResult(report=report, verdict=verdict, plots=images, values=values, features=features)
