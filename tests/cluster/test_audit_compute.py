"""The SHAP audit's computation (training_cluster/audit.py) on real data sets and zoo models.

Closed forms where SHAP values are known (linear and logistic models), the
additivity of the attributions, the validation against shap's exact and
permutation explainers, and the drift verdict between versions of a model
trained in simulated federated rounds on mlc_churn.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from shared.datasets import load_dataset, natural_split, test_split
from shared.jobspec import JobSpec, validate_spec
from shared.tabular import DataSchemaError, Preprocessor, local_statistics, merge_statistics, read_table_bytes
from shared.training import train_local
from shared.zoo import architecture, build_model, flatten_parameters, load_flat_parameters, parameter_count
from training_cluster.audit import (
    audit_version,
    choose_explainer,
    draw_rows,
    explain,
    feature_groups,
    load_model,
    version_importance,
)

REPORT_FIELDS = {
    "version",
    "previous_version",
    "explainer",
    "output",
    "rows",
    "background",
    "importance",
    "importance_by_class",
    "shares",
    "top_features",
    "additivity_max_error",
    "validation",
    "drift",
    "baseline",
    "verdict",
    "reasons",
    "seconds",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- data


def _spec(schema: dict[str, Any], model: dict[str, Any], audit: dict[str, Any] | None = None) -> JobSpec:
    return validate_spec(
        {"name": "audit-test", "rounds": 3, "seed": 7, "data": schema, "model": model, "audit": audit or {}}
    )


def _preprocessor(frame: pd.DataFrame, spec: JobSpec) -> Preprocessor:
    return Preprocessor.from_statistics(merge_statistics([local_statistics(frame, spec.data)]), spec.data)


def _header(spec: JobSpec, pre: Preprocessor, version: int = 1) -> dict[str, Any]:
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)
    return {"kind": "model", "version": version, "arch": arch, "preprocess": pre.to_dict()}


@pytest.fixture(scope="module")
def churn() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], str]:
    df, schema, group = load_dataset("mlc_churn")
    train, test = test_split(df, 0.2, seed=0, stratify_column=schema["target"])
    return train, test, schema, group


@pytest.fixture(scope="module")
def iris() -> tuple[pd.DataFrame, dict[str, Any]]:
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
    frame["species"] = [str(bunch.target_names[t]) for t in frame.pop("target")]
    features = [{"name": c, "type": "numeric"} for c in frame.columns if c != "species"]
    return frame, {"features": features, "target": "species", "task": "multiclass"}


@pytest.fixture(scope="module")
def diabetes() -> tuple[pd.DataFrame, dict[str, Any]]:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame["sex"] = frame["sex"].astype(int).astype(str)  # 1 or 2: a category, one-hot encoded
    features = [
        {"name": c, "type": "categorical" if c == "sex" else "numeric"} for c in frame if c != "target"
    ]
    return frame, {"features": features, "target": "target", "task": "regression"}


# --------------------------------------------------------------------------- closed forms


def _linear_shap(spec: JobSpec, pre: Preprocessor, vector: np.ndarray, reference: pd.DataFrame, version: int):
    """phi_i = w_i (x_i - E_background[x_i]) per input column, summed over each feature's columns."""
    x = pre.transform_features(reference).astype(np.float64)
    rows, background = draw_rows(len(x), spec.audit, spec.seed, version)
    w = vector[: pre.input_dim].astype(np.float64)
    b = float(vector[pre.input_dim])
    columns = w * (x[rows] - x[background].mean(axis=0))
    _, groups = feature_groups(pre)
    expected_value = float(x[background].mean(axis=0) @ w + b)
    return columns @ groups, expected_value


def test_logistic_model_shap_matches_closed_form_in_logit_space(churn) -> None:
    train, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"}, {"rows": 300, "validate_rows": 0})
    pre = _preprocessor(train, spec)
    header = _header(spec, pre, version=3)
    vector = np.random.default_rng(1).normal(size=parameter_count(header["arch"])).astype(np.float32)

    result = audit_version(spec, header, vector, test, plots=False)

    expected, expected_value = _linear_shap(spec, pre, vector, test, version=3)
    assert result.report["output"] == "logit of P(churn = yes)"
    assert result.report["explainer"] == "deep"
    assert result.values.shape == (300, len(schema["features"]), 1)
    np.testing.assert_allclose(result.values[:, :, 0], expected, rtol=1e-4, atol=1e-5)
    assert result.report["expected_value"][0] == pytest.approx(expected_value, abs=1e-5)
    # The one-hot columns of a categorical feature add up to one attribution for the feature.
    assert "area_code" in result.report["importance"]
    assert result.report["importance"]["area_code"] == pytest.approx(np.abs(expected[:, 1]).mean(), rel=1e-4)


def test_linear_model_shap_matches_closed_form(diabetes) -> None:
    frame, schema = diabetes
    spec = _spec(schema, {"zoo": "logreg"}, {"rows": 200, "background": 50, "validate_rows": 0})
    pre = _preprocessor(frame, spec)
    header = _header(spec, pre)
    vector = np.random.default_rng(2).normal(size=parameter_count(header["arch"])).astype(np.float32)

    result = audit_version(spec, header, vector, frame, plots=False)

    expected, _ = _linear_shap(spec, pre, vector, frame, version=1)
    assert result.report["output"].startswith("target standardised")
    np.testing.assert_allclose(result.values[:, :, 0], expected, rtol=1e-4, atol=1e-5)


def test_batched_deeplift_equals_shap_deep_explainer() -> None:
    import shap
    import torch

    arch = {"zoo": "mlp", "input_dim": 9, "output_dim": 3, "hidden": [16, 8], "dropout": 0.1}
    model = build_model(arch, seed=4).eval()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 9)).astype(np.float32)
    background = rng.normal(size=(30, 9)).astype(np.float32)

    ours = explain(model, x, background, explainer="deep")

    theirs = shap.DeepExplainer(model, torch.from_numpy(background)).shap_values(torch.from_numpy(x))
    np.testing.assert_allclose(ours.values, np.asarray(theirs).reshape(12, 9, 3), atol=1e-5)


def test_deep_falls_back_to_shaps_own_loop_when_its_internals_move(monkeypatch: pytest.MonkeyPatch) -> None:
    import training_cluster.audit as audit

    arch = {"zoo": "mlp", "input_dim": 5, "output_dim": 1, "hidden": [8]}
    model = build_model(arch, seed=12).eval()
    rng = np.random.default_rng(12)
    x, background = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(20, 5)).astype(np.float32)
    batched = explain(model, x, background)

    def moved(*args: Any) -> np.ndarray:
        raise AttributeError("'PyTorchDeep' object has no attribute 'add_handles'")

    monkeypatch.setattr(audit, "_deep_batched", moved)
    looped = explain(model, x, background)
    np.testing.assert_allclose(looped.values, batched.values, atol=1e-5)


def test_gradient_explainer_is_the_fallback_and_approximates_the_closed_form() -> None:
    from torch import nn

    zoo = build_model({"zoo": "mlp", "input_dim": 3, "output_dim": 1, "hidden": [4]})
    assert choose_explainer(zoo) == "deep"
    assert choose_explainer(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))) == "gradient"

    model = build_model({"zoo": "logreg", "input_dim": 6, "output_dim": 1}, seed=11)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(10, 6)).astype(np.float32)
    background = rng.normal(size=(40, 6)).astype(np.float32)
    result = explain(model, x, background, explainer="gradient")
    w = flatten_parameters(model)[:6]
    closed = w * (x - background.mean(axis=0))
    assert result.explainer == "gradient"
    # Expected gradients sample references from the background: close, not exact.
    assert np.abs(result.values[:, :, 0] - closed).max() < 0.15 * np.abs(closed).max()


# --------------------------------------------------------------------------- additivity and validation


def test_additivity_holds_on_zoo_models(churn, iris, diabetes) -> None:
    train, test, churn_schema, _ = churn
    cases = [
        (churn_schema, {"zoo": "mlp", "hidden": [64, 32]}, train, test),
        (churn_schema, {"zoo": "mlp", "hidden": [32], "dropout": 0.3}, train, test),
        (iris[1], {"zoo": "mlp", "hidden": [16, 16]}, iris[0], iris[0]),
        (diabetes[1], {"zoo": "logreg"}, diabetes[0], diabetes[0]),
    ]
    for schema, model_spec, fit_frame, reference in cases:
        spec = _spec(schema, model_spec, {"rows": 200, "validate_rows": 0})
        pre = _preprocessor(fit_frame, spec)
        header = _header(spec, pre)
        model = build_model(header["arch"], seed=5)
        result = audit_version(spec, header, flatten_parameters(model), reference, plots=False)
        assert result.report["additivity_max_error"] < 1e-4, (
            model_spec,
            result.report["additivity_max_error"],
        )


def test_validation_against_permutation_explainer_is_recorded_and_agrees(churn) -> None:
    train, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "mlp", "hidden": [64, 32]}, {"rows": 200, "validate_rows": 10})
    pre = _preprocessor(train, spec)
    header = _header(spec, pre)
    model = build_model(header["arch"], seed=6)
    x, y = pre.transform(train)
    train_local(
        model, x, y, task="binary", epochs=1, batch_size=64, learning_rate=0.005, optimizer="adam", seed=6
    )

    result = audit_version(spec, header, flatten_parameters(model), test, plots=False)

    validation = result.report["validation"]
    assert validation["explainer"] == "permutation"  # 22 input columns: too many to enumerate
    assert validation["rows"] == 10
    assert validation["correlation"] > 0.95
    assert np.isfinite(validation["max_abs_diff"])


def test_multiclass_report_has_importance_by_class_and_exact_validation(iris) -> None:
    frame, schema = iris
    spec = _spec(schema, {"zoo": "mlp", "hidden": [16]}, {"rows": 150, "background": 40, "validate_rows": 5})
    pre = _preprocessor(frame, spec)
    header = _header(spec, pre)
    model = build_model(header["arch"], seed=8)
    x, y = pre.transform(frame)
    train_local(
        model, x, y, task="multiclass", epochs=20, batch_size=16, learning_rate=0.01, optimizer="adam", seed=8
    )

    result = audit_version(spec, header, flatten_parameters(model), frame)

    report = result.report
    by_class = report["importance_by_class"]
    assert set(by_class) == {"setosa", "versicolor", "virginica"}
    for name, total in report["importance"].items():
        assert total == pytest.approx(sum(by_class[c][name] for c in by_class))
    assert report["output"] == "logit of each class of species (before softmax)"
    assert report["validation"]["explainer"] == "exact"  # 4 input columns
    assert report["validation"]["correlation"] > 0.95
    assert result.values.shape == (150, 4, 3)
    # Petal size separates the species; the model learns to look at it.
    assert set(report["top_features"][:2]) & {"petal_length", "petal_width"}
    _assert_png_plots(result.plots)


# --------------------------------------------------------------------------- drift across rounds


def _fedavg_round(
    vector: np.ndarray, arch: dict[str, Any], devices: list[tuple[np.ndarray, np.ndarray]], rnd: int
):
    """One FedAvg round with the demo's local training: every device 2 epochs of Adam from the global model."""
    total = np.zeros_like(vector, dtype=np.float64)
    weight = 0
    for i, (x, y) in enumerate(devices):
        model = build_model(arch)
        load_flat_parameters(model, vector)
        train_local(
            model,
            x,
            y,
            task="binary",
            epochs=2,
            batch_size=32,
            learning_rate=0.005,
            optimizer="adam",
            seed=rnd * 100 + i,
        )
        total += len(y) * flatten_parameters(model)
        weight += len(y)
    return (total / weight).astype(np.float32)


@pytest.fixture(scope="module")
def federated_versions(churn):
    """Versions 1-3 of the demo's model (mlp [64, 32]) after FedAvg rounds over 8 states-split devices."""
    train, test, schema, group = churn
    spec = _spec(schema, {"zoo": "mlp", "hidden": [64, 32]}, {"rows": 500, "validate_rows": 0})
    pre = _preprocessor(train, spec)
    arch = architecture(spec.model, pre.input_dim, pre.output_dim)
    devices = [pre.transform(part) for part in natural_split(train, group, 8, seed=0)]
    vector = flatten_parameters(build_model(arch, seed=spec.seed))
    versions = []
    for rnd in (1, 2, 3):
        vector = _fedavg_round(vector, arch, devices, rnd)
        versions.append(vector)
    header = {"arch": arch, "preprocess": pre.to_dict()}
    reports: list[dict[str, Any]] = []
    for version, vec in enumerate(versions, start=1):
        previous = reports[-1] if reports else None
        result = audit_version(
            spec, {**header, "version": version}, vec, test, previous=previous, plots=False
        )
        reports.append(result.report)
    return spec, header, versions, reports, test


def test_first_version_has_no_drift_fields(federated_versions) -> None:
    _, _, _, reports, _ = federated_versions
    first = reports[0]
    assert first["previous_version"] is None
    assert first["drift"]["rank_correlation"] is None and first["drift"]["shifted"] == []
    assert first["verdict"] == "ok" and first["reasons"] == []


def test_drift_stays_quiet_between_consecutive_ordinary_rounds(federated_versions) -> None:
    spec, _, _, reports, _ = federated_versions
    for report in reports[1:]:
        assert report["previous_version"] == report["version"] - 1
        assert report["drift"]["rank_correlation"] >= spec.audit.min_rank_correlation, report["drift"]
        assert report["drift"]["shifted"] == []
        assert report["verdict"] == "ok", report["reasons"]


def test_drift_fires_when_input_weights_are_permuted_across_features(federated_versions) -> None:
    spec, header, versions, reports, test = federated_versions
    vector = versions[-1].copy()
    hidden, inputs = header["arch"]["hidden"][0], header["arch"]["input_dim"]
    first_layer = vector[: hidden * inputs].reshape(hidden, inputs)
    permuted = first_layer[:, np.random.default_rng(0).permutation(inputs)]
    vector[: hidden * inputs] = permuted.reshape(-1)

    result = audit_version(spec, {**header, "version": 4}, vector, test, previous=reports[-1], plots=False)

    assert result.verdict == "drift"
    assert result.report["drift"]["rank_correlation"] < spec.audit.min_rank_correlation
    assert result.report["reasons"]
    assert any("rank correlation" in reason for reason in result.report["reasons"])


def test_previous_importances_computed_from_the_model_match_its_report(federated_versions) -> None:
    spec, header, versions, reports, test = federated_versions
    importance = version_importance(spec, {**header, "version": 2}, versions[1], test, version=2)
    for name, value in reports[1]["importance"].items():
        assert importance[name] == pytest.approx(value, rel=1e-6)


# --------------------------------------------------------------------------- report, baseline, plots


def test_report_is_json_with_the_contract_fields_and_reproducible(churn) -> None:
    train, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"}, {"rows": 100, "validate_rows": 0, "top": 4})
    pre = _preprocessor(train, spec)
    header = _header(spec, pre, version=2)
    vector = flatten_parameters(build_model(header["arch"], seed=9))

    first = audit_version(spec, header, vector, test)
    again = audit_version(spec, header, vector, test, plots=False)

    report = json.loads(json.dumps(first.report))
    assert set(report) >= REPORT_FIELDS
    assert report["version"] == 2 and report["rows"] == 100 and report["background"] == 100
    assert len(report["top_features"]) == 4
    assert report["importance_by_class"] is None
    assert sum(report["shares"].values()) == pytest.approx(1.0)
    assert report["verdict"] == first.verdict == "ok"
    assert report["validation"] is None and report["baseline"] is None
    assert again.report["importance"] == first.report["importance"]
    other_rows, _ = draw_rows(len(test), spec.audit, spec.seed, version=3)
    assert not np.array_equal(other_rows, draw_rows(len(test), spec.audit, spec.seed, version=2)[0])
    _assert_png_plots(first.plots)


def test_baseline_agreement_with_the_automl_leader(churn) -> None:
    train, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"}, {"rows": 100, "validate_rows": 0, "top": 5})
    pre = _preprocessor(train, spec)
    header = _header(spec, pre)
    vector = flatten_parameters(build_model(header["arch"], seed=10))
    ours = audit_version(spec, header, vector, test, plots=False).report["importance"]

    same = {"leader": "GBM_1", "contributions": {"model": "GBM_1", "features": ours, "rows": 100}}
    result = audit_version(spec, header, vector, test, baseline=same, plots=False)
    assert result.report["baseline"]["model"] == "GBM_1"
    assert result.report["baseline"]["rank_correlation"] == pytest.approx(1.0)
    assert result.report["baseline"]["top_overlap"] == 1.0

    ranked = sorted(ours, key=ours.get)  # the reverse order: least important first
    reversed_ = {name: float(i) for i, name in enumerate(reversed(ranked))}
    result = audit_version(
        spec, header, vector, test, baseline={"contributions": {"features": reversed_}}, plots=False
    )
    assert result.report["baseline"]["rank_correlation"] == pytest.approx(-1.0)
    assert result.report["baseline"]["top_overlap"] == 0.0


def _assert_png_plots(plots: dict[str, bytes]) -> None:
    assert set(plots) == {"importance.png", "beeswarm.png"}
    for name, data in plots.items():
        assert data.startswith(PNG_MAGIC), name
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)


def test_a_model_that_does_not_fit_the_preprocessing_is_an_audit_error(churn) -> None:
    from training_cluster.audit import AuditError

    train, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"}, {"validate_rows": 0})
    pre = _preprocessor(train, spec)
    header = _header(spec, pre)
    with pytest.raises(AuditError, match="cannot load the model"):
        load_model(header, np.zeros(3, dtype=np.float32))
    wrong = {**header, "arch": {**header["arch"], "input_dim": pre.input_dim + 1}}
    vector = np.zeros(parameter_count(wrong["arch"]), dtype=np.float32)
    with pytest.raises(AuditError, match="input columns"):
        audit_version(spec, wrong, vector, test, plots=False)


# --------------------------------------------------------------------------- shared/tabular additions


def test_column_features_maps_every_input_column_to_its_feature(churn) -> None:
    train, _, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"})
    pre = _preprocessor(train, spec)
    owners = pre.column_features
    assert len(owners) == pre.input_dim == len(pre.feature_names)
    for column, owner in zip(pre.feature_names, owners, strict=True):
        assert column == owner or column.startswith(f"{owner}=")
    assert owners.count("area_code") == len(pre.vocabularies["area_code"])


def test_read_table_bytes_reads_csv_and_parquet(churn) -> None:
    _, test, schema, _ = churn
    spec = _spec(schema, {"zoo": "logreg"})
    small = test.head(20).reset_index(drop=True)
    from_csv = read_table_bytes(small.to_csv(index=False).encode(), spec.data)
    assert list(from_csv.columns) == list(small.columns)
    assert from_csv["area_code"].tolist() == small["area_code"].astype(str).tolist()
    np.testing.assert_allclose(from_csv["total_day_minutes"], small["total_day_minutes"])
    buf = io.BytesIO()
    small.to_parquet(buf)
    pd.testing.assert_frame_equal(
        read_table_bytes(buf.getvalue()), small, check_column_type=False, check_dtype=False
    )
    with pytest.raises(DataSchemaError, match="empty"):
        read_table_bytes(b"")
