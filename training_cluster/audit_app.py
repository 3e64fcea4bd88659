"""The SHAP audit of an app's model (``[model] app``): its inputs through the app, its report and class maps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.apps import App, JobContext
from shared.apps.base import AuditInputs
from shared.jobspec import JobSpec
from training_cluster.audit import (
    Attributions,
    AuditError,
    AuditResult,
    ExplainerName,
    draw_rows,
    explain,
)
from training_cluster.audit_drift import mean_abs_importance
from training_cluster.audit_plots import class_map_plot
from training_cluster.audit_report import summarise

# DeepLIFT is exact up to float rounding; a larger gap (beyond this share of the largest output)
# means a rule was missing (a functional nonlinearity, a module used twice), and expected
# gradients are used instead.
_ADDITIVITY_TOLERANCE = 1e-3


class FlatInput(nn.Module):
    """An app's model over flat rows ``(n, features)``: the explainers, the validation and the
    batched DeepLIFT take 2-D inputs; each row is reshaped to the model's input shape."""

    def __init__(self, model: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.shape = tuple(int(d) for d in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.reshape(x.shape[0], *self.shape))


@dataclass(frozen=True)
class AppInputs:
    """:class:`~shared.apps.base.AuditInputs`, checked: flat float32 rows, names, shapes, labels."""

    x: np.ndarray
    shape: tuple[int, ...]
    features: list[str]
    image_shape: tuple[int, int] | None
    outputs: list[str] | None
    output: str


def app_inputs(app: App, reference: Any, job: JobContext) -> AppInputs:
    """The app's audit inputs for the parsed reference data, checked and flattened.

    Raises :class:`AuditError` when the app gives none or they do not fit together.
    """
    label = job.spec.app_ref
    try:
        given = app.audit_inputs(reference, job)
    except Exception as err:  # the app's own code: its failure is the audit's, in one line
        raise AuditError(f"app {label}: audit_inputs failed: {type(err).__name__}: {err}") from None
    if given is None:
        raise AuditError(
            f"app {label} gives no audit inputs (App.audit_inputs), so its versions cannot be audited;"
            " turn [audit] enabled off for its jobs"
        )
    if not isinstance(given, AuditInputs):
        raise AuditError(f"app {label}: audit_inputs returned {type(given).__name__}, not AuditInputs")
    try:
        x = np.asarray(given.x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise AuditError(f"app {label}: audit inputs are not a float array: {err}") from None
    if x.ndim < 2 or x.shape[0] < 1:
        raise AuditError(f"app {label}: audit inputs need the shape (examples, ...); got {x.shape}")
    if not np.isfinite(x).all():
        raise AuditError(f"app {label}: audit inputs hold NaN or infinite values")
    shape = tuple(int(d) for d in x.shape[1:])
    size = int(np.prod(shape))
    features = [str(f) for f in given.features]
    if len(features) != size:
        raise AuditError(
            f"app {label}: {len(features)} feature names for inputs of shape {shape} ({size} values)"
        )
    if len(set(features)) != len(features):
        raise AuditError(f"app {label}: audit feature names must be distinct")
    image = None
    if given.image_shape is not None:
        image = (int(given.image_shape[0]), int(given.image_shape[1]))
        if image[0] < 1 or image[1] < 1 or size % (image[0] * image[1]) != 0:
            raise AuditError(f"app {label}: image shape {image} does not divide inputs of shape {shape}")
    outputs = None if given.outputs is None else [str(o) for o in given.outputs]
    return AppInputs(
        x=x.reshape(x.shape[0], size),
        shape=shape,
        features=features,
        image_shape=image,
        outputs=outputs,
        output=str(given.output),
    )


def app_model(app: App, job: JobContext, header: dict[str, Any], vector: np.ndarray) -> nn.Module:
    """The app's model with a version's parameters, in eval mode; its header must describe the
    model the app here builds (``App.describe``)."""
    label = job.spec.app_ref
    try:
        described = app.describe(job)
    except Exception as err:
        raise AuditError(f"app {label} cannot describe its model: {type(err).__name__}: {err}") from None
    if "arch" in header and header["arch"] != described:
        raise AuditError(
            f"version {header.get('version')} was built for {header['arch']}, but app {label} here"
            f" describes {described}"
        )
    try:
        model = app.build_model(job)
        app.set_parameters(model, np.asarray(vector, dtype=np.float32))
    except Exception as err:
        raise AuditError(f"cannot load the model: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise AuditError(
            f"app {label}'s model is a {type(model).__name__}; SHAP's explainers need a torch.nn.Module"
        )
    return model.eval()


def _app_setup(header: dict[str, Any], job_setup: dict[str, Any] | None) -> dict[str, Any] | None:
    """The setup a version was trained with (its signed header's), else the job's."""
    setup = header.get("preprocess")
    return dict(setup) if isinstance(setup, dict) else job_setup


def _explain_app(
    model: nn.Module,
    x: np.ndarray,
    background: np.ndarray,
    *,
    explainer: ExplainerName | None,
    seed: int,
    threads: int | None,
) -> tuple[Attributions, float]:
    """:func:`explain` on flat rows, with expected gradients when DeepLIFT's additivity fails
    (unless an explainer is asked for); returns the attributions and the additivity error."""
    attributions = explain(model, x, background, explainer=explainer, seed=seed, threads=threads)
    error = _additivity(attributions)
    scale = max(1.0, float(np.max(np.abs(attributions.outputs)))) if attributions.outputs.size else 1.0
    if explainer is None and attributions.explainer == "deep" and error > _ADDITIVITY_TOLERANCE * scale:
        attributions = explain(model, x, background, explainer="gradient", seed=seed, threads=threads)
        error = _additivity(attributions)
    return attributions, error


def _additivity(attributions: Attributions) -> float:
    if not len(attributions.outputs):
        return 0.0
    fitted = attributions.expected[None, :] + attributions.values.sum(axis=1)
    return float(np.max(np.abs(fitted - attributions.outputs)))


def _output_labels(inputs: AppInputs, count: int) -> list[str]:
    if inputs.outputs is None:
        return [str(j) for j in range(count)]
    if len(inputs.outputs) != count:
        raise AuditError(f"the app names {len(inputs.outputs)} outputs; the model gives {count}")
    return inputs.outputs


def class_maps(
    values: np.ndarray, outputs: np.ndarray, image_shape: tuple[int, int]
) -> tuple[np.ndarray, list[int]]:
    """The mean attribution map towards each output: ``(outputs, height, width)`` and the row counts.

    With several outputs (classes), output ``j``'s map is the mean of ``values[:, :, j]`` over the
    rows the model predicts as ``j`` (its largest output); with one, over all rows. Channels before
    the image's last two axes are summed.
    """
    rows, features, n_out = values.shape
    h, w = image_shape
    per_image = values.reshape(rows, features // (h * w), h, w, n_out).sum(axis=1)
    maps = np.zeros((n_out, h, w))
    if n_out == 1:
        if rows:
            maps[0] = per_image[..., 0].mean(axis=0)
        return maps, [rows]
    predicted = outputs.argmax(axis=1)
    counts = []
    for j in range(n_out):
        chosen = predicted == j
        counts.append(int(chosen.sum()))
        if counts[-1]:
            maps[j] = per_image[chosen, :, :, j].mean(axis=0)
    return maps, counts


def app_version_importance(
    spec: JobSpec,
    app: App,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: Any,
    *,
    version: int,
    seed: int | None = None,
    job_setup: dict[str, Any] | None = None,
    explainer: ExplainerName | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """An app version's importances exactly as its own audit reports them (no validation, no plots),
    for drift against a previous version whose report is missing or failed."""
    job = JobContext(spec, _app_setup(header, job_setup))
    model = app_model(app, job, header, vector)
    inputs = app_inputs(app, reference, job)
    flat = FlatInput(model, inputs.shape)
    rows, background = draw_rows(len(inputs.x), spec.audit, spec.seed if seed is None else seed, version)
    attributions, _ = _explain_app(
        flat, inputs.x[rows], inputs.x[background], explainer=explainer, seed=version, threads=threads
    )
    return mean_abs_importance(attributions.values, inputs.features)


def audit_app_version(
    spec: JobSpec,
    app: App,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: Any,
    *,
    version: int | None = None,
    previous: dict[str, Any] | None = None,
    previous_version: int | None = None,
    baseline: dict[str, Any] | None = None,
    seed: int | None = None,
    job_setup: dict[str, Any] | None = None,
    explainer: ExplainerName | None = None,
    plots: bool = True,
    threads: int | None = None,
) -> AuditResult:
    """Audit one version of an app's model on the job's reference data (``app.load_reference``'s).

    As :func:`audit_version`, with the app's :class:`~shared.apps.base.AuditInputs` for the rows:
    each input value is a feature (a pixel), the report's ``output`` is the app's words, and when
    the inputs are images a third plot, ``class_maps.png``, shows the mean attribution towards each
    class (:func:`class_maps`). The report adds ``input_shape`` and ``image_shape``.
    """
    started = time.perf_counter()
    version = int(header.get("version", 0) if version is None else version)
    seed = spec.seed if seed is None else seed
    if previous_version is None and previous is not None:
        previous_version = previous.get("version")
    job = JobContext(spec, _app_setup(header, job_setup))
    model = app_model(app, job, header, vector)
    inputs = app_inputs(app, reference, job)
    flat = FlatInput(model, inputs.shape)
    rows, background = draw_rows(len(inputs.x), spec.audit, seed, version)
    xr, xb = inputs.x[rows], inputs.x[background]
    attributions, additivity = _explain_app(flat, xr, xb, explainer=explainer, seed=version, threads=threads)
    values, features = attributions.values, inputs.features
    n_out = values.shape[2]
    labels = _output_labels(inputs, n_out)

    def image_maps() -> dict[str, bytes]:
        if inputs.image_shape is None:
            return {}
        maps, counts = class_maps(values, attributions.outputs, inputs.image_shape)
        what = "over the rows predicted as each class" if n_out > 1 else "over all rows"
        return {
            "class_maps.png": class_map_plot(
                maps, labels, counts, f"{spec.name} v{version}: mean SHAP value {what}"
            )
        }

    return summarise(
        spec,
        started=started,
        version=version,
        seed=seed,
        previous=previous,
        previous_version=previous_version,
        baseline=baseline,
        model=flat,
        xr=xr,
        xb=xb,
        groups=None,
        attributions=attributions,
        values=values,
        features=features,
        classes=labels if n_out > 1 else None,
        output=inputs.output,
        additivity=additivity,
        threads=threads,
        plots=plots,
        swarm_data=lambda: xr.astype(np.float64),
        shape={
            "input_shape": list(inputs.shape),
            "image_shape": None if inputs.image_shape is None else list(inputs.image_shape),
        },
        more_plots=image_maps,
    )
