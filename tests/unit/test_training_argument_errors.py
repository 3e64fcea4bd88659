"""Training, evaluation and the model zoo refuse arguments they cannot honour, saying which and why."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from torch import nn

from shared.jobspec import ModelSpec
from shared.training import evaluate, metrics_from_predictions, predict, train_local
from shared.zoo import architecture, build_model, flatten_parameters

ARCH = {"zoo": "mlp", "input_dim": 3, "output_dim": 1, "hidden": [4], "dropout": 0.0}
X = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
Y = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32)
GOOD: dict[str, Any] = {
    "task": "binary",
    "epochs": 1,
    "batch_size": 2,
    "learning_rate": 0.1,
    "optimizer": "sgd",
    "seed": 0,
}


@pytest.mark.parametrize(
    ("args", "change", "message"),
    [
        ((X, Y), {"epochs": 0}, "epochs and batch_size must be at least 1, got 0 and 2"),
        ((X, Y), {"batch_size": 0}, "epochs and batch_size must be at least 1, got 1 and 0"),
        ((X, Y), {"learning_rate": 0.0}, "learning_rate must be positive and proximal_mu non-negative"),
        ((X, Y), {"proximal_mu": -0.1}, "learning_rate must be positive and proximal_mu non-negative"),
        ((X, Y), {"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; expected sgd or adam"),
        ((X, Y), {"task": "ranking"}, "unknown task 'ranking'; expected binary, multiclass or regression"),
        ((X[:0], Y[:0]), {}, "no training examples"),
        ((X.reshape(-1), Y), {}, r"expected a 2-D feature matrix, got shape \(12,\)"),
    ],
    ids=["epochs", "batch", "lr", "mu", "optimizer", "task", "no-rows", "1-D"],
)
def test_local_training_refuses_what_it_cannot_do(
    args: tuple[np.ndarray, np.ndarray], change: dict[str, Any], message: str
) -> None:
    model = build_model(ARCH, seed=0)
    before = flatten_parameters(model)
    with pytest.raises(ValueError, match=f"^{message}$"):
        train_local(model, *args, **{**GOOD, **change})
    assert np.array_equal(flatten_parameters(model), before)  # nothing was trained


def test_evaluation_needs_rows_and_a_known_task() -> None:
    model = build_model(ARCH, seed=0)
    with pytest.raises(ValueError, match="^no evaluation examples$"):
        evaluate(model, X[:0], Y[:0], task="binary")
    with pytest.raises(ValueError, match="^no evaluation examples$"):
        metrics_from_predictions("binary", Y[:0], np.zeros(0))
    with pytest.raises(ValueError, match="^unknown task 'ranking'"):
        metrics_from_predictions("ranking", Y, np.full(4, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^unknown task 'ranking'"):
        predict(model, X, "ranking")  # type: ignore[arg-type]


@pytest.mark.parametrize(("task", "shape"), [("binary", (0,)), ("regression", (0,)), ("multiclass", (0, 3))])
def test_predicting_on_no_rows_gives_no_predictions(task: str, shape: tuple[int, ...]) -> None:
    arch = {**ARCH, "output_dim": 3 if task == "multiclass" else 1}
    assert predict(build_model(arch, seed=0), X[:0], task).shape == shape  # type: ignore[arg-type]


def test_an_architecture_needs_inputs_and_outputs() -> None:
    with pytest.raises(ValueError, match="^input_dim and output_dim must be at least 1, got 0 and 1$"):
        architecture(ModelSpec(), 0, 1)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({"zoo": "mlp", "output_dim": 1}, r"not a model architecture: KeyError\('input_dim'\)"),
        ({**ARCH, "hidden": ["wide"]}, "not a model architecture: ValueError"),
        ({**ARCH, "hidden": [4, 0]}, "layer sizes must be at least 1: "),
        ({**ARCH, "output_dim": 0}, "layer sizes must be at least 1: "),
        ({**ARCH, "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
    ids=["missing-key", "not-a-number", "empty-layer", "no-output", "dropout"],
)
def test_a_damaged_architecture_is_refused_before_a_model_is_built(
    arch: dict[str, Any], message: str
) -> None:
    # The architecture comes from a model header: a device must not build whatever it says.
    with pytest.raises(ValueError, match=f"^{message}"):
        build_model(arch)


def test_a_model_without_parameters_flattens_to_an_empty_vector() -> None:
    vec = flatten_parameters(nn.Sequential(nn.ReLU()))
    assert vec.dtype == np.float32 and vec.shape == (0,)
