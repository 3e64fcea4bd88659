"""``aicfl audit``: the SHAP audit worker, and a version's audit report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from server.console import JSON_OPT, client, cluster_api, console, emit_json, fmt, metrics_text
from server.tables import Column, print_table
from shared.api_client import CliError

app = typer.Typer(help="SHAP audits of model versions.", no_args_is_help=True)


@app.command("worker")
def audit_worker(
    name: str | None = typer.Option(None, "--name", help="This worker's name (default: host and pid)."),
    once: bool = typer.Option(False, "--once", help="Audit what is queued, then exit."),
    poll: float = typer.Option(2.0, "--poll", min=0.1, help="Seconds between looks at an empty queue."),
    lease: float = typer.Option(
        600.0, "--lease", min=10, help="Seconds an audit stays ours without a report."
    ),
    wait_for_server: float = typer.Option(
        0.0, "--wait-for-server", min=0, help="Seconds to wait for the API."
    ),
    exit_with_parent: bool = typer.Option(
        False, "--exit-with-parent", hidden=True, help="Stop when the process that started this one is gone."
    ),
) -> None:
    """Take queued audits from the coordinator and compute their SHAP reports, until stopped."""
    import os
    import signal
    import socket
    import threading

    from training_cluster.audit_worker import run_worker

    worker = name or f"{socket.gethostname()}-{os.getpid()}"
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if exit_with_parent:
        # `server start --with-audit-worker`: the server may die without stopping us (SIGKILL,
        # or uvicorn re-raising the SIGTERM it handled); an orphan is re-parented.
        parent = os.getppid()

        def _watch() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    stop.set()

        threading.Thread(target=_watch, name="parent-watch", daemon=True).start()
    api = cluster_api()
    deadline = time.monotonic() + wait_for_server
    while True:
        try:
            api.client.json("GET", "/v1/health")
            break
        except CliError:
            if time.monotonic() >= deadline or stop.is_set():
                raise
            time.sleep(0.5)
    try:
        done = run_worker(
            api, worker, once=once, poll=poll, lease_seconds=lease, stop=stop, log=console.print
        )
    finally:
        api.close()
    console.print(f"audit worker {worker}: {done} audit(s) done")


#: A feature of an audit's report; its name, from the job's data, wraps.
FEATURE_COLUMNS = (Column("feature", wrap=True), Column("mean |SHAP|"), Column("share"))


def feature_rows(report: dict[str, Any], top: int = 15) -> list[list[str]]:
    """The ``top`` features of an audit report by mean |SHAP|, as the cells of :data:`FEATURE_COLUMNS`."""
    importance = report.get("importance") or {}
    shares = report.get("shares") or {}
    ranked = sorted(importance.items(), key=lambda kv: -kv[1])[:top]
    return [[feat, fmt(value, 4), fmt(shares.get(feat), 3)] for feat, value in ranked]


@app.command("show")
def audit_show(
    job_id: int,
    version: int | None = typer.Option(None, "--version", help="A version (default: the newest audited)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the audit's PNG plots into this folder."),
    as_json: bool = JSON_OPT,
) -> None:
    """A version's SHAP audit: verdict, top features, drift, agreement with the AutoML leader."""
    c = client()
    if version is None:
        rows = c.json("GET", f"/v1/jobs/{job_id}/audits")
        done = [r for r in rows if r["status"] == "done"] or rows
        if not done:
            raise CliError(f"job {job_id} has no audits yet")
        version = int(done[-1]["version"])
    a = c.json("GET", f"/v1/jobs/{job_id}/audits/{version}")
    written = []
    if plot is not None:
        plot.mkdir(parents=True, exist_ok=True)
        for name in a["plots"]:
            target = plot / f"job{job_id}-v{version}-{name}"
            target.write_bytes(c.request("GET", f"/v1/jobs/{job_id}/audits/{version}/plots/{name}").content)
            written.append(str(target))
    if as_json:
        return emit_json({**a, "written": written})
    r = a.get("report") or {}
    console.print(
        Text.assemble(
            (f"audit of job {job_id} version {version}", "bold"),
            f"  status={a['status']}  verdict={fmt(a['verdict'])}  attempts={a['attempts']}"
            f"  seconds={fmt(a['seconds'], 3)}",
        )
    )
    if a.get("error") and a["status"] != "done":
        console.print(f"last error: {a['error']}")
    if r:
        drift = r.get("drift") or {}
        console.print(f"explainer {r.get('explainer')} on {r.get('rows')} rows; output: {r.get('output')}")
        if r.get("input_shape"):
            shape = "x".join(str(d) for d in r["input_shape"])
            console.print(f"inputs of shape {shape}: {len(r.get('importance') or {})} features")
        console.print(f"top features: {', '.join(r.get('top_features') or [])}")
        console.print(
            f"additivity max error {fmt(r.get('additivity_max_error'), 3)}; "
            f"validation {metrics_text(r.get('validation'))}"
        )
        console.print(
            f"vs version {fmt(r.get('previous_version'))}: rank correlation {fmt(drift.get('rank_correlation'), 3)}"
            + "".join(
                f"; {x['feature']} {x['share_before']:.2f}->{x['share_after']:.2f}"
                for x in drift.get("shifted", [])
            )
        )
        if r.get("baseline"):
            console.print(f"vs AutoML leader: {metrics_text(r['baseline'])}")
        print_table(console, FEATURE_COLUMNS, feature_rows(r))
        for reason in r.get("reasons") or []:
            console.print(reason, style="yellow")
    for w in written:
        console.print(f"wrote {w}")
