"""The SHAP audit's shared core: drawing the rows, explaining a model and validating the attributions.

Pure computation; no HTTP (the loop that claims audits and returns reports is
:mod:`training_cluster.audit_worker`). Beside it: the comparisons behind the verdict
(:mod:`training_cluster.audit_drift`), the report every audit ends with
(:mod:`training_cluster.audit_report`) and the plots (:mod:`training_cluster.audit_plots`). The
audits built on them: a zoo model on tabular rows (:mod:`training_cluster.audit_tabular`,
:func:`audit_version`), an app's model (:mod:`training_cluster.audit_app`,
:func:`audit_app_version`) and a tree ensemble (:mod:`training_cluster.audit_trees`). Their public
names are importable from here too.
For each version:

1. draw the explained rows and the background rows from the reference data,
   reproducibly from the job's seed and the version;
2. explain the model's raw output (the logit for binary tasks, every class's
   logit for multiclass, the standardised value for regression) on its input
   columns with shap's ``DeepExplainer`` (DeepLIFT rescale rule averaged over
   the background, Lundberg & Lee, NeurIPS 2017, sect. 4.2) or, for layers it
   has no rule for, ``GradientExplainer`` (expected gradients);
3. add each row's column attributions up to the original features (one-hot
   columns of a categorical feature are summed: attributions are additive, so
   the additivity check still holds);
4. validate on a few rows against an exact Shapley computation (``Exact``, a
   few columns) or a permutation estimate (``Permutation``) over the same
   background;
5. compare the importances (mean |SHAP|) with the previous version's (Spearman
   rank correlation, shifts of each feature's share) and with the AutoML
   leader's TreeSHAP contributions; the job's ``[audit]`` thresholds give the
   verdict, ``ok`` or ``drift``.

A gbdt version (``[model] zoo = "gbdt"``) is audited on the same input columns with shap's
``TreeExplainer``, interventional over the same background
(:func:`~training_cluster.audit_trees.audit_tree_version`); everything after the explainer is
this core's.

A job on an app (``[model] app``) is audited through the app
(:func:`~training_cluster.audit_app.audit_app_version`): its ``audit_inputs`` turn the reference data into
model inputs with a name per input value (``px_3_4`` for a pixel); every input
value is a feature, and for images the audit also draws the mean attribution
towards each class as heatmaps. Rows, explainers, validation, drift and the
verdict are the tabular audit's.

The DeepLIFT pass is shap's own rule (its module hooks) applied to many rows
in one batch instead of shap's one-row-at-a-time loop: the same numbers
(checked against ``DeepExplainer.shap_values`` by the tests), about ten
times faster on a small MLP. If shap's internals move, the code falls back to
``DeepExplainer.shap_values``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from shared.jobspec import AuditSpec
from training_cluster.audit_plots import beeswarm_plot, class_map_plot, importance_plot

# "tree": shap's TreeExplainer, for a gbdt version (training_cluster.audit_trees).
ExplainerName = Literal["deep", "gradient", "tree"]

# Rows per DeepLIFT batch (explained rows x background rows, doubled): big
# enough to leave Python's per-call overhead behind, small enough for a cache.
_DEEP_BATCH_ROWS = 20_000
# The exact explainer evaluates 2^columns coalitions per row; past this, permutations.
_EXACT_MAX_COLUMNS = 10
_VALIDATION_PERMUTATIONS = 10
# One thread: the matrices of a zoo model are small enough that a second thread costs more in
# synchronisation than it saves (measured 0.25 s against 0.9 s on 2 busy cores, bench/audit.py);
# workers scale out as processes instead.
DEFAULT_THREADS = 1


class AuditError(ValueError):
    """An audit that cannot be computed (bad model, preprocessing or reference data)."""


@dataclass(frozen=True)
class Attributions:
    """SHAP values on the model's input columns for some rows.

    ``values``: ``(rows, columns, outputs)``; ``expected``: ``(outputs,)``, the
    mean raw output over the background; ``outputs``: ``(rows, outputs)``, the
    raw outputs explained.
    """

    values: np.ndarray
    expected: np.ndarray
    outputs: np.ndarray
    explainer: ExplainerName


@dataclass(frozen=True)
class AuditResult:
    """One version's audit: the JSON report, the verdict, the PNG plots, and the raw values.

    ``values`` are the per-row SHAP values on the original features,
    ``(rows, features, outputs)``, in ``features`` order; they are for tests
    and benchmarks and are not sent anywhere.
    """

    report: dict[str, Any]
    verdict: str
    plots: dict[str, bytes]
    values: np.ndarray
    features: list[str]


# --------------------------------------------------------------------------- model and rows


def draw_rows(n: int, audit: AuditSpec, seed: int, version: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the explained rows and the background rows among ``n`` reference rows.

    Both are drawn without replacement (all rows when there are fewer) from a
    generator seeded with ``(seed, version)``, so that a retried audit, or a
    worker measuring a previous version's importances, explains the very same
    rows.
    """
    if n < 1:
        raise AuditError("the reference data has no rows")
    rng = np.random.default_rng([int(seed), int(version)])
    rows = np.sort(rng.choice(n, size=min(audit.rows, n), replace=False))
    background = np.sort(rng.choice(n, size=min(audit.background, n), replace=False))
    return rows, background


def choose_explainer(model: nn.Module) -> ExplainerName:
    """``deep`` when shap's DeepExplainer has a rule for every layer (all zoo models), else ``gradient``."""
    try:
        from shap.explainers._deep.deep_pytorch import op_handler
    except ImportError:
        return "deep"
    leaves = [m for m in model.modules() if not list(m.children())]
    return "deep" if all(type(m).__name__ in op_handler for m in leaves) else "gradient"


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _raw_outputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    return out.reshape(x.shape[0], -1).numpy().astype(np.float64)


# --------------------------------------------------------------------------- explainers


def _deep_batched(model: nn.Module, inner: Any, x: torch.Tensor, background: torch.Tensor) -> np.ndarray:
    """shap's DeepLIFT rule over many rows per backward pass.

    shap's rule for a nonlinearity reads the first half of a batch as the
    inputs and the second half as their references. shap pairs one row with
    every background row; here each of ``k`` rows is repeated against the
    whole background, which keeps that pairing, and the multipliers times
    ``x - reference`` are averaged over the background as shap does.
    """
    from shap.explainers._deep import deep_pytorch

    n, d = x.shape
    b = background.shape[0]
    n_out = int(inner.num_outputs)
    values = np.zeros((n, d, n_out), dtype=np.float64)
    per_batch = max(1, _DEEP_BATCH_ROWS // (2 * b))
    own = {id(m): set(m._parameters) for m in model.modules()}
    handles = inner.add_handles(model, deep_pytorch.add_interim_values, deep_pytorch.deeplift_grad)
    try:
        for start in range(0, n, per_batch):
            rows = x[start : start + per_batch]
            k = rows.shape[0]
            tiled = rows.repeat_interleave(b, dim=0)
            refs = background.repeat(k, 1)
            joint = torch.cat([tiled, refs]).requires_grad_()
            out = model(joint).reshape(2 * k * b, -1)
            delta = (tiled - refs).detach()
            for j in range(n_out):
                (grad,) = torch.autograd.grad(out[:, j].sum(), joint, retain_graph=j + 1 < n_out)
                phi = (grad[: k * b] * delta).reshape(k, b, d).mean(dim=1)
                values[start : start + k, :, j] = phi.numpy()
    finally:
        for handle in handles:
            handle.remove()
        inner.remove_attributes(model)
        # shap keeps each leaf's input and output as parameters ``x`` and ``y``, and removes them only
        # below nn.Sequential containers; a model of its own class keeps them otherwise.
        for module in model.modules():
            for name in ("x", "y"):
                if name in module._parameters and name not in own.get(id(module), ()):
                    delattr(module, name)
    return values


def _deep(model: nn.Module, x: torch.Tensor, background: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    import shap

    explainer = shap.DeepExplainer(model, background)
    inner = explainer.explainer
    expected = np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)
    try:
        values = _deep_batched(model, inner, x, background)
    except (ImportError, AttributeError):
        # shap's internals moved: its own (slower, one row at a time) loop.
        raw = explainer.shap_values(x, check_additivity=False)
        values = np.asarray(raw, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1)
    return values, expected


def _gradient(
    model: nn.Module, x: torch.Tensor, background: torch.Tensor, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    import shap

    explainer = shap.GradientExplainer(model, background)
    raw = explainer.shap_values(x, nsamples=200, rseed=seed)
    values = np.asarray(raw, dtype=np.float64).reshape(x.shape[0], x.shape[1], -1)
    expected = _raw_outputs(model, background).mean(axis=0)
    return values, expected


def explain(
    model: nn.Module,
    x: np.ndarray,
    background: np.ndarray,
    *,
    explainer: ExplainerName | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> Attributions:
    """SHAP values of ``model``'s raw outputs for the rows ``x`` against ``background``, per input column.

    ``explainer``: ``deep`` or ``gradient``; by default :func:`choose_explainer`.
    ``threads``: torch threads for the computation (default 1; restored afterwards).
    """
    name = explainer or choose_explainer(model)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    bt = torch.from_numpy(np.ascontiguousarray(background, dtype=np.float32))
    model.eval()
    with torch_threads(threads or DEFAULT_THREADS):
        if name == "deep":
            values, expected = _deep(model, xt, bt)
        elif name == "gradient":
            values, expected = _gradient(model, xt, bt, seed)
        else:
            raise ValueError(f"unknown explainer {name!r}; expected deep or gradient")
        outputs = _raw_outputs(model, xt)
    return Attributions(values=values, expected=expected, outputs=outputs, explainer=name)


def to_features(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Column attributions ``(rows, columns, outputs)`` summed into features ``(rows, features, outputs)``."""
    return np.einsum("ncj,cf->nfj", values, groups)


def validate(
    model: nn.Module,
    x: np.ndarray,
    background: np.ndarray,
    values: np.ndarray,
    groups: np.ndarray | None,
    *,
    seed: int,
) -> dict[str, Any]:
    """Compare the explainer's values for rows ``x`` with exact Shapley values (or a permutation estimate).

    Both are interventional Shapley values over the same background, computed
    on the input columns and summed into features (``groups`` None: each column
    is a feature); ``values`` are the explainer's feature-level values for these rows. Returns
    ``{"explainer", "rows", "correlation", "max_abs_diff"}``.
    """
    import shap

    n, columns = x.shape

    def f(batch: np.ndarray) -> np.ndarray:
        return _raw_outputs(model, torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))

    masker = shap.maskers.Independent(background, max_samples=background.shape[0])
    name: str
    if columns <= _EXACT_MAX_COLUMNS:
        name = "exact"
        reference = shap.explainers.Exact(f, masker)(x, silent=True)
    else:
        name = "permutation"
        evals = _VALIDATION_PERMUTATIONS * (2 * columns + 1)
        explainer = shap.explainers.Permutation(f, masker, seed=seed)
        reference = explainer(x, max_evals=evals, silent=True)
    ref_values = np.asarray(reference.values, dtype=np.float64).reshape(n, columns, -1)
    ref_features = ref_values if groups is None else to_features(ref_values, groups)
    a, b = values.reshape(-1), ref_features.reshape(-1)
    return {
        "explainer": name,
        "rows": int(n),
        "correlation": _correlation(a, b),
        "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0,
    }


def warm_up() -> float:
    """Compile shap's numba code (inside its maskers) before the first audit; returns the seconds spent.

    shap compiles it on first use in each process, about 8 s on a busy CPU that
    would otherwise fall on the first version's audit and let the queue fall
    behind the rounds. Both validation paths (exact and permutation) are run
    once on a tiny linear model.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for columns in (3, _EXACT_MAX_COLUMNS + 1):
            model = nn.Linear(columns, 1)
            x = rng.normal(size=(2, columns)).astype(np.float32)
            background = rng.normal(size=(8, columns)).astype(np.float32)
            identity = np.eye(columns)
            validate(model, x, background, np.zeros((2, columns, 1)), identity, seed=0)
    return time.perf_counter() - t0


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# The audits and plots built on this core, importable from here as before; loaded on first use,
# since they import this module (no cycle when a module loads).
_ELSEWHERE = {
    "audit_drift": ("compare_with_baseline", "compare_with_previous", "spearman"),
    "audit_report": ("summarise",),
    "audit_tabular": (
        "audit_version",
        "version_importance",
        "load_model",
        "preprocessor_for",
        "feature_groups",
        "output_description",
    ),
    "audit_app": (
        "audit_app_version",
        "app_version_importance",
        "app_inputs",
        "app_model",
        "AppInputs",
        "FlatInput",
        "class_maps",
    ),
}
_HOME = {name: module for module, names in _ELSEWHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    """``training_cluster.audit.audit_version`` and the rest: the name from its own module."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"training_cluster.{module}"), name)


if TYPE_CHECKING:
    from training_cluster.audit_app import (
        AppInputs,
        FlatInput,
        app_inputs,
        app_model,
        app_version_importance,
        audit_app_version,
        class_maps,
    )
    from training_cluster.audit_drift import compare_with_baseline, compare_with_previous, spearman
    from training_cluster.audit_report import summarise
    from training_cluster.audit_tabular import (
        audit_version,
        feature_groups,
        load_model,
        output_description,
        preprocessor_for,
        version_importance,
    )

__all__ = [
    "AppInputs",
    "Attributions",
    "AuditError",
    "AuditResult",
    "ExplainerName",
    "FlatInput",
    "app_inputs",
    "app_model",
    "app_version_importance",
    "audit_app_version",
    "audit_version",
    "beeswarm_plot",
    "choose_explainer",
    "class_map_plot",
    "class_maps",
    "compare_with_baseline",
    "compare_with_previous",
    "draw_rows",
    "explain",
    "feature_groups",
    "importance_plot",
    "load_model",
    "output_description",
    "preprocessor_for",
    "spearman",
    "summarise",
    "to_features",
    "validate",
    "version_importance",
    "warm_up",
]
