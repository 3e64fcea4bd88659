"""A tiny image app for the cluster's tests: a small CNN on scikit-learn's 8x8 digits.

Named in a job spec as ``[model] app = "tests.cluster.image_app:app"`` (``app_version = "1"``).
Its data is a CSV of 64 pixel columns ``px_<row>_<col>`` (0-16) and a ``label`` column (0-9);
``digits_csv`` writes such files. ``load_data`` honours the Flower convention of
``partition-id``/``num-partitions`` in the node config (a rank of pre-training gets its shard that
way), and ``audit_inputs`` gives the SHAP audit the images and the pixel names.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from shared.apps.base import (
    App,
    AuditInputs,
    DataError,
    DeviceContext,
    JobContext,
    LocalData,
    Metrics,
    TrainConfig,
)

SIDE = 8
PIXELS = [f"px_{r}_{c}" for r in range(SIDE) for c in range(SIDE)]
CLASSES = [str(d) for d in range(10)]


def digits_frame(indices: np.ndarray | None = None) -> pd.DataFrame:
    """scikit-learn's digits (1,797 images) as the app's table, optionally only the rows ``indices``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    frame = pd.DataFrame(digits.data.astype(np.int64), columns=PIXELS)
    frame["label"] = digits.target.astype(np.int64)
    return frame if indices is None else frame.iloc[np.asarray(indices)].reset_index(drop=True)


def digits_csv(path: Path, indices: np.ndarray | None = None) -> Path:
    """Write the digits ``indices`` as the app's CSV at ``path``."""
    digits_frame(indices).to_csv(path, index=False)
    return path


@dataclass
class Images:
    """Images ``(n, 1, 8, 8)`` scaled to [0, 1] and their labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Images:
        return Images(self.x[idx], self.y[idx])


def _images(frame: pd.DataFrame) -> Images:
    missing = [c for c in [*PIXELS, "label"] if c not in frame.columns]
    if missing:
        raise DataError(f"missing columns: {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
    x = np.array(frame[PIXELS], dtype=np.float32).reshape(-1, 1, SIDE, SIDE) / 16.0
    y = np.array(frame["label"], dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError("labels must be digits 0-9")
    return Images(x, y)


class DigitsCNN(nn.Module):
    """conv 3x3 -> ReLU -> max-pool 2 -> linear: about 1,400 parameters with 8 channels.

    ``functional``: the ReLU is ``torch.relu`` in ``forward``, not a module, so that shap's
    DeepLIFT has no rule for it (the audit must notice and use expected gradients).
    """

    def __init__(self, channels: int, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * (SIDE // 2) ** 2, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(x)
        hidden = torch.relu(hidden) if self.functional else self.relu(hidden)
        return self.fc(self.flatten(self.pool(hidden)))


def _metrics(model: nn.Module, data: Images) -> Metrics:
    if len(data) == 0:
        return {"loss": 0.0, "accuracy": 0.0, "examples": 0.0}
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x))
        target = torch.from_numpy(data.y)
        loss = float(nn.functional.cross_entropy(logits, target))
        accuracy = float((logits.argmax(dim=1) == target).float().mean())
    return {"loss": loss, "accuracy": accuracy, "examples": float(len(data))}


class DigitsApp(App):
    """``[model.options] channels`` (default 8) convolution channels, ``functional`` (default false)."""

    name = "tests.digits"
    version = "1"

    def build_model(self, job: JobContext) -> nn.Module:
        return DigitsCNN(int(job.options.get("channels", 8)), bool(job.options.get("functional", False)))

    def load_data(self, device: DeviceContext) -> LocalData:
        try:
            frame = pd.read_csv(device.data_path)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {device.data_path}: {err}") from None
        images = _images(frame)
        parts = int(device.node_config.get("num-partitions", 1))
        part = int(device.node_config.get("partition-id", 0))
        if parts > 1:
            images = images.take(np.arange(part, len(images), parts))
        train_idx, hold_idx = device.holdout_split(len(images))
        return LocalData(
            train=images.take(train_idx),
            holdout=images.take(hold_idx),
            train_examples=len(train_idx),
            holdout_examples=len(hold_idx),
        )

    def train(self, model: nn.Module, data: LocalData, config: TrainConfig) -> Metrics:
        images: Images = data.train
        torch.set_num_threads(max(1, config.threads))
        x, y = torch.from_numpy(images.x), torch.from_numpy(images.y)
        params = list(model.parameters())
        optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(params, lr=config.learning_rate)
            if config.optimizer == "adam"
            else torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9)
        )
        generator = torch.Generator().manual_seed(config.seed)
        model.train()
        total, seen = 0.0, 0
        for _ in range(config.epochs):
            order = torch.randperm(len(images), generator=generator)
            for begin in range(0, len(images), config.batch_size):
                batch = order[begin : begin + config.batch_size]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        return {"loss": total / max(seen, 1)}

    def evaluate(self, model: nn.Module, data: LocalData) -> Metrics:
        out = _metrics(model, data.holdout)
        out.pop("examples")
        return out

    def load_reference(self, data: bytes, job: JobContext) -> Images:
        try:
            frame = pd.read_csv(io.BytesIO(data))
        except ValueError as err:
            raise DataError(f"not a CSV: {err}") from None
        return _images(frame)

    def evaluate_central(self, model: nn.Module, reference: Images, job: JobContext) -> Metrics:
        return _metrics(model, reference)

    def audit_inputs(self, reference: Images, job: JobContext) -> AuditInputs | None:
        return AuditInputs(
            x=reference.x,
            features=PIXELS,
            image_shape=(SIDE, SIDE),
            outputs=CLASSES,
            output="logit of each digit (before softmax)",
        )


app = DigitsApp()


def model_table(**options: Any) -> dict[str, Any]:
    """The ``[model]`` table of a job on this app, with ``[model.options]``."""
    return {"app": "tests.cluster.image_app:app", "app_version": "1", "options": {"channels": 8, **options}}
