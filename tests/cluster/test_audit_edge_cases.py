"""The SHAP audit at its edges: what it refuses to audit, and how it compares importances that say little."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch import nn

from shared.jobspec import AuditSpec
from training_cluster.audit import (
    AuditError,
    compare_with_baseline,
    compare_with_previous,
    draw_rows,
    explain,
    preprocessor_for,
    spearman,
)

PREPROCESS = {
    "format": "aicfl.preprocessor/1",
    "schema": {"features": [{"name": "x", "type": "numeric"}], "target": "y", "task": "binary"},
    "numeric": {"x": {"mean": 1.0, "std": 2.0}},
    "categorical": {},
    "classes": ["no", "yes"],
    "target_mean": 0.0,
    "target_std": 1.0,
}


def test_the_versions_own_preprocessing_wins_and_the_jobs_is_the_fallback() -> None:
    own = {**PREPROCESS, "numeric": {"x": {"mean": 5.0, "std": 1.0}}}
    assert preprocessor_for({"preprocess": own}, PREPROCESS).means == {"x": 5.0}
    assert preprocessor_for({}, PREPROCESS).means == {"x": 1.0}


def test_a_version_without_usable_preprocessing_is_not_audited() -> None:
    with pytest.raises(AuditError, match="^the model version has no preprocessing description$"):
        preprocessor_for({"arch": {}}, None)
    with pytest.raises(AuditError, match="^not a valid preprocessor description: "):
        preprocessor_for({"preprocess": {**PREPROCESS, "numeric": {"x": {}}}})


def test_no_rows_are_drawn_from_empty_reference_data_and_small_data_is_used_whole() -> None:
    with pytest.raises(AuditError, match="^the reference data has no rows$"):
        draw_rows(0, AuditSpec(), seed=1, version=1)
    rows, background = draw_rows(7, AuditSpec(rows=10, background=10), seed=1, version=1)
    assert rows.tolist() == background.tolist() == list(range(7))


def test_an_unknown_explainer_is_refused() -> None:
    x = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="^unknown explainer 'lime'; expected deep or gradient$"):
        explain(nn.Linear(3, 1), x, x, explainer="lime")  # type: ignore[arg-type]


def test_rank_correlation_is_none_when_an_importance_is_not_a_number() -> None:
    # None reads as "not comparable" in the report; NaN would not even be valid JSON.
    assert spearman([1.0, math.nan, 2.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_a_version_whose_importances_all_vanished_is_drift_for_every_feature() -> None:
    # A constant model (every output the same) attributes nothing to any feature.
    drift, reasons = compare_with_previous({"a": 0.0, "b": 0.0}, {"a": 3.0, "b": 1.0}, AuditSpec())
    assert drift["rank_correlation"] is None
    assert [(s["feature"], s["share_before"], s["share_after"]) for s in drift["shifted"]] == [
        ("a", 0.75, 0.0),
        ("b", 0.25, 0.0),
    ]
    assert reasons == [
        "a's share of total importance moved from 75.0% to 0.0% (more than 15%)",
        "b's share of total importance moved from 25.0% to 0.0% (more than 15%)",
    ]


@pytest.mark.parametrize(
    "baseline",
    [None, {}, {"leader": "GBM_1"}, {"leader": "GBM_1", "contributions": {"model": None, "features": {}}}],
)
def test_a_baseline_without_treeshap_contributions_is_not_compared(baseline: dict | None) -> None:
    # Multinomial leaders, for one, come without contributions (H2O computes none for them).
    assert compare_with_baseline({"a": 1.0}, baseline, top=5) is None
