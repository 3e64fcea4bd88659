"""A job's learning curve: its primary metric per training round, measured centrally on the job's
reference rows (solid) and on the devices' hold-out rows (dashed), against the AutoML leader, the
pre-trained version 0, the job's benchmarks and, where one is known, the ceiling (the same model
trained centrally).

:func:`learning_curve` reads the coordinator's job and rounds (``GET /v1/jobs/{id}`` and
``/v1/jobs/{id}/rounds``) into a :class:`LearningCurve`; :func:`draw` makes the matplotlib figure
and :func:`write_png` the file. matplotlib is imported only by those two, so that the CLI starts
fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The metric a job is judged on, by its task; the first one its rounds hold is plotted.
PRIMARY = {
    "binary": ("auc", "accuracy", "loss"),
    "multiclass": ("accuracy", "auc", "loss"),
    "regression": ("rmse", "r2", "loss"),
    "app": ("accuracy", "auc", "rmse", "loss"),
}
#: Metrics where a lower value is the better model.
LOWER_IS_BETTER = frozenset({"rmse", "loss", "mae", "mse"})
#: The name of the benchmark that is the centrally trained ceiling (``aicfl demo`` records one).
CEILING = "ceiling"
#: Not metrics of a model: how many rows it was measured on.
NOT_METRICS = frozenset({"examples"})

# Okabe and Ito's palette: told apart with every common colour vision deficiency.
_CENTRAL, _FEDERATED = "#0072B2", "#E69F00"
_REFERENCE_STYLE: dict[str, tuple[str, str]] = {
    "baseline": ("#009E73", "-."),
    "version 0": ("#CC79A7", ":"),
    "ceiling": ("#000000", "-"),
}
# The job's own benchmarks (PUT /v1/jobs/{id}/benchmarks/{name}), in turn.
_BENCHMARK_COLOURS = ("#D55E00", "#56B4E9", "#7F7F7F", "#F0E442")


class PlotError(ValueError):
    """Why a job's learning curve cannot be drawn: no completed training round, an unknown metric."""


@dataclass(frozen=True)
class Series:
    """One metric over the training rounds that measured it."""

    label: str
    rounds: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Reference:
    """A horizontal line: a model the federated one is compared with, and its value."""

    kind: str  # "baseline", "version 0", "ceiling" or "benchmark" (one of the job's, by its name)
    label: str
    value: float


@dataclass(frozen=True)
class LearningCurve:
    """What a learning curve shows, before any drawing."""

    title: str
    metric: str
    central: Series
    federated: Series
    references: tuple[Reference, ...] = field(default=())


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _metrics(m: Any) -> dict[str, float]:
    """The finite numbers of a metrics dict, the example count left out."""
    if not isinstance(m, Mapping):
        return {}
    out = {k: _number(v) for k, v in m.items() if k not in NOT_METRICS}
    return {k: v for k, v in out.items() if v is not None}


def training_rounds(rounds: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The completed rounds that each made a version from the devices' work, by number: the training
    rounds, or a gbdt job's boosting rounds, each the level round that finished its trees, numbered
    by its boosting round (docs/gbdt.md). Statistics, binning and evaluation rounds train nothing."""
    done: list[Mapping[str, Any]] = []
    for r in rounds:
        if r.get("status") != "completed":
            continue
        if r.get("kind") == "train":
            done.append(r)
        elif r.get("kind") == "level" and r.get("model_version_out") is not None:
            boosting_round = (r.get("metrics") or {}).get("boosting_round")
            if boosting_round is not None:
                done.append({**r, "kind": "train", "number": boosting_round})
    return sorted(done, key=lambda r: int(r["number"]))


def available_metrics(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every metric the completed training rounds measured, centrally or on the devices."""
    names: dict[str, None] = {}
    for r in training_rounds(rounds):
        m = r.get("metrics") or {}
        for side in ("central", "federated"):
            names.update(dict.fromkeys(_metrics(m.get(side))))
    return list(names)


def task_of(job: Mapping[str, Any]) -> str:
    """The job's task as :data:`PRIMARY` names it: binary, multiclass, regression, or app (no [data] table)."""
    data = (job.get("spec") or {}).get("data")
    return str(data.get("task", "binary")) if isinstance(data, Mapping) else "app"


def primary_metric(job: Mapping[str, Any], available: Sequence[str]) -> str | None:
    """The metric the job is judged on that its rounds hold: AUC for a binary table, accuracy for
    a multiclass one or an app, RMSE for a regression; else the first the rounds hold."""
    for name in PRIMARY.get(task_of(job), PRIMARY["app"]):
        if name in available:
            return name
    return available[0] if available else None


def learning_curve(
    job: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    metric: str | None = None,
    ceiling: Mapping[str, Any] | None = None,
) -> LearningCurve:
    """The learning curve of ``job`` (as ``GET /v1/jobs/{id}`` gives it) over its ``rounds``.

    ``metric``: default :func:`primary_metric`. ``ceiling``: the metrics of the same model trained
    centrally, where known (``aicfl demo`` measures one); it stands for the job's benchmark of that
    name. Each of the job's ``benchmarks`` that measured ``metric`` is a line too. Raises :class:`PlotError` when the job
    has no completed training round, or its rounds do not hold ``metric``.
    """
    job_id = job.get("id", "?")
    train = training_rounds(rounds)
    if not train:
        raise PlotError(f"job {job_id} has no completed training round yet")
    available = available_metrics(train)
    if not available:
        raise PlotError(
            f"job {job_id}'s rounds hold no metrics: it has no reference data and its devices no hold-out rows"
        )
    if metric is None:
        metric = primary_metric(job, available)
    if metric not in available:
        raise PlotError(f"job {job_id}'s rounds have no metric {metric!r}; they have {', '.join(available)}")
    assert metric is not None

    def series(side: str, label: str) -> Series:
        points = [(int(r["number"]), _metrics((r.get("metrics") or {}).get(side)).get(metric)) for r in train]
        kept = [(n, v) for n, v in points if v is not None]
        return Series(label, tuple(n for n, _ in kept), tuple(v for _, v in kept))

    references: list[Reference] = []
    baseline = job.get("baseline") or {}
    value = _metrics(baseline.get("metrics")).get(metric)
    if value is not None:
        references.append(
            Reference("baseline", f"AutoML leader {baseline.get('leader') or ''}".strip(), value)
        )
    pretrain_metrics = (job.get("pretrain") or {}).get("metrics") or {}
    value = _metrics(pretrain_metrics.get("central") or pretrain_metrics).get(metric)
    if value is not None:
        references.append(Reference("version 0", "version 0, pre-trained centrally", value))
    value = _metrics(ceiling).get(metric)
    if value is not None:
        references.append(Reference("ceiling", "ceiling: trained centrally on the pooled rows", value))
    for bench_name, bench in (job.get("benchmarks") or {}).items():
        value = _metrics((bench or {}).get("metrics")).get(metric)
        if value is not None and not (ceiling is not None and bench_name == CEILING):
            references.append(Reference("benchmark", str(bench_name), value))
    name = job.get("name")
    return LearningCurve(
        title=f"job {job_id}" + (f" {name}" if name else "") + f": {metric} per round",
        metric=metric,
        central=series("central", "central (reference rows)"),
        federated=series("federated", "federated (devices' hold-out rows)"),
        references=tuple(references),
    )


def draw(curve: LearningCurve) -> Figure:
    """The learning curve as a matplotlib figure (Agg canvas, no pyplot state): one line per
    series with a marker per round, one horizontal line per reference, each labelled in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if curve.central.rounds:
        ax.plot(curve.central.rounds, curve.central.values, "-o", color=_CENTRAL, label=curve.central.label)
    if curve.federated.rounds:
        ax.plot(
            curve.federated.rounds,
            curve.federated.values,
            "--s",
            color=_FEDERATED,
            label=curve.federated.label,
        )
    benchmarks = 0
    for ref in curve.references:
        if ref.kind == "benchmark":
            colour, style = _BENCHMARK_COLOURS[benchmarks % len(_BENCHMARK_COLOURS)], "--"
            benchmarks += 1
        else:
            colour, style = _REFERENCE_STYLE[ref.kind]
        ax.axhline(
            ref.value, color=colour, linestyle=style, linewidth=1.5, label=f"{ref.label}: {ref.value:.4g}"
        )
    better = "lower" if curve.metric in LOWER_IS_BETTER else "higher"
    ax.set_xlabel("round")
    ax.set_ylabel(f"{curve.metric} ({better} is better)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(curve.title, fontsize=11)
    # Below the axes, where it hides no line.
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


def write_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG; returns ``path``."""
    fig.savefig(path, format="png")
    return path
