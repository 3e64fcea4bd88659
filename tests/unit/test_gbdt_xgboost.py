"""Federated boosting against XGBoost: the same trees, the same AUC, a model file XGBoost loads."""

from __future__ import annotations

import numpy as np
import pytest

from shared.datasets import load_dataset, natural_split, test_split
from shared.gbdt.simulation import BoostConfig, train_in_memory
from shared.gbdt.splits import TreeParams
from shared.gbdt.trees import predict, predict_margin
from shared.gbdt.xgboost_json import dumps
from shared.jobspec import DataSchema
from shared.tabular import Preprocessor, local_statistics, merge_statistics

xgb = pytest.importorskip("xgboost")
metrics = pytest.importorskip("sklearn.metrics")


def partitions(x: np.ndarray, y: np.ndarray, devices: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[p], y[p]) for p in np.array_split(np.arange(len(y)), devices)]


def integer_task(objective: str, seed: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    n = 3000
    x = rng.integers(0, 20, size=(n, 5)).astype(np.float64)
    if objective == "binary:logistic":
        return x, ((x[:, 0] + 0.5 * x[:, 1] + 3 * rng.normal(size=n)) > 14).astype(np.float64), 0
    if objective == "reg:squarederror":
        return x, 0.3 * x[:, 0] - 0.2 * x[:, 2] + rng.normal(size=n), 0
    return x, ((x[:, 0] + 2 * rng.normal(size=n)) // 7).clip(0, 2).astype(np.float64), 3


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_federated_trees_equal_pooled_xgboost_when_bins_coincide(objective: str) -> None:
    # Fewer distinct values than max_bin: XGBoost cuts at every value, aicfl in every gap, so the
    # bins hold the same rows and the federated trees must be XGBoost's, leaf for leaf.
    x, y, classes = integer_task(objective)
    config = BoostConfig(objective, num_class=classes, rounds=10, bins=32, tree=TreeParams(max_depth=3))
    ensemble, _ = train_in_memory(partitions(x, y), config)
    params = {
        "objective": objective,
        "tree_method": "hist",
        "max_bin": 32,
        "nthread": 1,
        **config.tree.xgboost(),
    }
    pooled = xgb.DMatrix(x, label=y)
    if classes:
        params["num_class"] = classes
        pooled.set_base_margin(np.tile(np.asarray(ensemble.base_score, dtype=np.float32), (len(y), 1)))
    else:
        params["base_score"] = ensemble.base_score[0]
    booster = xgb.train(params, pooled, 10)
    theirs = booster.predict(pooled, output_margin=True).reshape(len(y), -1)
    assert np.abs(theirs - predict_margin(ensemble, x)).max() < 1e-5


def churn_devices(seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """The churn demo's data: a stratified test split, the rest dealt to 6 devices by state."""
    df, schema_dict, group = load_dataset("mlc_churn")
    schema = DataSchema.model_validate(schema_dict)
    train, test = test_split(df, 0.2, seed, stratify_column=schema.target)
    parts = natural_split(train, group, 6, seed)
    pre = Preprocessor.from_statistics(merge_statistics([local_statistics(p, schema) for p in parts]), schema)
    x_test, y_test = pre.transform(test)
    return [pre.transform(p) for p in parts], x_test, y_test


def test_federated_churn_auc_is_within_0_005_of_pooled_xgboost_hist() -> None:
    devices, x_test, y_test = churn_devices(seed=7)
    config = BoostConfig("binary:logistic", rounds=100, bins=256, tree=TreeParams(eta=0.1, max_depth=4))
    ensemble, trace = train_in_memory(devices, config)
    x_train = np.concatenate([x for x, _ in devices])
    y_train = np.concatenate([y for _, y in devices])
    params = {
        "objective": "binary:logistic",
        "tree_method": "hist",
        "max_bin": 256,
        "base_score": ensemble.base_score[0],
        "nthread": 1,
        **config.tree.xgboost(),
    }
    booster = xgb.train(params, xgb.DMatrix(x_train, label=y_train), config.rounds)
    pooled_auc = metrics.roc_auc_score(y_test, booster.predict(xgb.DMatrix(x_test)))
    federated_auc = metrics.roc_auc_score(y_test, predict(ensemble, x_test))
    assert abs(federated_auc - pooled_auc) <= 0.005, (federated_auc, pooled_auc)
    assert trace.secure_sums <= 1 + config.rounds * config.tree.max_depth


@pytest.mark.parametrize(
    ("objective", "classes"),
    [("binary:logistic", 0), ("reg:squarederror", 0), ("multi:softprob", 3), ("multi:softmax", 3)],
)
def test_exported_json_loads_in_xgboost_and_predicts_as_aicfl(objective: str, classes: int) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1200, 4))
    x[rng.random(x.shape) < 0.15] = np.nan  # missing values take each split's default direction
    signal = np.nan_to_num(x[:, 0]) - np.nan_to_num(x[:, 1]) + 0.5 * rng.normal(size=1200)
    if objective == "binary:logistic":
        y = (signal > 0).astype(np.float64)
    elif classes:
        y = np.digitize(signal, [-0.7, 0.7]).astype(np.float64)
    else:
        y = signal
    config = BoostConfig(objective, num_class=classes, rounds=8, bins=64, tree=TreeParams(max_depth=4))
    ensemble, _ = train_in_memory(partitions(x, y, devices=4), config)
    booster = xgb.Booster()
    booster.load_model(bytearray(dumps(ensemble)))
    theirs = booster.predict(xgb.DMatrix(x))
    ours = predict(ensemble, x)
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-6
    margins = booster.predict(xgb.DMatrix(x), output_margin=True).reshape(len(y), -1)
    assert np.abs(margins - predict_margin(ensemble, x)).max() <= 1e-5
    assert any(t.default_left.any() for t in ensemble.trees)  # the missing values did pick directions
