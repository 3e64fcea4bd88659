"""Local training and evaluation of a zoo model on preprocessed arrays.

Pure functions over a module and numpy arrays: the agent calls them on its own
data, the coordinator calls :func:`evaluate` on the reference data, and the
tests call both without any I/O. Targets are those of
:class:`shared.tabular.Preprocessor`: float 0/1 (binary), int class indices
(multiclass), standardised floats (regression).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.jobspec import Task

Optimizer = Literal["sgd", "adam"]
_PREDICT_CHUNK = 65_536
_PROBABILITY_FLOOR = 1e-15


def _inputs(X: np.ndarray) -> torch.Tensor:
    arr = np.asarray(X, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D feature matrix, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _targets(y: np.ndarray, task: Task, n: int) -> torch.Tensor:
    arr = np.asarray(y)
    if arr.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {arr.shape[0]}")
    if task == "multiclass":
        return torch.from_numpy(np.ascontiguousarray(arr.reshape(n).astype(np.int64)))
    return torch.from_numpy(np.ascontiguousarray(arr.reshape(n).astype(np.float32)))


def _loss(output: torch.Tensor, target: torch.Tensor, task: Task) -> torch.Tensor:
    if task == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target)
    if task == "multiclass":
        return F.cross_entropy(output, target)
    if task == "regression":
        return F.mse_loss(output.reshape(-1), target)
    raise ValueError(f"unknown task {task!r}; expected binary, multiclass or regression")


class LocalOptimizer:
    """SGD or Adam with ``torch.optim``'s defaults, stepped through torch's own functional kernels
    (``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``: the code ``torch.optim.SGD``/``Adam`` run).

    Why not the classes: constructing a ``torch.optim`` optimizer imports ``torch._dynamo`` (with
    sympy and ``torch.distributed``), about 70 MB of an edge device's memory for nothing a device
    uses. The functional kernels give the same updates, bit for bit (tested against the classes).
    """

    def __init__(self, name: Optimizer | str, params: Sequence[torch.Tensor], lr: float):
        if name not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {name!r}; expected sgd or adam")
        self.name = name
        self.params = list(params)
        self.lr = lr
        self._exp_avg: list[torch.Tensor] = [torch.zeros_like(p) for p in params] if name == "adam" else []
        self._exp_avg_sq: list[torch.Tensor] = [torch.zeros_like(p) for p in params] if name == "adam" else []
        self._steps: list[torch.Tensor] = [torch.tensor(0.0) for _ in params] if name == "adam" else []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        index = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in index]
        grads = [p.grad for p in params]
        if self.name == "sgd":
            from torch.optim.sgd import sgd

            sgd(
                params,
                grads,  # type: ignore[arg-type]
                [None] * len(params),
                foreach=False,
                weight_decay=0.0,
                momentum=0.0,
                lr=self.lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
            return
        from torch.optim.adam import adam

        adam(
            params,
            grads,  # type: ignore[arg-type]
            [self._exp_avg[i] for i in index],
            [self._exp_avg_sq[i] for i in index],
            [],
            [self._steps[i] for i in index],
            foreach=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )


def train_local(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: Optimizer,
    seed: int,
    proximal_mu: float = 0.0,
    threads: int = 1,
) -> dict[str, float]:
    """Train ``model`` in place on ``(X, y)`` and return ``{"loss", "examples"}``.

    ``loss`` is the mean task loss over the last epoch's examples (without the
    proximal term). With ``proximal_mu > 0`` the FedProx term
    ``mu / 2 * ||w - w_start||^2`` (Li et al., MLSys 2020) pulls the weights
    towards those the call started from, i.e. the global model. Shuffling and
    dropout are driven by ``seed`` alone, so two calls with equal inputs give
    equal weights; the global torch random state and thread count are
    restored afterwards.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if learning_rate <= 0 or proximal_mu < 0:
        raise ValueError("learning_rate must be positive and proximal_mu non-negative")
    inputs = _inputs(X)
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("no training examples")
    targets = _targets(y, task, n)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = LocalOptimizer(optimizer, params, learning_rate)
    start = [p.detach().clone() for p in params] if proximal_mu > 0 else []

    previous_threads = torch.get_num_threads()
    was_training = model.training
    torch.set_num_threads(max(1, threads))
    try:
        with torch.random.fork_rng(devices=[]):
            # Seeds the global generator too, inside the fork, so that dropout masks are reproducible.
            torch.manual_seed(seed)
            shuffle = torch.Generator().manual_seed(seed)
            model.train()
            epoch_loss = 0.0
            for _ in range(epochs):
                epoch_loss = 0.0
                order = torch.randperm(n, generator=shuffle)
                for begin in range(0, n, batch_size):
                    idx = order[begin : begin + batch_size]
                    opt.zero_grad()
                    loss = _loss(model(inputs[idx]), targets[idx], task)
                    total = loss
                    if proximal_mu > 0:
                        drift = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
                        total = loss + (proximal_mu / 2.0) * drift
                    total.backward()
                    opt.step()
                    epoch_loss += float(loss.detach()) * idx.numel()
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    return {"loss": epoch_loss / n, "examples": n}


def _outputs(model: nn.Module, X: np.ndarray) -> torch.Tensor:
    inputs = _inputs(X)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if inputs.shape[0] == 0:
                return model(inputs)
            return torch.cat(
                [model(inputs[i : i + _PREDICT_CHUNK]) for i in range(0, inputs.shape[0], _PREDICT_CHUNK)]
            )
    finally:
        model.train(was_training)


def predict(
    model: nn.Module, X: np.ndarray, task: Task, *, target_mean: float = 0.0, target_std: float = 1.0
) -> np.ndarray:
    """Predictions: P(positive) ``(n,)`` for binary, class probabilities ``(n, C)`` for multiclass,
    values ``(n,)`` for regression (``value * target_std + target_mean``; the defaults keep the
    model's standardised units)."""
    out = _outputs(model, X)
    if task == "binary":
        return torch.sigmoid(out.reshape(-1)).numpy()
    if task == "multiclass":
        return torch.softmax(out, dim=1).numpy()
    if task == "regression":
        return out.reshape(-1).numpy().astype(np.float64) * target_std + target_mean
    raise ValueError(f"unknown task {task!r}; expected binary, multiclass or regression")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann–Whitney U statistic over average ranks (ties count half).

    Written with numpy rather than taken from scikit-learn so that the edge
    agent does not load scikit-learn and SciPy (about 70 MB of memory) for one
    metric; tests check it against ``sklearn.metrics.roc_auc_score``.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, shared by ties
    ranks = np.empty(scores.size)
    ranks[order] = average_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _macro_ovr_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    # A class absent from y has no defined one-vs-rest AUC; average over the
    # classes that have one rather than failing on a small holdout.
    scores = []
    for c in range(probs.shape[1]):
        positives = y == c
        if positives.any() and not positives.all():
            scores.append(roc_auc(positives, probs[:, c]))
    return float(np.mean(scores)) if scores else None


def evaluate(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> dict[str, float]:
    """Metrics of ``model`` on ``(X, y)``, plus ``"examples"``.

    Binary: accuracy (threshold 0.5), ROC AUC, mean BCE loss. Multiclass:
    accuracy, macro one-vs-rest ROC AUC over the classes present, mean cross
    entropy. Regression: RMSE in the target's original units (``y`` and the
    outputs are de-standardised with ``target_mean``/``target_std``; the mean
    cancels in the difference) and the
    mean squared error in standardised units as ``loss``. ``"auc"`` is left
    out when ``y`` holds a single class (or the outputs are not finite).
    """
    inputs = _inputs(X)
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("no evaluation examples")
    return _metrics(_outputs(model, X), _targets(y, task, n), task, target_std)


def metrics_from_predictions(
    task: Task,
    y: np.ndarray,
    predictions: np.ndarray,
    *,
    target_mean: float = 0.0,
    target_std: float = 1.0,
) -> dict[str, float]:
    """The metrics of :func:`evaluate`, for predictions made by a model outside the zoo.

    So that another library's model (the H2O AutoML leader) is scored with the
    federation's own definitions on the same rows. ``y`` is encoded as
    :meth:`shared.tabular.Preprocessor.transform_target` encodes it;
    ``predictions`` are what :func:`predict` returns: P(positive) ``(n,)``
    (binary), class probabilities ``(n, C)`` in the preprocessor's class order
    (multiclass), values in the target's original units (regression). The
    probabilities are clipped to ``[1e-15, 1 - 1e-15]`` and turned into the
    logits whose sigmoid or softmax they are, so that the loss is the same
    formula :func:`evaluate` applies to a zoo model's outputs.
    """
    p = np.asarray(predictions, dtype=np.float64)
    n = np.asarray(y).shape[0]
    if n == 0:
        raise ValueError("no evaluation examples")
    multiclass_shape = p.ndim == 2 and p.shape[0] == n and p.shape[-1] >= 2
    if not (multiclass_shape if task == "multiclass" else p.shape == (n,)):
        raise ValueError(f"{task} predictions for {n} rows have shape {p.shape}")
    if task == "binary":
        p = np.clip(p, _PROBABILITY_FLOOR, 1.0 - _PROBABILITY_FLOOR)
        out = torch.from_numpy(np.log(p) - np.log1p(-p))
    elif task == "multiclass":
        out = torch.from_numpy(np.log(np.clip(p, _PROBABILITY_FLOOR, 1.0)))
    elif task == "regression":
        out = torch.from_numpy((p - target_mean) / target_std)
    else:
        raise ValueError(f"unknown task {task!r}; expected binary, multiclass or regression")
    targets = _targets(y, task, n)
    if task != "multiclass":
        targets = targets.to(torch.float64)
    return _metrics(out, targets, task, target_std)


def _metrics(out: torch.Tensor, targets: torch.Tensor, task: Task, target_std: float) -> dict[str, float]:
    """:func:`evaluate`'s metrics from a model's outputs (logits, or standardised values) and targets."""
    metrics: dict[str, float] = {"loss": float(_loss(out, targets, task)), "examples": out.shape[0]}
    finite = bool(torch.isfinite(out).all())
    y_np = targets.numpy()
    if task == "binary":
        probs = torch.sigmoid(out.reshape(-1)).numpy()
        metrics["accuracy"] = float(np.mean((probs >= 0.5) == (y_np >= 0.5)))
        labels = y_np >= 0.5
        if finite and labels.any() and not labels.all():
            metrics["auc"] = roc_auc(labels, probs)
    elif task == "multiclass":
        probs = torch.softmax(out, dim=1).numpy()
        metrics["accuracy"] = float(np.mean(probs.argmax(axis=1) == y_np))
        auc = _macro_ovr_auc(y_np, probs) if finite else None
        if auc is not None:
            metrics["auc"] = auc
    else:
        mse = float(np.mean((out.reshape(-1).numpy().astype(np.float64) - y_np) ** 2))
        metrics["rmse"] = math.sqrt(mse) * abs(target_std)
    return metrics


def task_loss(output: torch.Tensor, target: torch.Tensor, task: Task) -> torch.Tensor:
    """The federation's training loss for ``task`` (BCE on logits, cross entropy, or MSE).

    Public so that central pre-training (``training_cluster``) optimises exactly
    what devices optimise in :func:`train_local`.
    """
    return _loss(output, target, task)


def as_tensors(X: np.ndarray, y: np.ndarray, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` as the tensors :func:`train_local` trains on: float32 inputs, task-typed targets."""
    inputs = _inputs(X)
    return inputs, _targets(y, task, inputs.shape[0])
