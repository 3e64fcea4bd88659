"""What an operator sees, and how the operator's commands reach the coordinator.

Shared by the ``aicfl`` commands (server.cli) and the demo (server.demo), so
that both print a job, a metric and an error the same way.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from shared.api_client import ApiClient

if TYPE_CHECKING:
    from training_cluster.api import ClusterApi

# Job and device names, reasons and warnings come from users and devices: printed as they are,
# never read as rich markup (a name such as "churn [/] v2" would otherwise raise or lose text).
console = Console(markup=False)

DEFAULT_URL = "http://127.0.0.1:8080"

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")


@dataclass
class Connection:
    """Where the operator's requests go: the root options ``--url``, ``--token`` and ``--ca-cert``."""

    url: str = DEFAULT_URL
    token: str | None = None
    ca_cert: Path | None = None


connection = Connection()


def api_client(url: str, token: str | None, ca_cert: Path | None = None) -> ApiClient:
    """A client of the coordinator API; ``ca_cert`` is the CA bundle of a TLS coordinator."""
    return ApiClient(url, token, verify=str(ca_cert) if ca_cert else True)


def client() -> ApiClient:
    """A client of the coordinator the operator named."""
    return api_client(connection.url, connection.token, connection.ca_cert)


def cluster_api() -> ClusterApi:
    """The coordinator API as the training cluster uses it (same URL, token and CA as the CLI)."""
    from training_cluster.api import ClusterApi

    return ClusterApi(client())


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (the ``--json`` output of every command)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_error(message: str) -> None:
    """The one line an operator sees instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for nothing, floats to ``digits`` significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def metrics_text(m: dict[str, Any] | None) -> str:
    """Metrics on one line, ``name=value`` (the example count left out)."""
    if not m:
        return "-"
    return " ".join(f"{k}={fmt(v)}" for k, v in m.items() if k != "examples")


def watch_job(
    api: ApiClient, job_id: int, interval: float = 1.0, out: Console | None = None
) -> dict[str, Any]:
    """Live progress of a job until it ends; returns the final job."""
    out = out or console
    # At 80 columns (or piped) the round's metrics wrap; the job, the count and the time stay whole.
    with Progress(
        TextColumn("{task.description}", style="bold", markup=False, table_column=Column(no_wrap=True)),
        BarColumn(bar_width=20),
        TextColumn("{task.completed}/{task.total}", markup=False, table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[info]}", markup=False, table_column=Column(overflow="fold")),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        console=out,
        transient=False,
    ) as progress:
        job = api.json("GET", f"/v1/jobs/{job_id}")
        task = progress.add_task(f"job {job_id} rounds", total=job["rounds"], info="")
        while True:
            job = api.json("GET", f"/v1/jobs/{job_id}")
            r = job.get("latest_round") or {}
            m = (job.get("latest_metrics") or {}).get("central") or {}
            info = (
                f"round {r.get('number', '-')} {r.get('kind', '')} {r.get('stage', '')} {r.get('status', '')}  "
                + metrics_text(m)
            )
            progress.update(task, completed=job["rounds_completed"], info=info)
            if job["status"] not in ("running", "pending"):
                return job  # type: ignore[no-any-return]
            time.sleep(interval)
