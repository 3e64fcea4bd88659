"""The job's app as the coordinator needs it: version 0, its description, central evaluation.

The coordinator imports the app a job names (it never ships it anywhere); a job whose app does not
import here is refused at submission with the import error's message.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from coordinator.errors import Invalid
from shared.apps import App, AppError, JobContext, load_app
from shared.jobspec import JobSpec

_APPS: dict[tuple[str, str | None], App] = {}


def app_for(spec: JobSpec) -> App:
    """The job's app, imported once per process (``Invalid`` with the reason if it cannot be)."""
    key = (spec.app_ref, spec.model.app_version)
    if key not in _APPS:
        try:
            _APPS[key] = load_app(*key)
        except AppError as err:
            raise Invalid(f"model.app: {err}") from None
    return _APPS[key]


def context(spec: JobSpec, setup: dict[str, Any] | None) -> JobContext:
    return JobContext(spec, setup)


def describe(app: App, job: JobContext) -> dict[str, Any]:
    """The JSON description of the job's model that every version's signed header carries."""
    try:
        return app.describe(job)
    except Exception as err:
        raise Invalid(
            f"app {job.spec.app_ref} cannot describe its model: {type(err).__name__}: {err}"
        ) from None


def initial_vector(app: App, job: JobContext) -> np.ndarray:
    """Version 0's parameters: the app's model built under the job's seed (the global torch
    random state is left as it was)."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            np_state = np.random.get_state()
            np.random.seed(job.seed % 2**32)
            try:
                vec = np.asarray(app.get_parameters(app.build_model(job)))
            finally:
                np.random.set_state(np_state)
    except Exception as err:
        raise Invalid(f"app {job.spec.app_ref} cannot build its model: {type(err).__name__}: {err}") from None
    if vec.dtype != np.float32 or vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        raise Invalid(
            f"app {job.spec.app_ref}: get_parameters must return a non-empty finite float32 vector,"
            f" got {vec.dtype} of shape {vec.shape}"
        )
    return np.array(vec, dtype=np.float32)


def evaluate_central(
    app: App, job: JobContext, reference: Any, vector: np.ndarray
) -> dict[str, float] | None:
    """The app's metrics of the model ``vector`` on parsed reference data."""
    model = app.build_model(job)
    app.set_parameters(model, vector)
    metrics = app.evaluate_central(model, reference, job)
    return None if metrics is None else {k: float(v) for k, v in metrics.items()}
