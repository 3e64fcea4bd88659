"""``aicfl rounds``: the rounds of a job, listed, shown or followed live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from server.console import JSON_OPT, client, console, emit_json, fmt, metrics_text, watch_job
from server.tables import Column, print_table
from shared.api_client import CliError

app = typer.Typer(help="Rounds of a job.", no_args_is_help=True)


#: A round: what it was and how it ended always show; its counts and metrics as the width allows.
ROUND_COLUMNS = (
    Column("round"),
    Column("kind", priority=1),
    Column("status"),
    Column("stage", priority=5),
    Column("devices", priority=2),
    Column("dropped", priority=3),
    Column("declined", priority=6),
    Column("agg s", priority=7),
    Column("central", wrap=True, priority=1),
    Column("federated", wrap=True, priority=4),
    Column("reason", wrap=True),
    # Differential privacy: epsilon spent once the round was released (docs/privacy.md); --json has the rest.
    Column("ε", priority=8),
)
#: A device's part in a round.
DEVICE_COLUMNS = (
    Column("device"),
    Column("status"),
    Column("stage done", priority=1),
    Column("examples", priority=2),
    Column("reason", wrap=True),
)


def round_row(r: dict[str, Any]) -> list[str]:
    """A round as the cells of :data:`ROUND_COLUMNS`."""
    m = r["metrics"] or {}
    return [
        str(r["number"]),
        r["kind"],
        r["status"],
        r["stage"],
        str(r["participants"]),
        str(r["dropped"]),
        str(r["declined"]),
        fmt(r["aggregation_seconds"], 3),
        metrics_text(m.get("central")),
        metrics_text(m.get("federated")),
        _reasons(r),
        epsilon_text(r.get("privacy")),
    ]


def epsilon_text(p: dict[str, Any] | None) -> str:
    """Epsilon spent once the round was released, at the job's delta (differential privacy); "-" without."""
    if not p or p.get("epsilon") is None:
        return "-"
    return f"{p['epsilon']:.3g} (d={p['delta']:g})"


def device_row(p: dict[str, Any]) -> list[str]:
    """A device's part in a round as the cells of :data:`DEVICE_COLUMNS`."""
    return [p["device_id"], p["status"], p["stage_done"] or "-", fmt(p["num_examples"]), p["reason"] or ""]


def _reasons(r: dict[str, Any]) -> str:
    """The round's own reason (why it was abandoned), then why devices declined it."""
    parts = [r["reason"]] if r["reason"] else []
    parts += [f"declined ({n}): {why}" for why, n in (r.get("declines") or {}).items()]
    return "; ".join(parts)


@app.command("list")
def rounds_list(job_id: int, as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", f"/v1/jobs/{job_id}/rounds")
    if as_json:
        return emit_json(rows)
    print_table(console, ROUND_COLUMNS, [round_row(r) for r in rows])


@app.command("show")
def rounds_show(job_id: int, number: int, as_json: bool = JSON_OPT) -> None:
    r = client().json("GET", f"/v1/jobs/{job_id}/rounds/{number}")
    if as_json:
        return emit_json(r)
    print_table(console, ROUND_COLUMNS, [round_row(r)])
    print_table(console, DEVICE_COLUMNS, [device_row(p) for p in r["devices"]])


@app.command("plot")
def rounds_plot(
    job_id: int,
    out: Path | None = typer.Option(
        None, "--out", help="The PNG to write (default: job<JOB>-learning-curve.png here)."
    ),
    metric: str | None = typer.Option(
        None, "--metric", help="Default: the job's primary metric (auc, accuracy or rmse)."
    ),
) -> None:
    """Draw the job's learning curve as a PNG: a metric per round, centrally and on the devices,
    against the AutoML leader, the pre-trained version 0 and the job's benchmarks."""
    from server.plots import PlotError, draw, learning_curve, write_png

    target = out or Path(f"job{job_id}-learning-curve.png")
    if not target.parent.is_dir():
        raise CliError(f"--out: no such folder {target.parent}")
    if target.is_dir():
        raise CliError(f"--out: {target} is a folder; name the PNG file to write")
    api = client()
    job = api.json("GET", f"/v1/jobs/{job_id}")
    rounds = api.json("GET", f"/v1/jobs/{job_id}/rounds")
    try:
        curve = learning_curve(job, rounds, metric)
    except PlotError as err:
        raise CliError(str(err)) from None
    try:
        write_png(draw(curve), target)
    except OSError as err:
        raise CliError(f"--out: cannot write {target}: {err.strerror or err}") from None
    print(target)


@app.command("watch")
def rounds_watch(job_id: int, interval: float = typer.Option(1.0, "--interval")) -> None:
    """Follow a job's rounds live until it ends."""
    job = watch_job(client(), job_id, interval)
    console.print(f"job {job_id} {job['status']}" + (f": {job['reason']}" if job["reason"] else ""))
