"""``aicfl rounds``: the rounds of a job, listed, shown or followed live."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from server.console import JSON_OPT, client, console, emit_json, fmt, metrics_text, watch_job

app = typer.Typer(help="Rounds of a job.", no_args_is_help=True)


def _rounds_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "round",
        "kind",
        "status",
        "stage",
        "devices",
        "dropped",
        "declined",
        "agg s",
        "central",
        "federated",
        "reason",
    )
    for r in rows:
        m = r["metrics"] or {}
        table.add_row(
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
        )
    return table


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
    console.print(_rounds_table(rows))


@app.command("show")
def rounds_show(job_id: int, number: int, as_json: bool = JSON_OPT) -> None:
    r = client().json("GET", f"/v1/jobs/{job_id}/rounds/{number}")
    if as_json:
        return emit_json(r)
    console.print(_rounds_table([r]))
    table = Table("device", "status", "stage done", "examples", "reason")
    for p in r["devices"]:
        table.add_row(
            p["device_id"], p["status"], p["stage_done"] or "-", fmt(p["num_examples"]), p["reason"] or ""
        )
    console.print(table)


@app.command("watch")
def rounds_watch(job_id: int, interval: float = typer.Option(1.0, "--interval")) -> None:
    """Follow a job's rounds live until it ends."""
    job = watch_job(client(), job_id, interval)
    console.print(f"job {job_id} {job['status']}" + (f": {job['reason']}" if job["reason"] else ""))
