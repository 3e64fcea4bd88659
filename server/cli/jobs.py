"""``aicfl jobs``: submit, list, show and cancel federated jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from server.console import JSON_OPT, client, console, emit_json, fmt, metrics_text
from server.tables import Column, print_table
from shared.api_client import CliError
from shared.jobspec import JobSpecError, load_spec

app = typer.Typer(help="Federated jobs.", no_args_is_help=True)


@app.command("submit")
def jobs_submit(spec_file: Path, as_json: bool = JSON_OPT) -> None:
    """Validate a TOML job spec, submit it, and upload its reference data."""
    try:
        spec = load_spec(spec_file)
    except JobSpecError as err:  # reading and TOML errors already start with the file's name
        message = str(err)
        raise CliError(
            message if message.startswith(f"{spec_file}:") else f"{spec_file}: {message}"
        ) from None
    except UnicodeDecodeError as err:
        raise CliError(
            f"{spec_file}: not UTF-8 text: byte {err.object[err.start]:#04x} at offset {err.start}"
        ) from None
    reference = None
    if spec.evaluation.reference:
        ref = Path(spec.evaluation.reference)
        if not ref.is_absolute():
            ref = spec_file.parent / ref
        if not ref.is_file():
            raise CliError(f"{spec_file}: evaluation.reference: no such file {ref}")
        try:
            reference = ref.read_bytes()
        except OSError as err:
            raise CliError(f"{spec_file}: evaluation.reference: cannot read {ref}: {err.strerror}") from None
    api = client()
    job = api.json("POST", "/v1/jobs", json=spec.model_dump(mode="json"))
    if reference is not None:
        try:
            api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference)
        except CliError as err:
            api.request("POST", f"/v1/jobs/{job['id']}/cancel")
            raise CliError(f"job {job['id']} cancelled: {err}") from None
        job = api.json("GET", f"/v1/jobs/{job['id']}")  # as it is now, with its reference
    if as_json:
        return emit_json(job)
    print(f"submitted job {job['id']} ({job['name']})")
    for w in job.get("warnings", []):
        console.print(f"warning: {w}", style="yellow")


#: A job in the list; its name, chosen by whoever submitted it, wraps.
JOB_COLUMNS = (
    Column("id"),
    Column("name", wrap=True),
    Column("status"),
    Column("rounds"),
    Column("version", priority=1),
    Column("created", priority=2),
)


def job_row(j: dict[str, Any]) -> list[str]:
    """A job as the cells of :data:`JOB_COLUMNS`."""
    return [
        str(j["id"]),
        j["name"],
        j["status"],
        f"{j['rounds_completed']}/{j['rounds']}",
        fmt(j["current_version"]),
        str(j["created_at"])[:19],
    ]


@app.command("list")
def jobs_list(as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", "/v1/jobs")
    if as_json:
        return emit_json(rows)
    print_table(console, JOB_COLUMNS, [job_row(j) for j in rows])


@app.command("show")
def jobs_show(job_id: int, as_json: bool = JSON_OPT) -> None:
    j = client().json("GET", f"/v1/jobs/{job_id}")
    if as_json:
        return emit_json(j)
    spec = j["spec"]
    console.print(
        Text.assemble(
            (f"job {j['id']}", "bold"),
            f" {j['name']}  status={j['status']}" + (f"  ({j['reason']})" if j["reason"] else ""),
        )
    )
    model = spec["model"]
    what = (
        f"app {model['app']} {model.get('app_version') or ''}".rstrip()
        if model.get("app")
        else f"model {model['zoo']} {model['hidden']}"
    )
    console.print(
        f"rounds {j['rounds_completed']}/{j['rounds']}  model version {fmt(j['current_version'])}  "
        f"strategy {spec['strategy']['name']}  {what}  "
        f"cohort {spec['cohort']['minimum']}..{spec['cohort']['target']}"
    )
    m = j.get("latest_metrics") or {}
    console.print(f"central:   {metrics_text(m.get('central'))}")
    console.print(f"federated: {metrics_text(m.get('federated'))}")
    if j.get("latest_round"):
        r = j["latest_round"]
        console.print(
            f"latest round {r['number']} ({r['kind']}): {r['status']} stage={r['stage']}"
            + (f" reason: {r['reason']}" if r["reason"] else "")
        )
        for why, n in (r.get("declines") or {}).items():
            console.print(f"  declined by {n}: {why}")
    if j.get("privacy"):
        console.print(privacy_text(j["privacy"]))
    if j.get("waiting_for"):
        console.print(f"waiting for {j['waiting_for']}")
    if j.get("pretrain"):
        p = j["pretrain"]
        console.print(
            f"pretrain:  world size {p['world_size']}, {p['epochs']} epochs  "
            f"{metrics_text((p.get('metrics') or {}).get('central'))}"
        )
    if j.get("baseline"):
        b = j["baseline"]
        console.print(f"baseline:  {b['leader']} ({b['algorithm']})  {metrics_text(b['metrics'])}")
        console.print(f"federated model on the same rows: {metrics_text(m.get('central'))}")
    if j.get("audit"):
        a = j["audit"]
        done = a.get("latest_verdict")
        verdict = f"version {done['version']}: {done['verdict']}" if done else "no audit finished yet"
        console.print(f"audit:     {verdict}  (version {a['version']} {a['status']})")
    for w in j.get("warnings", []):
        console.print(f"warning: {w}", style="yellow")


def privacy_text(p: dict[str, Any]) -> str:
    """A job's differential privacy in one line: epsilon spent of the target, at delta, and whom it trusts."""
    trust = "  trusts the coordinator" if p.get("trusts_coordinator") else ""
    return (
        f"privacy:   {p['level']} level, epsilon {p['epsilon']:.4g} spent of {p['target_epsilon']:g}"
        f" at delta {p['delta']:g} over {p['rounds_spent']} rounds, noise multiplier"
        f" {fmt(p['noise_multiplier'], 4)}, clip {fmt(p['clip'], 4)}{trust}; sampling {p['sampling']}"
    )


@app.command("schema")
def jobs_schema() -> None:
    """Print the job spec reference (Markdown), generated from the schema."""
    from shared.jobspec import reference_markdown

    print(reference_markdown())


@app.command("cancel")
def jobs_cancel(job_id: int) -> None:
    j = client().json("POST", f"/v1/jobs/{job_id}/cancel")
    print(f"job {j['id']} {j['status']}")
