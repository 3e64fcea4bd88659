"""The model zoo, flat parameter vectors, local training and evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from shared.jobspec import ModelSpec
from shared.training import evaluate, predict, train_local
from shared.zoo import architecture, build_model, flatten_parameters, load_flat_parameters, parameter_count


def separable(n: int = 200, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float32)
    return X, y


def train(model: nn.Module, X: np.ndarray, y: np.ndarray, **overrides: object) -> dict[str, float]:
    kwargs: dict[str, object] = {
        "task": "binary",
        "epochs": 5,
        "batch_size": 16,
        "learning_rate": 0.05,
        "optimizer": "sgd",
        "seed": 3,
    }
    kwargs.update(overrides)
    return train_local(model, X, y, **kwargs)  # type: ignore[arg-type]


def linear(weight: list[list[float]], bias: list[float]) -> nn.Module:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


# --------------------------------------------------------------------------- zoo


def test_architecture_is_json_and_describes_the_spec() -> None:
    arch = architecture(ModelSpec(zoo="mlp", hidden=[8, 4], dropout=0.1), 5, 3)
    assert json.loads(json.dumps(arch)) == {
        "zoo": "mlp",
        "input_dim": 5,
        "output_dim": 3,
        "hidden": [8, 4],
        "dropout": 0.1,
    }
    assert architecture(ModelSpec(zoo="logreg", hidden=[8]), 5, 1)["hidden"] == []


def test_mlp_is_a_linear_relu_stack_with_dropout() -> None:
    model = build_model(architecture(ModelSpec(hidden=[8, 4], dropout=0.2), 5, 2), seed=0)
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model(torch.zeros(3, 5)).shape == (3, 2)


def test_logreg_is_one_linear_layer() -> None:
    model = build_model(architecture(ModelSpec(zoo="logreg"), 5, 1), seed=0)
    assert [type(m).__name__ for m in model.children()] == ["Linear"]


def test_build_model_is_deterministic_under_a_seed_and_leaves_global_rng_alone() -> None:
    arch = architecture(ModelSpec(), 6, 1)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = flatten_parameters(build_model(arch, seed=7))
    b = flatten_parameters(build_model(arch, seed=7))
    assert torch.equal(torch.rand(3), expected_next)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, flatten_parameters(build_model(arch, seed=8)))


def test_build_model_refuses_an_unknown_zoo_name() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'transformer'"):
        build_model({"zoo": "transformer", "input_dim": 2, "output_dim": 1, "hidden": [], "dropout": 0.0})


@pytest.mark.parametrize("spec", [ModelSpec(), ModelSpec(hidden=[3], dropout=0.5), ModelSpec(zoo="logreg")])
def test_parameter_count_matches_the_flat_vector(spec: ModelSpec) -> None:
    arch = architecture(spec, 7, 3)
    model = build_model(arch, seed=0)
    flat = flatten_parameters(model)
    assert flat.dtype == np.float32 and flat.ndim == 1
    assert parameter_count(arch) == flat.size == sum(p.numel() for p in model.parameters())


def test_flat_parameters_round_trip_in_state_dict_order() -> None:
    arch = architecture(ModelSpec(hidden=[4]), 3, 2)
    source, target = build_model(arch, seed=1), build_model(arch, seed=2)
    flat = flatten_parameters(source)
    first_weight = source.state_dict()["0.weight"].reshape(-1).numpy()
    np.testing.assert_array_equal(flat[: first_weight.size], first_weight)
    load_flat_parameters(target, flat)
    np.testing.assert_array_equal(flatten_parameters(target), flat)
    x = torch.randn(5, 3)
    assert torch.equal(source(x), target(x))


@pytest.mark.parametrize(
    ("vec", "message"),
    [
        (np.zeros(5, dtype=np.float32), "has 5 values, the model has 26"),
        (np.zeros((2, 13), dtype=np.float32), "1-D"),
        (np.full(26, np.nan, dtype=np.float32), "non-finite"),
    ],
)
def test_load_flat_parameters_refuses_a_vector_that_does_not_fit(vec: np.ndarray, message: str) -> None:
    model = build_model(architecture(ModelSpec(hidden=[4]), 3, 2), seed=0)
    before = flatten_parameters(model)
    with pytest.raises(ValueError, match=message):
        load_flat_parameters(model, vec)
    np.testing.assert_array_equal(flatten_parameters(model), before)


# --------------------------------------------------------------------------- training


def test_training_reduces_the_loss_on_a_separable_problem() -> None:
    X, y = separable()
    model = build_model(architecture(ModelSpec(hidden=[8]), 4, 1), seed=0)
    before = evaluate(model, X, y, task="binary")
    result = train(model, X, y, epochs=20)
    after = evaluate(model, X, y, task="binary")
    assert result["examples"] == len(X)
    assert after["loss"] < 0.5 * before["loss"]
    assert result["loss"] < before["loss"]
    assert after["accuracy"] > 0.9


def test_two_runs_with_the_same_seed_give_identical_parameters() -> None:
    X, y = separable()
    arch = architecture(ModelSpec(hidden=[8], dropout=0.3), 4, 1)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the call's seed alone must decide shuffling and dropout
        model = build_model(arch, seed=0)
        train(model, X, y, optimizer="adam", learning_rate=0.01)
        runs.append(flatten_parameters(model))
    np.testing.assert_array_equal(runs[0], runs[1])
    other = build_model(arch, seed=0)
    train(other, X, y, optimizer="adam", learning_rate=0.01, seed=4)
    assert not np.array_equal(runs[0], flatten_parameters(other))


def test_fedprox_with_a_large_mu_keeps_parameters_near_the_start() -> None:
    X, y = separable()
    arch = architecture(ModelSpec(hidden=[8]), 4, 1)
    start = flatten_parameters(build_model(arch, seed=0))
    drift = {}
    for mu in (0.0, 10.0):
        model = build_model(arch, seed=0)
        train(model, X, y, proximal_mu=mu, learning_rate=0.05)
        drift[mu] = float(np.linalg.norm(flatten_parameters(model) - start))
    assert drift[0.0] > 0.1
    assert drift[10.0] < 0.25 * drift[0.0]


def test_training_restores_the_thread_count_and_mode() -> None:
    X, y = separable(40)
    model = build_model(architecture(ModelSpec(hidden=[4]), 4, 1), seed=0)
    model.eval()
    threads = torch.get_num_threads()
    train(model, X, y, threads=threads + 1, epochs=1)
    assert torch.get_num_threads() == threads
    assert not model.training


def test_multiclass_and_regression_training_reduce_the_loss() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 3)).astype(np.float32)
    classes = np.argmax(X, axis=1)
    model = build_model(architecture(ModelSpec(hidden=[8]), 3, 3), seed=0)
    before = evaluate(model, X, classes, task="multiclass")["loss"]
    train(model, X, classes, task="multiclass", epochs=15, optimizer="adam", learning_rate=0.02)
    assert evaluate(model, X, classes, task="multiclass")["loss"] < 0.5 * before

    values = (X @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    model = build_model(architecture(ModelSpec(zoo="logreg"), 3, 1), seed=0)
    before = evaluate(model, X, values, task="regression")["loss"]
    train(model, X, values, task="regression", epochs=15, learning_rate=0.05)
    assert evaluate(model, X, values, task="regression")["loss"] < 0.05 * before


def test_training_refuses_mismatched_rows() -> None:
    X, y = separable(10)
    model = build_model(architecture(ModelSpec(zoo="logreg"), 4, 1), seed=0)
    with pytest.raises(ValueError, match="10 rows but y has 9"):
        train(model, X, y[:9])


# --------------------------------------------------------------------------- evaluation


def test_binary_evaluation_on_a_hand_made_case() -> None:
    # Scores -1.5, -0.5, 0.5, 1.5 against labels 0, 1, 0, 1: of the four
    # positive/negative pairs three are ordered right (AUC 3/4); the 0.5
    # threshold gets rows 0 and 3 right (accuracy 1/2).
    model = linear([[1.0]], [0.0])
    X = np.array([[-1.5], [-0.5], [0.5], [1.5]], dtype=np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.float32)
    metrics = evaluate(model, X, y, task="binary")
    sig = 1 / (1 + np.exp(-X[:, 0].astype(np.float64)))
    bce = -np.mean(y * np.log(sig) + (1 - y) * np.log(1 - sig))
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(bce, rel=1e-5)
    assert metrics["examples"] == 4
    np.testing.assert_allclose(predict(model, X, "binary"), 1 / (1 + np.exp(-X[:, 0])), rtol=1e-6)


def test_evaluation_leaves_out_auc_when_one_class_is_present() -> None:
    model = linear([[1.0]], [0.0])
    X = np.array([[0.3], [-0.2]], dtype=np.float32)
    metrics = evaluate(model, X, np.ones(2, dtype=np.float32), task="binary")
    assert "auc" not in metrics and metrics["accuracy"] == 0.5
    multi = linear([[1.0], [-1.0], [0.0]], [0.0, 0.0, 0.0])
    assert "auc" not in evaluate(multi, X, np.zeros(2, dtype=np.int64), task="multiclass")


def test_multiclass_auc_is_the_macro_one_vs_rest_auc() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    model = linear([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], [0.0, 0.1, 0.0])
    probs = predict(model, X, "multiclass")
    assert probs.shape == (60, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    metrics = evaluate(model, X, y, task="multiclass")
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == y))


def test_regression_rmse_is_in_original_units() -> None:
    model = linear([[1.0]], [0.0])  # predicts its standardised input
    X = np.array([[0.0], [1.0], [-1.0]], dtype=np.float32)
    y = np.array([0.5, 1.0, -2.0], dtype=np.float32)  # standardised targets
    metrics = evaluate(model, X, y, task="regression", target_mean=100.0, target_std=20.0)
    mse = np.mean((X[:, 0] - y) ** 2)
    assert metrics["loss"] == pytest.approx(mse, rel=1e-6)
    assert metrics["rmse"] == pytest.approx(20.0 * math.sqrt(mse), rel=1e-6)
    np.testing.assert_allclose(
        predict(model, X, "regression", target_mean=100.0, target_std=20.0), [100.0, 120.0, 80.0]
    )


def test_roc_auc_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    from shared.training import roc_auc

    rng = np.random.default_rng(11)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        labels = rng.integers(0, 2, n).astype(bool)
        labels[0], labels[-1] = True, False
        scores = np.round(rng.random(n), int(rng.integers(1, 4)))  # rounding makes ties
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(3, dtype=bool), np.arange(3.0))
