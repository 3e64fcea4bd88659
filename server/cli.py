"""``aicfl``: the operator CLI (typer + rich)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.api_client import ApiClient, CliError
from shared.jobspec import JobSpecError, load_spec, parse_duration

app = typer.Typer(help="Operate an aicfl federation.", no_args_is_help=True, pretty_exceptions_enable=False)
server_app = typer.Typer(help="Run the coordinator.", no_args_is_help=True)
admin_app = typer.Typer(help="Administration.", no_args_is_help=True)
devices_app = typer.Typer(help="Enrollment tokens and devices.", no_args_is_help=True)
jobs_app = typer.Typer(help="Federated jobs.", no_args_is_help=True)
rounds_app = typer.Typer(help="Rounds of a job.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
data_app = typer.Typer(help="Example data for trying a federation by hand.", no_args_is_help=True)
cluster_app = typer.Typer(
    help="The central cluster: Horovod pre-training and H2O AutoML baselines.", no_args_is_help=True
)
audit_app = typer.Typer(help="SHAP audits of model versions.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(admin_app, name="admin")
app.add_typer(devices_app, name="devices")
app.add_typer(jobs_app, name="jobs")
app.add_typer(rounds_app, name="rounds")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(cluster_app, name="cluster")
app.add_typer(audit_app, name="audit")

console = Console()
_state: dict[str, Any] = {}

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")

# How long the coordinator keeps an idle connection open. Agents drop theirs
# sooner (client_agent.transport.KEEPALIVE_SECONDS), so neither side sends on a
# connection the other is closing.
SERVER_KEEPALIVE_SECONDS = 5


@app.callback()
def _main(
    url: str = typer.Option("http://127.0.0.1:8080", envvar="AICFL_URL", help="Coordinator URL."),
    token: str | None = typer.Option(None, envvar="AICFL_TOKEN", help="Operator token."),
    ca_cert: Path | None = typer.Option(
        None, envvar="AICFL_CA_CERT", help="CA bundle for a TLS coordinator."
    ),
) -> None:
    _state.update(url=url, token=token, ca_cert=ca_cert)


def client() -> ApiClient:
    ca = _state.get("ca_cert")
    return ApiClient(_state["url"], _state.get("token"), verify=str(ca) if ca else True)


def cluster_api() -> Any:
    """The coordinator API as the training cluster uses it (same URL, token and CA as the CLI)."""
    from training_cluster.api import ClusterApi

    return ClusterApi(client())


def _with_cluster_api(run: Any, quiet: bool) -> Any:
    """Run a cluster command against the coordinator API; its progress lines go to the console unless quiet."""
    api = cluster_api()
    try:
        return run(api, lambda line: None if quiet else console.print(line))
    finally:
        api.close()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _metrics_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k}={_fmt(v)}" for k, v in m.items() if k != "examples")


# -- server ---------------------------------------------------------------


@server_app.command("start")
def server_start(
    db: str | None = typer.Option(
        None, "--db", envvar="AICFL_DB", help="Database URL (default: SQLite under --data-dir)."
    ),
    data_dir: Path = typer.Option(
        Path("aicfl-data"), "--data-dir", envvar="AICFL_DATA_DIR", help="Blobs, keys and the SQLite file."
    ),
    host: str = typer.Option("127.0.0.1", "--host", envvar="AICFL_HOST"),
    port: int = typer.Option(8080, "--port", envvar="AICFL_PORT"),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", envvar="AICFL_TLS_CERT", help="PEM certificate; enables HTTPS with --tls-key."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", envvar="AICFL_TLS_KEY"),
    signing_key: Path | None = typer.Option(
        None,
        "--signing-key",
        envvar="AICFL_SIGNING_KEY_FILE",
        help="Model-signing key (PEM); replicas must share one.",
    ),
    log_level: str = typer.Option("info", "--log-level", envvar="AICFL_LOG_LEVEL"),
    with_audit_worker: bool = typer.Option(
        False,
        "--with-audit-worker",
        envvar="AICFL_WITH_AUDIT_WORKER",
        help="Also run a SHAP audit worker process beside the server (needs an admin token: AICFL_TOKEN).",
    ),
) -> None:
    """Start the coordinator API (migrations are applied first)."""
    import logging

    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    if (tls_cert is None) != (tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    for f in (tls_cert, tls_key):
        if f is not None and not f.is_file():
            raise CliError(f"{f}: no such file")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        db=db,
        data_dir=data_dir,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        log_level=log_level,
    )
    try:
        application = create_app(settings)
    except Exception as err:  # noqa: BLE001 - a bad URL or unreachable database: one line
        raise CliError(f"cannot start the coordinator: {err}") from None
    worker = _start_audit_worker(host, port, tls_cert is not None) if with_audit_worker else None
    try:
        uvicorn.run(
            application,
            host=host,
            port=port,
            log_level=log_level,
            timeout_keep_alive=SERVER_KEEPALIVE_SECONDS,
            ssl_certfile=str(tls_cert) if tls_cert else None,
            ssl_keyfile=str(tls_key) if tls_key else None,
        )
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it had its chance to finish its audit
                worker.kill()


def _start_audit_worker(host: str, port: int, tls: bool) -> Any:
    """``aicfl audit worker`` as a child process that talks to this server over its API."""
    import os
    import subprocess

    token = _state.get("token") or os.environ.get("AICFL_TOKEN")
    if not token:
        raise CliError(
            "--with-audit-worker needs an admin token for the worker (set AICFL_TOKEN or pass --token)"
        )
    connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    env = {
        **os.environ,
        "AICFL_URL": f"{'https' if tls else 'http'}://{connect}:{port}",
        "AICFL_TOKEN": token,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "server", "audit", "worker", "--wait-for-server", "60", "--exit-with-parent"],
        env=env,
    )


# -- admin ----------------------------------------------------------------


@admin_app.command("bootstrap")
def admin_bootstrap(
    db: str | None = typer.Option(None, "--db", envvar="AICFL_DB"),
    data_dir: Path = typer.Option(Path("aicfl-data"), "--data-dir", envvar="AICFL_DATA_DIR"),
    name: str = typer.Option("admin", "--name"),
) -> None:
    """Print the first admin token (refused once an admin exists). Works on the database directly."""
    from coordinator import auth
    from coordinator.errors import CoordinatorError
    from coordinator.store import make_engine, migrate, session_factory, transaction
    from server.settings import ServerSettings

    settings = ServerSettings(db=db, data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        engine = make_engine(settings.database_url())
        migrate(engine)
        with transaction(session_factory(engine)) as s:
            token = auth.bootstrap_admin(s, name)
    except CoordinatorError as err:
        raise CliError(err.detail) from None
    except Exception as err:  # noqa: BLE001
        raise CliError(f"cannot open the database: {err}") from None
    print(token)


@admin_app.command("token")
def admin_token(
    name: str = typer.Argument(...), role: str = typer.Option("viewer", "--role", help="admin or viewer")
) -> None:
    """Make another operator token."""
    out = client().json("POST", "/v1/operators", json={"name": name, "role": role})
    print(out["token"])


# -- devices --------------------------------------------------------------


@devices_app.command("token")
def devices_token(
    count: int = typer.Option(1, "--count", min=1, max=10_000),
    ttl: str = typer.Option("1h", "--ttl", help="Lifetime, e.g. 30m, 1h, 7d."),
    as_json: bool = JSON_OPT,
) -> None:
    """One-time enrollment tokens for devices."""
    try:
        seconds = parse_duration(ttl)
    except ValueError as err:
        raise CliError(f"--ttl: {err}") from None
    out = client().json("POST", "/v1/enrollment-tokens", json={"count": count, "ttl_seconds": seconds})
    if as_json:
        emit_json(out)
    else:
        for t in out["tokens"]:
            print(t)


@devices_app.command("list")
def devices_list(as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", "/v1/devices")
    if as_json:
        return emit_json(rows)
    table = Table("id", "name", "online", "last seen", "agent", "peak RSS (MB)", "revoked")
    now = time.time()
    for d in rows:
        seen = f"{now - d['last_seen']:.0f}s ago" if d["last_seen"] else "never"
        table.add_row(
            d["id"],
            d["name"],
            "yes" if d["online"] else "no",
            seen,
            d["agent_version"],
            _fmt(d["peak_rss_mb"]),
            _fmt(d["revoked_at"]),
        )
    console.print(table)


@devices_app.command("revoke")
def devices_revoke(device_id: str) -> None:
    """Revoke a device; its requests are refused from now on."""
    d = client().json("POST", f"/v1/devices/{device_id}/revoke")
    print(f"revoked {d['id']}")


# -- jobs -----------------------------------------------------------------


@jobs_app.command("submit")
def jobs_submit(spec_file: Path, as_json: bool = JSON_OPT) -> None:
    """Validate a TOML job spec, submit it, and upload its reference data."""
    try:
        spec = load_spec(spec_file)
    except JobSpecError as err:
        raise CliError(f"{spec_file}: {err}") from None
    reference = None
    if spec.evaluation.reference:
        ref = Path(spec.evaluation.reference)
        if not ref.is_absolute():
            ref = spec_file.parent / ref
        if not ref.is_file():
            raise CliError(f"{spec_file}: evaluation.reference: no such file {ref}")
        reference = ref.read_bytes()
    api = client()
    job = api.json("POST", "/v1/jobs", json=spec.model_dump(mode="json"))
    if reference is not None:
        try:
            api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference)
        except CliError as err:
            api.request("POST", f"/v1/jobs/{job['id']}/cancel")
            raise CliError(f"job {job['id']} cancelled: {err}") from None
    if as_json:
        return emit_json(job)
    print(f"submitted job {job['id']} ({job['name']})")
    for w in job.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


@jobs_app.command("list")
def jobs_list(as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", "/v1/jobs")
    if as_json:
        return emit_json(rows)
    table = Table("id", "name", "status", "rounds", "version", "created")
    for j in rows:
        table.add_row(
            str(j["id"]),
            j["name"],
            j["status"],
            f"{j['rounds_completed']}/{j['rounds']}",
            _fmt(j["current_version"]),
            str(j["created_at"])[:19],
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, as_json: bool = JSON_OPT) -> None:
    j = client().json("GET", f"/v1/jobs/{job_id}")
    if as_json:
        return emit_json(j)
    spec = j["spec"]
    console.print(
        f"[bold]job {j['id']}[/] {j['name']}  status={j['status']}"
        + (f"  ({j['reason']})" if j["reason"] else "")
    )
    console.print(
        f"rounds {j['rounds_completed']}/{j['rounds']}  model version {_fmt(j['current_version'])}  "
        f"strategy {spec['strategy']['name']}  model {spec['model']['zoo']} {spec['model']['hidden']}  "
        f"cohort {spec['cohort']['minimum']}..{spec['cohort']['target']}"
    )
    m = j.get("latest_metrics") or {}
    console.print(f"central:   {_metrics_text(m.get('central'))}")
    console.print(f"federated: {_metrics_text(m.get('federated'))}")
    if j.get("latest_round"):
        r = j["latest_round"]
        console.print(
            f"latest round {r['number']} ({r['kind']}): {r['status']} stage={r['stage']}"
            + (f" reason: {r['reason']}" if r["reason"] else "")
        )
    if j.get("waiting_for"):
        console.print(f"waiting for {j['waiting_for']}")
    if j.get("pretrain"):
        p = j["pretrain"]
        console.print(
            f"pretrain:  world size {p['world_size']}, {p['epochs']} epochs  "
            f"{_metrics_text((p.get('metrics') or {}).get('central'))}"
        )
    if j.get("baseline"):
        b = j["baseline"]
        console.print(f"baseline:  {b['leader']} ({b['algorithm']})  {_metrics_text(b['metrics'])}")
        console.print(f"federated model on the same rows: {_metrics_text(m.get('central'))}")
    if j.get("audit"):
        a = j["audit"]
        done = a.get("latest_verdict")
        verdict = f"version {done['version']}: {done['verdict']}" if done else "no audit finished yet"
        console.print(f"audit:     {verdict}  (version {a['version']} {a['status']})")
    for w in j.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")


@jobs_app.command("schema")
def jobs_schema() -> None:
    """Print the job spec reference (Markdown), generated from the schema."""
    from shared.jobspec import reference_markdown

    print(reference_markdown())


@jobs_app.command("cancel")
def jobs_cancel(job_id: int) -> None:
    j = client().json("POST", f"/v1/jobs/{job_id}/cancel")
    print(f"job {j['id']} {j['status']}")


# -- rounds ---------------------------------------------------------------


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
            _fmt(r["aggregation_seconds"], 3),
            _metrics_text(m.get("central")),
            _metrics_text(m.get("federated")),
            r["reason"] or "",
        )
    return table


@rounds_app.command("list")
def rounds_list(job_id: int, as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", f"/v1/jobs/{job_id}/rounds")
    if as_json:
        return emit_json(rows)
    console.print(_rounds_table(rows))


@rounds_app.command("show")
def rounds_show(job_id: int, number: int, as_json: bool = JSON_OPT) -> None:
    r = client().json("GET", f"/v1/jobs/{job_id}/rounds/{number}")
    if as_json:
        return emit_json(r)
    console.print(_rounds_table([r]))
    table = Table("device", "status", "stage done", "examples", "reason")
    for p in r["devices"]:
        table.add_row(
            p["device_id"], p["status"], p["stage_done"] or "-", _fmt(p["num_examples"]), p["reason"] or ""
        )
    console.print(table)


def watch_job(
    api: ApiClient, job_id: int, interval: float = 1.0, out: Console | None = None
) -> dict[str, Any]:
    """Live progress of a job until it ends; returns the final job."""
    out = out or console
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
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
                + _metrics_text(m)
            )
            progress.update(task, completed=job["rounds_completed"], info=info)
            if job["status"] not in ("running", "pending"):
                return job  # type: ignore[no-any-return]
            time.sleep(interval)


@rounds_app.command("watch")
def rounds_watch(job_id: int, interval: float = typer.Option(1.0, "--interval")) -> None:
    """Follow a job's rounds live until it ends."""
    job = watch_job(client(), job_id, interval)
    console.print(f"job {job_id} {job['status']}" + (f": {job['reason']}" if job["reason"] else ""))


# -- models ---------------------------------------------------------------


@models_app.command("list")
def models_list(job_id: int, as_json: bool = JSON_OPT) -> None:
    rows = client().json("GET", f"/v1/jobs/{job_id}/models")
    if as_json:
        return emit_json(rows)
    table = Table("version", "parent", "round", "sha256", "params", "central", "federated", "source")
    for v in rows:
        m = v["metrics"]
        table.add_row(
            str(v["version"]),
            _fmt(v["parent"]),
            _fmt(v["round_number"]),
            v["sha256"][:12],
            str(v["num_parameters"]),
            _metrics_text(m.get("central")),
            _metrics_text(m.get("federated")),
            v["provenance"].get("source", ""),
        )
    console.print(table)


@models_app.command("export")
def models_export(
    job_id: int,
    version: int | None = typer.Option(None, "--version", help="Default: the newest."),
    fmt: str = typer.Option("state_dict", "--format", help="state_dict, torchscript or onnx"),
    out: Path | None = typer.Option(None, "--out", help="Output file."),
) -> None:
    """Export a model version."""
    if fmt not in ("state_dict", "torchscript", "onnx"):
        raise CliError(f"--format must be state_dict, torchscript or onnx; got {fmt!r}")
    api = client()
    if version is None:
        versions = api.json("GET", f"/v1/jobs/{job_id}/models")
        if not versions:
            raise CliError(f"job {job_id} has no model version yet")
        version = versions[-1]["version"]
    data = api.request("GET", f"/v1/jobs/{job_id}/models/{version}/export", params={"format": fmt}).content
    ext = {"state_dict": "pt", "torchscript": "ts.pt", "onnx": "onnx"}[fmt]
    target = out or Path(f"job{job_id}-v{version}.{ext}")
    target.write_bytes(data)
    print(f"wrote {target} ({len(data)} bytes, version {version}, {fmt})")


# -- data -----------------------------------------------------------------


@data_app.command("split")
def data_split(
    out: Path = typer.Option(..., "--out", help="Folder for the device files, reference.csv and job.toml."),
    dataset: str = typer.Option("mlc_churn", "--dataset"),
    devices: int = typer.Option(4, "--devices", min=1, max=1000),
    rounds: int = typer.Option(10, "--rounds", min=1),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Split a bundled dataset naturally across devices, with test rows and a job spec to submit."""
    from server.demo import DemoError, prepare_data

    try:
        data = prepare_data(dataset, devices, seed, out, rounds)
    except DemoError as err:
        raise CliError(str(err)) from None
    for f, part in zip(data["files"], data["parts"], strict=True):
        print(f"{f}  {len(part)} rows")
    print(f"{data['reference']}  {len(data['test'])} test rows")
    print(f"{out / 'job.toml'}")


# -- simulate -------------------------------------------------------------


@app.command("simulate")
def simulate_cmd(
    devices: int = typer.Option(10, "--devices", min=2, max=10_000),
    params: int = typer.Option(100_000, "--params", min=10, max=50_000_000),
    dropout: float = typer.Option(0.0, "--dropout", min=0.0, max=0.9, help="Share of devices that drop out."),
    drop_after: str = typer.Option(
        "masked_input", "--drop-after", help="configure, advertise_keys, share_keys or masked_input"
    ),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One SecAgg+ round of the real coordinator and device code in one process, without HTTP."""
    from server.simulate import SimulationError, simulate

    try:
        out = simulate(devices=devices, params=params, dropout=dropout, drop_after=drop_after, seed=seed)
    except SimulationError as err:
        raise CliError(str(err)) from None
    if as_json:
        print(json.dumps(out))
        return
    for key, value in out.items():
        console.print(f"{key:26} {_fmt(value, 5)}")


# -- the training cluster ---------------------------------------------------


@cluster_app.command("pretrain")
def cluster_pretrain(
    job: int = typer.Option(..., "--job", help="The job whose version 0 to pre-train."),
    data: Path = typer.Option(..., "--data", help="Central (public or proxy) data, CSV or Parquet."),
    np_: int = typer.Option(2, "--np", min=1, max=1024, help="Horovod processes (horovodrun -np)."),
    epochs: int = typer.Option(5, "--epochs", min=1, max=10_000),
    gpus: bool = typer.Option(False, "--gpus", help="One GPU per rank, NCCL (default: CPU, Gloo)."),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Per rank; default: the job's."),
    learning_rate: float | None = typer.Option(
        None, "--learning-rate", min=0.0, help="Base rate before scaling by the world size."
    ),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 compression of the allreduced gradients."),
    wait: float = typer.Option(
        600.0, "--wait", min=0.0, help="Seconds to wait for the job's statistics round (its preprocessing)."
    ),
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        help="Shards and checkpoints here (shared by the ranks' hosts); default: a temporary folder.",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Horovod data-parallel pre-training of the job's network; uploaded as its version 0."""
    from training_cluster.pretrain import pretrain

    out = _with_cluster_api(
        lambda api, log: pretrain(
            api,
            job,
            data,
            np=np_,
            epochs=epochs,
            gpus=gpus,
            batch_size=batch_size,
            learning_rate=learning_rate,
            fp16=fp16,
            wait=wait,
            workdir=workdir,
            log=log,
        ),
        as_json,
    )
    if as_json:
        return emit_json(out)
    console.print(
        f"version 0 of job {job}: world size {out['world_size']}, {out['epochs']} epochs, "
        f"{out['samples_per_second']:.0f} samples/s  {_metrics_text(out['metrics'].get('central') or out['metrics'])}"
    )


@cluster_app.command("automl")
def cluster_automl(
    job: int = typer.Option(..., "--job", help="The job to measure a baseline for."),
    data: Path = typer.Option(..., "--data", help="Central (public or proxy) data, CSV or Parquet."),
    max_runtime_secs: int = typer.Option(60, "--max-runtime-secs", min=5, max=86_400),
    h2o_url: str | None = typer.Option(
        None,
        "--h2o-url",
        envvar="AICFL_H2O_URL",
        help="An existing H2O cluster (default: start a local JVM).",
    ),
    seed: int = typer.Option(1, "--seed"),
    max_models: int | None = typer.Option(None, "--max-models", min=1),
    as_json: bool = JSON_OPT,
) -> None:
    """H2O AutoML on the central data; the leader, measured on the job's reference rows, is its baseline."""
    from training_cluster.automl import automl

    out = _with_cluster_api(
        lambda api, log: automl(
            api,
            job,
            data,
            max_runtime_secs=max_runtime_secs,
            h2o_url=h2o_url,
            seed=seed,
            max_models=max_models,
            log=log,
        ),
        as_json,
    )
    if as_json:
        return emit_json(out)
    console.print(
        f"baseline of job {job}: {out['leader']} ({out.get('algorithm', '')})  {_metrics_text(out['metrics'])}"
    )


# -- audits ---------------------------------------------------------------


@audit_app.command("worker")
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


@audit_app.command("show")
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
        f"[bold]audit of job {job_id} version {version}[/]  status={a['status']}  verdict={_fmt(a['verdict'])}"
        f"  attempts={a['attempts']}  seconds={_fmt(a['seconds'], 3)}"
    )
    if a.get("error") and a["status"] != "done":
        console.print(f"last error: {a['error']}")
    if r:
        drift = r.get("drift") or {}
        console.print(f"explainer {r.get('explainer')} on {r.get('rows')} rows; output: {r.get('output')}")
        console.print(f"top features: {', '.join(r.get('top_features') or [])}")
        console.print(
            f"additivity max error {_fmt(r.get('additivity_max_error'), 3)}; "
            f"validation {_metrics_text(r.get('validation'))}"
        )
        console.print(
            f"vs version {_fmt(r.get('previous_version'))}: rank correlation {_fmt(drift.get('rank_correlation'), 3)}"
            + "".join(
                f"; {x['feature']} {x['share_before']:.2f}->{x['share_after']:.2f}"
                for x in drift.get("shifted", [])
            )
        )
        if r.get("baseline"):
            console.print(f"vs AutoML leader: {_metrics_text(r['baseline'])}")
        importance = r.get("importance") or {}
        table = Table("feature", "mean |SHAP|", "share")
        for feat, value in sorted(importance.items(), key=lambda kv: -kv[1])[:15]:
            table.add_row(feat, _fmt(value, 4), _fmt((r.get("shares") or {}).get(feat), 3))
        console.print(table)
        for reason in r.get("reasons") or []:
            console.print(f"[yellow]{reason}[/]")
    for w in written:
        console.print(f"wrote {w}")


# -- demo -----------------------------------------------------------------


@app.command("demo")
def demo(
    devices: int = typer.Option(6, "--devices", min=2, max=64),
    rounds: int = typer.Option(10, "--rounds", min=1, max=1000),
    dataset: str = typer.Option("mlc_churn", "--dataset"),
    out: Path = typer.Option(Path("demo-out"), "--out"),
    seed: int = typer.Option(7, "--seed"),
    pretrain: bool = typer.Option(
        True, "--pretrain/--no-pretrain", help="Horovod pre-training of version 0 on pooled central rows."
    ),
    automl: bool = typer.Option(
        True, "--automl/--no-automl", help="An H2O AutoML baseline on the central rows."
    ),
    automl_secs: int = typer.Option(30, "--automl-secs", min=5, max=3600, help="AutoML's time budget."),
    pretrain_np: int = typer.Option(2, "--pretrain-np", min=1, max=64),
    pretrain_epochs: int = typer.Option(10, "--pretrain-epochs", min=1, max=1000),
    central_share: float = typer.Option(
        0.1,
        "--central-share",
        min=0.01,
        max=0.9,
        help="Share of the training rows pooled as central (public/proxy) data; no device holds them.",
    ),
) -> None:
    """Run a whole federation on this machine: server, real agent processes, a real dataset."""
    from server.demo import DemoError, run_demo

    try:
        summary = run_demo(
            devices=devices,
            rounds=rounds,
            dataset=dataset,
            out=out,
            seed=seed,
            pretrain=pretrain,
            automl=automl,
            automl_seconds=automl_secs,
            pretrain_np=pretrain_np,
            pretrain_epochs=pretrain_epochs,
            central_share=central_share,
            console=console,
        )
    except DemoError as err:
        raise CliError(str(err)) from None
    console.print(f"summary written to {out / 'summary.json'}")
    final, ceiling = summary["final"], summary["ceiling"]
    console.print(f"final:   {_metrics_text(final)}")
    console.print(f"ceiling: {_metrics_text(ceiling)}")
    if summary.get("baseline"):
        b = summary["baseline"]
        console.print(f"AutoML:  {b['leader']}  {_metrics_text(b['metrics'])}")
    if summary.get("pretrain"):
        console.print(
            f"version 0 pre-trained: {_metrics_text(summary['pretrain']['metrics'].get('central'))}"
        )
    verdicts = [a["verdict"] for a in summary.get("audits", [])]
    if verdicts:
        console.print(
            f"audits:  {len(verdicts)} versions, {verdicts.count('ok')} ok, {verdicts.count('drift')} drift"
        )


def main() -> None:
    try:
        app()
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
