"""The app: a small CNN that reads 8x8 digit images, trained on each device's ``.npz`` file.

Named in a job spec as ``[model] app = "digits_cnn:app"`` with ``app_version`` equal to this
package's installed version. ``[model.options]`` may set ``channels`` (the two convolutions'
widths, default ``[16, 32]``) and ``hidden`` (the dense layer's width, default 64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from digits_cnn.data import CLASSES, SIDE, as_inputs, check_arrays, pixel_scale, read_npz
from shared.apps import App, DataError, DeviceContext, JobContext, LocalData, Metrics, TrainConfig
from shared.apps.base import AuditInputs
from shared.training import LocalOptimizer

DISTRIBUTION = "digits-cnn"
#: One name per input value, row-major over the 8x8 image, for the SHAP audit's report.
PIXELS = [f"px_{r}_{c}" for r in range(SIDE) for c in range(SIDE)]
_EVAL_BATCH = 4096


def installed_version() -> str:
    """This package's version as installed (pip's metadata): what devices and the job must agree on.

    A copy that was never installed has no release to match, and says so.
    """
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+not-installed"


@dataclass
class Digits:
    """Images and labels as a file holds them, with the pixel scale of the whole file."""

    images: np.ndarray
    labels: np.ndarray
    scale: float

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> Digits:
        """The examples at ``index``, on the whole file's pixel scale."""
        return Digits(self.images[index], self.labels[index], self.scale)

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's inputs ``(n, 1, 8, 8)`` in ``[0, 1]`` and the int64 labels."""
        check_arrays(self.images, self.labels)
        return (
            torch.from_numpy(as_inputs(self.images, self.scale)),
            torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64)),
        )

    @classmethod
    def read(cls, source: str | bytes) -> Digits:
        """A file (a path, or its bytes) as stored; :class:`DataError` when it cannot be read."""
        images, labels = read_npz(source)
        return cls(images, labels, pixel_scale(images))


class DigitsNet(nn.Sequential):
    """Two 3x3 convolutions, one 2x2 max-pool, a dense layer, ten logits.

    Every step is its own layer (no functional calls), so that the SHAP audit's DeepExplainer has a
    rule for each and need not fall back to the slower expected-gradients explainer.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64):
        c1, c2 = channels
        super().__init__(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (SIDE // 2) ** 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, CLASSES),
        )


def _options(options: Mapping[str, Any]) -> tuple[tuple[int, int], int]:
    unknown = sorted(set(options) - {"channels", "hidden"})
    if unknown:
        raise ValueError(
            f"unknown model.options for digits_cnn: {', '.join(unknown)} (known: channels, hidden)"
        )
    channels = options.get("channels", [16, 32])
    hidden = options.get("hidden", 64)
    if not (
        isinstance(channels, list | tuple)
        and len(channels) == 2
        and all(isinstance(c, int) and 1 <= c <= 512 for c in channels)
    ):
        raise ValueError(f"model.options.channels must be two integers in 1..512, got {channels!r}")
    if not (isinstance(hidden, int) and 1 <= hidden <= 4096):
        raise ValueError(f"model.options.hidden must be an integer in 1..4096, got {hidden!r}")
    return (channels[0], channels[1]), hidden


def _optimizer(name: str, params: list[nn.Parameter], lr: float) -> LocalOptimizer:
    # aicfl's SGD/Adam run torch's own functional kernels: the same updates as torch.optim's classes,
    # without the ~70 MB of torch._dynamo that constructing one of those imports on a device.
    return LocalOptimizer(name, params, lr)


def metrics(model: nn.Module, digits: Digits) -> Metrics:
    """Mean cross entropy and accuracy of ``model`` on ``digits``."""
    x, y = digits.tensors
    if len(y) == 0:
        raise ValueError("no examples to evaluate on")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + _EVAL_BATCH]) for i in range(0, len(y), _EVAL_BATCH)])
    finally:
        model.train(was_training)
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "accuracy": float((logits.argmax(1) == y).float().mean()),
    }


class DigitsCNN(App):
    """A federated app over 8x8 digit images (see the module docstring)."""

    name = "digits_cnn"

    def __init__(self) -> None:
        self.version = installed_version()

    def build_model(self, job: JobContext) -> nn.Module:
        """:class:`DigitsNet`, sized by ``[model.options]`` (``ValueError`` naming a bad option)."""
        channels, hidden = _options(job.options)
        return DigitsNet(channels, hidden)

    def load_data(self, device: DeviceContext) -> LocalData:
        """The device's ``.npz``, split into training images and the holdout the job keeps aside."""
        whole = Digits.read(device.data_path)
        train, holdout = device.holdout_split(len(whole))
        return LocalData(whole.take(train), whole.take(holdout), len(train), len(holdout))

    def check_data(self, data: LocalData, job: JobContext) -> None:
        """The whole file, holdout images included, must be digits the model can take."""
        train, holdout = data.train, data.holdout
        if train.images.shape[1:] != holdout.images.shape[1:]:
            raise DataError(f"images must have shape (n, {SIDE}, {SIDE}); got {train.images.shape}")
        check_arrays(
            np.concatenate([train.images, holdout.images]), np.concatenate([train.labels, holdout.labels])
        )

    def train(self, model: nn.Module, data: LocalData, config: TrainConfig) -> Metrics:
        """Mini-batch training from the global weights, with FedProx's proximal term when the job
        asks for it (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

        Shuffling is seeded by ``config.seed`` alone; the global torch random state and thread
        count are left as they were. Returns the last epoch's mean loss (without the proximal term).
        """
        x, y = data.train.tensors
        n = len(y)
        if n == 0:
            raise ValueError("no training examples")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(config.optimizer, params, config.learning_rate)
        start = [p.detach().clone() for p in params] if config.proximal_mu > 0 else []
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, config.threads))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                order_rng = torch.Generator().manual_seed(config.seed)
                model.train()
                epoch_loss = 0.0
                for _ in range(config.epochs):
                    epoch_loss = 0.0
                    order = torch.randperm(n, generator=order_rng)
                    for begin in range(0, n, config.batch_size):
                        idx = order[begin : begin + config.batch_size]
                        opt.zero_grad()
                        loss = F.cross_entropy(model(x[idx]), y[idx])
                        total = loss
                        if start:
                            drift = sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
                            total = loss + (config.proximal_mu / 2.0) * drift
                        total.backward()
                        opt.step()
                        epoch_loss += float(loss.detach()) * len(idx)
        finally:
            torch.set_num_threads(threads)
        return {"loss": epoch_loss / n}

    def evaluate(self, model: nn.Module, data: LocalData) -> Metrics:
        """Loss and accuracy on the device's holdout images."""
        return metrics(model, data.holdout)

    def load_reference(self, data: bytes, job: JobContext) -> Digits:
        """The job's reference ``.npz`` (the same form as a device's file), checked."""
        reference = Digits.read(data)
        check_arrays(reference.images, reference.labels)
        if len(reference) == 0:
            raise DataError("the reference data holds no images")
        return reference

    def evaluate_central(self, model: nn.Module, reference: Digits, job: JobContext) -> Metrics:
        """Loss, accuracy and the example count on the job's reference images."""
        return {**metrics(model, reference), "examples": float(len(reference))}

    def audit_inputs(self, reference: Digits, job: JobContext) -> AuditInputs:
        """The reference images for the SHAP audit of each version: every pixel a feature, and a
        map of the mean attribution towards each digit."""
        x, _ = reference.tensors
        return AuditInputs(
            x=x.numpy(),
            features=PIXELS,
            image_shape=(SIDE, SIDE),
            outputs=[str(c) for c in range(CLASSES)],
            output="logit of each digit (before softmax)",
        )


app = DigitsCNN()
