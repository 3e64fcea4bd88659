"""``aicfl models``: the model registry of a job, and export of a version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from server.console import JSON_OPT, client, console, emit_json, fmt, metrics_text
from server.tables import Column, print_table
from shared.api_client import CliError

app = typer.Typer(help="The model registry.", no_args_is_help=True)


#: A model version: which it is and how it measures always show; its lineage as the width allows.
VERSION_COLUMNS = (
    Column("version"),
    Column("parent", priority=4),
    Column("round", priority=2),
    Column("sha256", priority=3),
    Column("params", priority=5),
    Column("central", wrap=True),
    Column("federated", wrap=True, priority=1),
    Column("source", priority=2),
)


def version_row(v: dict[str, Any]) -> list[str]:
    """A model version as the cells of :data:`VERSION_COLUMNS`."""
    m = v["metrics"]
    return [
        str(v["version"]),
        fmt(v["parent"]),
        fmt(v["round_number"]),
        v["sha256"][:12],
        str(v["num_parameters"]),
        metrics_text(m.get("central")),
        metrics_text(m.get("federated")),
        v["provenance"].get("source", ""),
    ]


@app.command("list")
def models_list(job_id: int, as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", f"/v1/jobs/{job_id}/models")
    if as_json:
        return emit_json(rows)
    print_table(console, VERSION_COLUMNS, [version_row(v) for v in rows])


@app.command("export")
def models_export(
    job_id: int,
    version: int | None = typer.Option(None, "--version", help="Default: the newest."),
    export_format: str = typer.Option(
        "state_dict", "--format", help="state_dict, torchscript or onnx; xgboost for a gbdt job"
    ),
    out: Path | None = typer.Option(None, "--out", help="Output file."),
) -> None:
    """Export a model version."""
    if export_format not in ("state_dict", "torchscript", "onnx", "xgboost"):
        raise CliError(
            f"--format must be state_dict, torchscript or onnx (xgboost for a gbdt job); got {export_format!r}"
        )
    api = client()
    if version is None:
        versions = api.json("GET", f"/v1/jobs/{job_id}/models")
        if not versions:
            raise CliError(f"job {job_id} has no model version yet")
        version = versions[-1]["version"]
    data = api.request(
        "GET", f"/v1/jobs/{job_id}/models/{version}/export", params={"format": export_format}
    ).content
    ext = {"state_dict": "pt", "torchscript": "ts.pt", "onnx": "onnx", "xgboost": "json"}[export_format]
    target = out or Path(f"job{job_id}-v{version}.{ext}")
    target.write_bytes(data)
    print(f"wrote {target} ({len(data)} bytes, version {version}, {export_format})")
