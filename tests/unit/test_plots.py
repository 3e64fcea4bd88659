"""A job's learning curve (server/plots.py): which rounds and metric it shows, the lines it draws, the PNG."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from server.plots import PlotError, draw, learning_curve, primary_metric, write_png

ROUNDS_TRAINED = 6


def _job(task: str | None = "binary", **kw: Any) -> dict[str, Any]:
    data = {"task": task} if task else None
    return {"id": 4, "name": "churn-by-state", "spec": {"data": data}, **kw}


def _rounds(n: int = ROUNDS_TRAINED) -> list[dict[str, Any]]:
    """A statistics round, ``n`` training rounds (round 3 abandoned, then retried as 4), an evaluation round."""
    rounds: list[dict[str, Any]] = [{"number": 0, "kind": "stats", "status": "completed", "metrics": None}]
    number = 1
    for i in range(n):
        if number == 3:
            rounds.append({"number": 3, "kind": "train", "status": "abandoned", "metrics": None})
            number += 1
        central = {
            "auc": 0.70 + 0.03 * i,
            "accuracy": 0.80 + 0.01 * i,
            "loss": 0.5 - 0.02 * i,
            "examples": 500,
        }
        # The devices' metrics of the last version arrive with the evaluation round.
        federated = {"auc": 0.68 + 0.03 * i, "accuracy": 0.79 + 0.01 * i, "examples": 900}
        rounds.append(
            {
                "number": number,
                "kind": "train",
                "status": "completed",
                "metrics": {"central": central, "federated": federated, "secure": True},
            }
        )
        number += 1
    rounds.append({"number": number, "kind": "evaluate", "status": "completed", "metrics": {}})
    return rounds


TRAINED = [1, 2, 4, 5, 6, 7]


def test_the_curve_has_a_point_per_completed_training_round_centrally_and_on_the_devices() -> None:
    curve = learning_curve(_job(), _rounds())
    assert curve.metric == "auc" and curve.title == "job 4 churn-by-state: auc per round"
    assert curve.central.rounds == tuple(TRAINED) and curve.federated.rounds == tuple(TRAINED)
    assert curve.central.values == pytest.approx([0.70 + 0.03 * i for i in range(ROUNDS_TRAINED)])
    assert curve.federated.values == pytest.approx([0.68 + 0.03 * i for i in range(ROUNDS_TRAINED)])
    assert curve.references == ()


def test_a_round_without_a_metric_is_left_out_of_that_line_only() -> None:
    rounds = _rounds()
    del rounds[-2]["metrics"]["federated"]  # the last version: its devices' metrics not yet in
    curve = learning_curve(_job(), rounds)
    assert curve.central.rounds == tuple(TRAINED) and curve.federated.rounds == tuple(TRAINED[:-1])


@pytest.mark.parametrize(
    ("task", "expected"),
    [("binary", "auc"), ("multiclass", "accuracy"), ("regression", "rmse"), (None, "accuracy")],
)
def test_the_primary_metric_follows_the_task(task: str | None, expected: str) -> None:
    assert primary_metric(_job(task), ["loss", "accuracy", "auc", "rmse"]) == expected
    # A metric the rounds do not hold is not chosen: the task's next one is.
    assert primary_metric(_job("binary"), ["loss", "accuracy"]) == "accuracy"


def test_the_baseline_version_0_and_ceiling_are_horizontal_lines_of_the_same_metric() -> None:
    job = _job(
        baseline={"leader": "GBM_1_AutoML", "algorithm": "gbm", "metrics": {"auc": 0.91, "examples": 500}},
        pretrain={"world_size": 2, "epochs": 10, "metrics": {"central": {"auc": 0.82, "accuracy": 0.86}}},
    )
    curve = learning_curve(job, _rounds(), ceiling={"auc": 0.93, "accuracy": 0.9})
    assert [(r.kind, r.value) for r in curve.references] == [
        ("baseline", 0.91),
        ("version 0", 0.82),
        ("ceiling", 0.93),
    ]
    assert "GBM_1_AutoML" in curve.references[0].label
    by_accuracy = learning_curve(job, _rounds(), metric="accuracy", ceiling={"auc": 0.93, "accuracy": 0.9})
    # The leader was measured by AUC only: no line for it on an accuracy curve.
    assert [(r.kind, r.value) for r in by_accuracy.references] == [("version 0", 0.86), ("ceiling", 0.9)]


def test_a_job_without_a_completed_training_round_has_no_curve() -> None:
    rounds = _rounds()
    waiting = [r for r in rounds if r["kind"] != "train" or r["status"] != "completed"]
    with pytest.raises(PlotError, match="job 4 has no completed training round yet"):
        learning_curve(_job(), waiting)
    with pytest.raises(PlotError, match="no completed training round"):
        learning_curve(_job(), [])


def test_an_unknown_metric_names_the_ones_there_are() -> None:
    with pytest.raises(PlotError) as err:
        learning_curve(_job(), _rounds(), metric="f1")
    assert str(err.value) == "job 4's rounds have no metric 'f1'; they have auc, accuracy, loss"


def test_the_figure_draws_each_series_and_each_reference_at_its_value(tmp_path: Path) -> None:
    job = _job(
        baseline={"leader": "GBM_1", "metrics": {"auc": 0.91}},
        pretrain={"metrics": {"central": {"auc": 0.82}}},
    )
    curve = learning_curve(job, _rounds(), ceiling={"auc": 0.93})
    fig = draw(curve)
    (ax,) = fig.axes
    lines = {str(line.get_label()): line for line in ax.get_lines()}
    assert len(lines) == 5
    central = lines["central (reference rows)"]
    federated = lines["federated (devices' hold-out rows)"]
    assert list(central.get_xdata()) == TRAINED and list(federated.get_xdata()) == TRAINED  # type: ignore[arg-type]
    assert list(central.get_ydata()) == pytest.approx(curve.central.values)  # type: ignore[arg-type]
    assert list(federated.get_ydata()) == pytest.approx(curve.federated.values)  # type: ignore[arg-type]
    assert central.get_linestyle() == "-" and federated.get_linestyle() == "--"
    for label, y in (("AutoML leader GBM_1: 0.91", 0.91), ("version 0, pre-trained centrally: 0.82", 0.82)):
        assert list(lines[label].get_ydata()) == [y, y]  # type: ignore[arg-type]
    assert list(lines["ceiling: trained centrally on the pooled rows: 0.93"].get_ydata()) == [0.93, 0.93]  # type: ignore[arg-type]
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "auc (higher is better)"
    assert ax.get_title() == "job 4 churn-by-state: auc per round"
    # Every line is in the legend, below the axes.
    (legend,) = fig.legends
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(lines)

    png = write_png(fig, tmp_path / "curve.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 500)
    assert 10_000 < len(data) < 1_000_000


def test_a_regression_curve_says_lower_is_better() -> None:
    rounds = [
        {"number": n, "kind": "train", "status": "completed", "metrics": {"central": {"rmse": 3.0 / n}}}
        for n in (1, 2)
    ]
    fig = draw(learning_curve(_job("regression"), rounds))
    assert fig.axes[0].get_ylabel() == "rmse (lower is better)"


def test_the_jobs_benchmarks_are_lines_too_and_the_ceiling_given_stands_for_its_benchmark() -> None:
    job = _job(
        benchmarks={
            "production": {"metrics": {"auc": 0.88}, "description": "the model in use"},
            "ceiling": {"metrics": {"auc": 0.93}, "description": "trained centrally"},
            "rmse only": {"metrics": {"rmse": 2.5}, "description": ""},
        }
    )
    curve = learning_curve(job, _rounds())
    assert [(r.kind, r.label, r.value) for r in curve.references] == [
        ("benchmark", "production", 0.88),
        ("benchmark", "ceiling", 0.93),
    ]
    given = learning_curve(job, _rounds(), ceiling={"auc": 0.93})
    assert [(r.kind, r.value) for r in given.references] == [("ceiling", 0.93), ("benchmark", 0.88)]
    lines = {str(line.get_label()): line for line in draw(given).axes[0].get_lines()}
    assert list(lines["production: 0.88"].get_ydata()) == [0.88, 0.88]  # type: ignore[arg-type]
