"""The SHAP audit of one model version: attributions, report, drift verdict and plots.

Pure computation over a model, its preprocessing and the job's reference
rows; no HTTP (the loop that claims audits and returns reports is
:mod:`training_cluster.audit_worker`). For each version:

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

A job on an app (``[model] app``) is audited through the app
(:func:`audit_app_version`): its ``audit_inputs`` turn the reference data into
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

import io
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from shared.apps import App, JobContext
from shared.apps.base import AuditInputs
from shared.jobspec import AuditSpec, JobSpec
from shared.tabular import Preprocessor
from shared.zoo import build_model, load_flat_parameters

ExplainerName = Literal["deep", "gradient"]

# Rows per DeepLIFT batch (explained rows x background rows, doubled): big
# enough to leave Python's per-call overhead behind, small enough for a cache.
_DEEP_BATCH_ROWS = 20_000
# The exact explainer evaluates 2^columns coalitions per row; past this, permutations.
_EXACT_MAX_COLUMNS = 10
_VALIDATION_PERMUTATIONS = 10
_PLOT_FEATURES = 20
# One thread: the matrices of a zoo model are small enough that a second thread costs more in
# synchronisation than it saves (measured 0.25 s against 0.9 s on 2 busy cores, bench/audit.py);
# workers scale out as processes instead.
_DEFAULT_THREADS = 1


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


def load_model(header: dict[str, Any], vector: np.ndarray) -> nn.Module:
    """The zoo module a model version's header describes, with its parameters, in eval mode."""
    try:
        model = build_model(header["arch"])
        load_flat_parameters(model, np.asarray(vector, dtype=np.float32))
    except (KeyError, TypeError, ValueError) as err:
        raise AuditError(f"cannot load the model: {err}") from None
    return model.eval()


def preprocessor_for(header: dict[str, Any], fallback: dict[str, Any] | None = None) -> Preprocessor:
    """The preprocessing a version was trained with (its header's), else the job's."""
    description = header.get("preprocess") or fallback
    if description is None:
        raise AuditError("the model version has no preprocessing description")
    try:
        return Preprocessor.from_dict(description)
    except ValueError as err:
        raise AuditError(str(err)) from None


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
def _torch_threads(threads: int) -> Iterator[None]:
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
    with _torch_threads(threads or _DEFAULT_THREADS):
        if name == "deep":
            values, expected = _deep(model, xt, bt)
        elif name == "gradient":
            values, expected = _gradient(model, xt, bt, seed)
        else:
            raise ValueError(f"unknown explainer {name!r}; expected deep or gradient")
        outputs = _raw_outputs(model, xt)
    return Attributions(values=values, expected=expected, outputs=outputs, explainer=name)


def feature_groups(pre: Preprocessor) -> tuple[list[str], np.ndarray]:
    """The original features and the ``(columns, features)`` 0/1 matrix that sums columns into them."""
    features = [f.name for f in pre.schema.features]
    index = {name: i for i, name in enumerate(features)}
    owners = pre.column_features
    matrix = np.zeros((len(owners), len(features)), dtype=np.float64)
    matrix[np.arange(len(owners)), [index[o] for o in owners]] = 1.0
    return features, matrix


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


# --------------------------------------------------------------------------- comparisons


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when undefined (constant or < 2 items)."""
    from scipy.stats import spearmanr

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def _shares(importance: dict[str, float]) -> dict[str, float]:
    total = sum(importance.values())
    if total <= 0:
        return dict.fromkeys(importance, 0.0)
    return {name: value / total for name, value in importance.items()}


def _top(importance: dict[str, float], k: int) -> list[str]:
    return [name for name, _ in sorted(importance.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def compare_with_previous(
    importance: dict[str, float], previous: dict[str, float] | None, audit: AuditSpec
) -> tuple[dict[str, Any], list[str]]:
    """The drift section of a report and the reasons for a ``drift`` verdict (none: ``ok``).

    Drift when the Spearman correlation of the importances with the previous
    version's is below ``audit.min_rank_correlation``, or when a feature's share
    of the total importance moved by more than ``audit.max_share_shift``. With
    no previous importances there is nothing to compare: no drift.
    """
    thresholds = {
        "min_rank_correlation": audit.min_rank_correlation,
        "max_share_shift": audit.max_share_shift,
    }
    if previous is None:
        return {"rank_correlation": None, "shifted": [], "thresholds": thresholds}, []
    common = [name for name in importance if name in previous]
    rho = spearman([importance[n] for n in common], [float(previous[n]) for n in common])
    after = _shares(importance)
    before = _shares({name: float(v) for name, v in previous.items()})
    moves = []
    for name in sorted(set(after) | set(before)):
        was, now = before.get(name, 0.0), after.get(name, 0.0)
        if abs(now - was) > audit.max_share_shift:
            moves.append((name, was, now))
    moves.sort(key=lambda m: -abs(m[2] - m[1]))
    shifted = [{"feature": name, "share_before": was, "share_after": now} for name, was, now in moves]
    reasons = []
    if rho is not None and rho < audit.min_rank_correlation:
        reasons.append(
            f"rank correlation of feature importances with the previous version is {rho:.3f},"
            f" below {audit.min_rank_correlation:g}"
        )
    for name, was, now in moves:
        reasons.append(
            f"{name}'s share of total importance moved from {was:.1%} to {now:.1%}"
            f" (more than {audit.max_share_shift:.0%})"
        )
    return {"rank_correlation": rho, "shifted": shifted, "thresholds": thresholds}, reasons


def compare_with_baseline(
    importance: dict[str, float], baseline: dict[str, Any] | None, top: int
) -> dict[str, Any] | None:
    """Agreement with the AutoML leader's mean |TreeSHAP| per feature: rank correlation and top-k overlap."""
    if not baseline:
        return None
    contributions = baseline.get("contributions") or {}
    theirs = contributions.get("features") or {}
    if not theirs:
        return None
    theirs = {str(k): float(v) for k, v in theirs.items()}
    common = [name for name in importance if name in theirs]
    k = min(top, len(common)) if common else 0
    ours_top = set(_top({n: importance[n] for n in common}, k))
    their_top = set(_top({n: theirs[n] for n in common}, k))
    return {
        "model": contributions.get("model") or baseline.get("leader"),
        "rank_correlation": spearman([importance[n] for n in common], [theirs[n] for n in common]),
        "top_overlap": len(ours_top & their_top) / k if k else None,
        "features": len(common),
    }


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def importance_plot(importance_by_output: dict[str, dict[str, float]], order: list[str], title: str) -> bytes:
    """A horizontal bar chart of mean |SHAP| per feature (stacked by class when there are several)."""
    from matplotlib.figure import Figure

    shown = list(reversed(order[:_PLOT_FEATURES]))
    fig = Figure(figsize=(8, 0.35 * len(shown) + 1.6))
    ax = fig.add_subplot()
    left = np.zeros(len(shown))
    for label, values in importance_by_output.items():
        widths = np.array([values.get(name, 0.0) for name in shown])
        ax.barh(shown, widths, left=left, label=label)
        left += widths
    if len(importance_by_output) > 1:
        ax.legend(title="class", loc="lower right", fontsize=9)
    ax.set_xlabel("mean |SHAP value|")
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def beeswarm_plot(values: np.ndarray, data: np.ndarray, features: list[str], title: str) -> bytes:
    """shap's beeswarm of per-row values ``(rows, features)``, coloured by ``data`` (NaN: grey)."""
    import shap
    from matplotlib.figure import Figure

    shown = min(len(features), _PLOT_FEATURES)
    fig = Figure(figsize=(8, 0.4 * shown + 1.6))
    ax = fig.add_subplot()
    explanation = shap.Explanation(values=values, data=data, feature_names=features)
    with warnings.catch_warnings():
        # A categorical feature's colour column is all NaN (grey dots) and numpy says so.
        warnings.simplefilter("ignore", RuntimeWarning)
        shap.plots.beeswarm(explanation, max_display=shown, ax=ax, show=False, plot_size=None)
    ax.set_title(title, fontsize=11)
    return _png(fig)


def _feature_data(reference: pd.DataFrame, pre: Preprocessor) -> np.ndarray:
    """Colour values for the beeswarm: numeric features as they are, categorical ones grey (NaN)."""
    columns = []
    for feature in pre.schema.features:
        if feature.type == "numeric":
            columns.append(pd.to_numeric(reference[feature.name], errors="coerce").to_numpy(dtype=np.float64))
        else:
            columns.append(np.full(len(reference), np.nan))
    return np.column_stack(columns) if columns else np.zeros((len(reference), 0))


# --------------------------------------------------------------------------- the audit


def output_description(pre: Preprocessor) -> str:
    """What the SHAP values explain, in words: the model's raw output for the task."""
    schema = pre.schema
    if schema.task == "binary":
        return f"logit of P({schema.target} = {pre.positive})"
    if schema.task == "multiclass":
        return f"logit of each class of {schema.target} (before softmax)"
    return f"{schema.target} standardised: (value - {pre.target_mean:.6g}) / {pre.target_std:.6g}"


def _importance(values: np.ndarray, features: list[str]) -> dict[str, float]:
    # Mean |SHAP| per class, summed over classes (the total of a stacked bar).
    per = np.abs(values).mean(axis=0).sum(axis=1)
    return {name: float(v) for name, v in zip(features, per, strict=True)}


def version_importance(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    *,
    version: int,
    seed: int | None = None,
    job_preprocess: dict[str, Any] | None = None,
    explainer: ExplainerName | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """A version's feature importances exactly as its own audit reports them (no validation, no plots).

    For drift against a previous version whose report is missing or failed.
    """
    pre = preprocessor_for(header, job_preprocess)
    model = load_model(header, vector)
    x = pre.transform_features(reference)
    rows, background = draw_rows(len(x), spec.audit, spec.seed if seed is None else seed, version)
    attributions = explain(model, x[rows], x[background], explainer=explainer, seed=version, threads=threads)
    features, groups = feature_groups(pre)
    return _importance(to_features(attributions.values, groups), features)


def audit_version(
    spec: JobSpec,
    header: dict[str, Any],
    vector: np.ndarray,
    reference: pd.DataFrame,
    *,
    version: int | None = None,
    previous: dict[str, Any] | None = None,
    previous_version: int | None = None,
    baseline: dict[str, Any] | None = None,
    seed: int | None = None,
    job_preprocess: dict[str, Any] | None = None,
    explainer: ExplainerName | None = None,
    plots: bool = True,
    threads: int | None = None,
) -> AuditResult:
    """Audit one model version on the job's reference rows.

    ``header``: the version's header (``arch``, ``preprocess``, ``version``);
    ``vector``: its flat parameters. ``previous``: the previous version's report
    (at least its ``importance``), or None for the first version.
    ``baseline``: the job's AutoML baseline (its ``contributions``), or None.
    ``seed``: the job's seed (default ``spec.seed``); rows are drawn from it
    and the version. Raises :class:`AuditError` (or the preprocessor's
    ``DataSchemaError``) when the inputs do not fit together.
    """
    started = time.perf_counter()
    audit = spec.audit
    version = int(header.get("version", 0) if version is None else version)
    seed = spec.seed if seed is None else seed
    if previous_version is None and previous is not None:
        previous_version = previous.get("version")
    pre = preprocessor_for(header, job_preprocess)
    model = load_model(header, vector)
    x = pre.transform_features(reference)
    if x.shape[1] != int(header["arch"]["input_dim"]):
        raise AuditError(
            f"the preprocessing makes {x.shape[1]} input columns, the model takes {header['arch']['input_dim']}"
        )
    rows, background = draw_rows(len(x), audit, seed, version)
    xr, xb = x[rows], x[background]
    attributions = explain(model, xr, xb, explainer=explainer, seed=version, threads=threads)
    features, groups = feature_groups(pre)
    values = to_features(attributions.values, groups)

    fitted = attributions.expected[None, :] + attributions.values.sum(axis=1)
    additivity = float(np.max(np.abs(fitted - attributions.outputs))) if len(rows) else 0.0

    importance = _importance(values, features)
    by_class: dict[str, dict[str, float]] | None = None
    if spec.tabular.task == "multiclass":
        per_class = np.abs(values).mean(axis=0)
        by_class = {
            label: {name: float(per_class[i, j]) for i, name in enumerate(features)}
            for j, label in enumerate(pre.classes)
        }

    validation = None
    if audit.validate_rows > 0:
        k = min(audit.validate_rows, len(rows))
        with _torch_threads(threads or _DEFAULT_THREADS):
            validation = validate(model, xr[:k], xb, values[:k], groups, seed=seed)

    previous_importance = None
    if previous is not None and previous.get("importance"):
        previous_importance = {str(k): float(v) for k, v in previous["importance"].items()}
    drift, reasons = compare_with_previous(importance, previous_importance, audit)
    verdict = "drift" if reasons else "ok"

    images: dict[str, bytes] = {}
    if plots:
        order = _top(importance, len(importance))
        title = f"{spec.name} v{version}: {output_description(pre)}"
        images["importance.png"] = importance_plot(by_class or {"all": importance}, order, title)
        if spec.tabular.task == "multiclass":
            # One value per row: towards the class the model predicts for that row.
            predicted = attributions.outputs.argmax(axis=1)
            swarm = values[np.arange(len(rows)), :, predicted]
            swarm_title = f"{spec.name} v{version}: SHAP towards each row's predicted class"
        else:
            swarm, swarm_title = values[:, :, 0], title
        data = _feature_data(reference.iloc[rows], pre)
        images["beeswarm.png"] = beeswarm_plot(swarm, data, features, swarm_title)

    report: dict[str, Any] = {
        "version": version,
        "previous_version": previous_version if previous_importance is not None else None,
        "explainer": attributions.explainer,
        "output": output_description(pre),
        "rows": int(len(rows)),
        "background": int(len(background)),
        "expected_value": [float(v) for v in attributions.expected],
        "importance": importance,
        "importance_by_class": by_class,
        "shares": _shares(importance),
        "top_features": _top(importance, audit.top),
        "additivity_max_error": additivity,
        "validation": validation,
        "drift": drift,
        "baseline": compare_with_baseline(importance, baseline, audit.top),
        "verdict": verdict,
        "reasons": reasons,
        "seconds": time.perf_counter() - started,
    }
    return AuditResult(report=report, verdict=verdict, plots=images, values=values, features=features)


# --------------------------------------------------------------------------- an app's model

# DeepLIFT is exact up to float rounding; a larger gap (beyond this share of the largest output)
# means a rule was missing (a functional nonlinearity, a module used twice), and expected
# gradients are used instead.
_ADDITIVITY_TOLERANCE = 1e-3
# The class maps: inches per panel (width, height), colour bar and title strips, dots per inch,
# panels per row. Binary fractions times 80 dpi: the PNG's size is exact (160 x 180 px a panel).
_MAP_PANEL = (2.0, 2.25)
_MAP_BAR = 1.0
_MAP_TITLE = 0.5
_MAP_DPI = 80
_MAP_COLUMNS = 5


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


def class_map_plot(maps: np.ndarray, labels: Sequence[str], counts: Sequence[int], title: str) -> bytes:
    """A grid of heatmaps, one per output, on one symmetric colour scale (red: towards the output).

    Five panels a row; the PNG is exactly ``160 * columns + 80`` by ``180 * rows + 40`` pixels.
    """
    from matplotlib.figure import Figure

    panels = len(maps)
    columns = min(_MAP_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    pw, ph = _MAP_PANEL
    width, height = columns * pw + _MAP_BAR, rows * ph + _MAP_TITLE
    fig = Figure(figsize=(width, height), dpi=_MAP_DPI)
    limit = float(np.max(np.abs(maps))) if maps.size else 0.0
    limit = limit if limit > 0 else 1.0
    image = None
    for i in range(panels):
        r, c = divmod(i, columns)
        bottom = height - _MAP_TITLE - (r + 1) * ph
        ax = fig.add_axes(
            ((c * pw + 0.15) / width, (bottom + 0.1) / height, (pw - 0.3) / width, (ph - 0.5) / height)
        )
        image = ax.imshow(maps[i], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"{labels[i]} (n={counts[i]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        bar = fig.add_axes(
            ((columns * pw + 0.1) / width, 0.3 / height, 0.15 / width, (height - _MAP_TITLE - 0.6) / height)
        )
        fig.colorbar(image, cax=bar).ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_MAP_DPI)
    return buf.getvalue()


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
    return _importance(attributions.values, inputs.features)


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
    audit = spec.audit
    version = int(header.get("version", 0) if version is None else version)
    seed = spec.seed if seed is None else seed
    if previous_version is None and previous is not None:
        previous_version = previous.get("version")
    job = JobContext(spec, _app_setup(header, job_setup))
    model = app_model(app, job, header, vector)
    inputs = app_inputs(app, reference, job)
    flat = FlatInput(model, inputs.shape)
    rows, background = draw_rows(len(inputs.x), audit, seed, version)
    xr, xb = inputs.x[rows], inputs.x[background]
    attributions, additivity = _explain_app(flat, xr, xb, explainer=explainer, seed=version, threads=threads)
    values, features = attributions.values, inputs.features
    n_out = values.shape[2]
    labels = _output_labels(inputs, n_out)

    importance = _importance(values, features)
    by_class: dict[str, dict[str, float]] | None = None
    if n_out > 1:
        per_class = np.abs(values).mean(axis=0)
        by_class = {
            label: {name: float(per_class[i, j]) for i, name in enumerate(features)}
            for j, label in enumerate(labels)
        }

    validation = None
    if audit.validate_rows > 0:
        k = min(audit.validate_rows, len(rows))
        with _torch_threads(threads or _DEFAULT_THREADS):
            validation = validate(flat, xr[:k], xb, values[:k], None, seed=seed)

    previous_importance = None
    if previous is not None and previous.get("importance"):
        previous_importance = {str(k): float(v) for k, v in previous["importance"].items()}
    drift, reasons = compare_with_previous(importance, previous_importance, audit)
    verdict = "drift" if reasons else "ok"

    images: dict[str, bytes] = {}
    if plots:
        order = _top(importance, len(importance))
        title = f"{spec.name} v{version}: {inputs.output}"
        images["importance.png"] = importance_plot(by_class or {"all": importance}, order, title)
        if n_out > 1:
            predicted = attributions.outputs.argmax(axis=1)
            swarm = values[np.arange(len(rows)), :, predicted]
            swarm_title = f"{spec.name} v{version}: SHAP towards each row's predicted class"
        else:
            swarm, swarm_title = values[:, :, 0], title
        images["beeswarm.png"] = beeswarm_plot(swarm, xr.astype(np.float64), features, swarm_title)
        if inputs.image_shape is not None:
            maps, counts = class_maps(values, attributions.outputs, inputs.image_shape)
            what = "over the rows predicted as each class" if n_out > 1 else "over all rows"
            images["class_maps.png"] = class_map_plot(
                maps, labels, counts, f"{spec.name} v{version}: mean SHAP value {what}"
            )

    report: dict[str, Any] = {
        "version": version,
        "previous_version": previous_version if previous_importance is not None else None,
        "explainer": attributions.explainer,
        "output": inputs.output,
        "rows": int(len(rows)),
        "background": int(len(background)),
        "input_shape": list(inputs.shape),
        "image_shape": None if inputs.image_shape is None else list(inputs.image_shape),
        "expected_value": [float(v) for v in attributions.expected],
        "importance": importance,
        "importance_by_class": by_class,
        "shares": _shares(importance),
        "top_features": _top(importance, audit.top),
        "additivity_max_error": additivity,
        "validation": validation,
        "drift": drift,
        "baseline": compare_with_baseline(importance, baseline, audit.top),
        "verdict": verdict,
        "reasons": reasons,
        "seconds": time.perf_counter() - started,
    }
    return AuditResult(report=report, verdict=verdict, plots=images, values=values, features=features)
