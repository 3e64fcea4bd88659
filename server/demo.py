"""``aicfl demo``: a whole federation on this machine, with real processes and real data.

A coordinator on a free loopback port with SQLite, N agent processes each
holding one slice of a real dataset, R rounds under SecAgg+, then the final
model and a centrally trained ceiling measured on the same held-out test rows.

Two datasets: ``mlc_churn`` (the built-in tabular app; one group of US states
per device; optionally Horovod pre-training and an H2O AutoML baseline on
pooled central rows), and ``digits`` (the example app ``digits_cnn`` from
``examples/digits_cnn``, a small CNN on scikit-learn's 8x8 digits, dealt to
devices with Dirichlet(0.5) label skew). The summary has the same fields for
both; its ``headline`` names the metric the final model is judged on next to
the ceiling (AUC for churn, accuracy for digits), and ``skipped`` says why a
step did not run. Beside ``summary.json``, ``learning_curve.png`` draws that
metric per round against the AutoML leader, version 0 and the ceiling.

On a tabular set ``--model gbdt`` trains gradient-boosted trees instead of the
MLP (docs/gbdt.md): the statistics round, the binning round (version 0), then
per boosting round one level round per tree level under SecAgg+, the last of
which registers the round's version with its central metrics. Its ceiling is
XGBoost's own ``hist`` on the devices' rows pooled; the AutoML baseline runs
beside it as beside the MLP, and the summary says whether the federated
ensemble beats the leader. There is no pre-training of trees (a gbdt job's
version 0 is its binning round's), so that step is skipped with the reason.

This module runs the demo (coordinator, agents, the cluster's steps); its parts live beside it:
``server.demo_data`` (the device slices, reference rows and job spec), ``server.demo_metrics``
(the final model's metrics and the central ceiling) and ``server.demo_summary`` (the summary).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from server.console import api_client, watch_job
from server.demo_data import (
    DIGITS,
    DIGITS_ALPHA,
    DIGITS_APP,
    GBDT,
    GBDT_SETTINGS,
    MLP,
    MODELS,
    check_model,
    demo_spec,
    digits_app,
    digits_spec,
    gbdt_spec,
    prepare_data,
    prepare_digits,
)
from server.demo_errors import DemoError
from server.demo_metrics import ceiling_metrics, digits_ceiling, final_metrics, headline
from server.demo_summary import summarize
from server.plots import CEILING, PlotError, draw, learning_curve, write_png
from shared.api_client import ApiClient, CliError
from shared.jobspec import JobSpecError, validate_spec

__all__ = [
    "DEFAULT_ROUNDS",
    "DIGITS",
    "DIGITS_ALPHA",
    "DIGITS_APP",
    "GBDT",
    "GBDT_SETTINGS",
    "LEARNING_CURVE",
    "MLP",
    "MODELS",
    "NO_AUDIT_BY_DEFAULT",
    "NO_CLUSTER_STEPS",
    "NO_PRETRAINED_TREES",
    "DemoError",
    "Steps",
    "ceiling_metrics",
    "demo_spec",
    "demo_steps",
    "digits_app",
    "digits_ceiling",
    "digits_spec",
    "final_metrics",
    "free_port",
    "gbdt_audit_refusal",
    "gbdt_spec",
    "headline",
    "prepare_data",
    "prepare_digits",
    "python_cmd",
    "run_demo",
    "wait_healthy",
]

#: The demo's learning curve, written beside summary.json.
LEARNING_CURVE = "learning_curve.png"
#: Rounds when ``--rounds`` is not given.
DEFAULT_ROUNDS = {DIGITS: 30}
#: Why a dataset cannot run the central cluster's steps (they read a [data] table schema).
NO_CLUSTER_STEPS = {
    DIGITS: (
        "the {step} reads the job's [data] table schema and a CSV/Parquet file"
        " (training_cluster/{module}.py); the digits job is an app job with neither"
    )
}
#: Why a dataset's job is not audited unless ``--audit`` asks for it.
NO_AUDIT_BY_DEFAULT = {
    DIGITS: (
        "off by default for digits: the SHAP audit of each CNN version takes longer than a round on a"
        " small machine and shares its cores with the agents; --audit runs the audit worker"
    )
}


#: Why a gbdt demo runs no Horovod pre-training.
NO_PRETRAINED_TREES = (
    "Horovod pre-training of version 0 does not apply to trees: a gbdt job's version 0 is the bin edges"
    " and base score of its binning round (the job spec refuses initial = 'pretrained' for zoo = 'gbdt')"
)
#: What the ceiling benchmark is, by model.
CEILING_DESCRIPTION = {
    MLP: "the same model trained centrally on every device's rows pooled, measured on the same test rows",
    GBDT: (
        "XGBoost's hist with the job's [gbdt] settings and rounds, trained centrally on every device's"
        " rows pooled, measured on the same test rows"
    ),
}


def _record_ceiling(api: ApiClient, job_id: int, ceiling: dict[str, float], model: str = MLP) -> None:
    """The ceiling as one of the job's benchmarks, which the dashboard and ``aicfl rounds plot`` draw."""
    api.json(
        "PUT",
        f"/v1/jobs/{job_id}/benchmarks/{CEILING}",
        json={
            "metrics": {k: v for k, v in ceiling.items() if k != "examples"},
            "description": CEILING_DESCRIPTION[model],
        },
    )


def _draw_learning_curve(api: ApiClient, job_id: int, path: Path, summary: dict[str, Any]) -> None:
    """The headline metric per round (a gbdt job's: per boosting round), centrally and on the
    devices, against the AutoML leader, the pre-trained version 0 and the ceiling, as a PNG."""
    job = api.json("GET", f"/v1/jobs/{job_id}")
    rounds = api.json("GET", f"/v1/jobs/{job_id}/rounds")
    write_png(draw(learning_curve(job, rounds, summary["headline"], summary["ceiling"])), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the coordinator exited with code {proc.returncode} while starting")
        try:
            if httpx.get(url + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"the coordinator did not answer at {url} within {timeout:.0f} s")


class _Processes:
    """The demo's child processes, stopped with SIGTERM whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        fh = open(log, "wb")  # noqa: SIM115 - the child owns it until it exits
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        fh.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass(frozen=True)
class Steps:
    """The steps beside the rounds that a demo runs, and why each of the others does not."""

    pretrain: bool
    automl: bool
    audit: bool
    skipped: dict[str, str]


def gbdt_audit_refusal() -> str | None:
    """Why the job spec refuses to audit a gbdt job, or ``None`` when it audits trees.

    The spec is the one place that knows whether the audit worker explains trees (docs/gbdt.md), so
    the demo asks it rather than keeping its own copy of the answer.
    """
    schema = {"target": "y", "task": "binary", "features": [{"name": "x", "type": "numeric"}]}
    spec = gbdt_spec(schema, rounds=1, devices=2, seed=0, reference="reference.csv")
    try:
        validate_spec({**spec, "audit": {"enabled": True}})
    except JobSpecError as err:
        return str(err)
    return None


def demo_steps(
    dataset: str,
    pretrain: bool | None,
    automl: bool | None,
    audit: bool | None,
    model: str = MLP,
) -> Steps:
    """Which steps run (``None``: the dataset's and model's default) and why the others do not.

    A tabular set runs all three by default. Digits cannot run the cluster's two (they read a
    table schema), and audits only when asked: its audit worker explains a CNN with ten outputs for
    every version, which on a small machine takes longer than a round and competes with the agents
    for the same cores. Trees (``model`` gbdt) have no pre-training (:data:`NO_PRETRAINED_TREES`)
    and are audited by default as the MLP is, as long as the job spec accepts an audit of trees
    (:func:`gbdt_audit_refusal`). A step asked for where it cannot run, or a model the dataset
    cannot train, is a ``DemoError``.
    """
    check_model(dataset, model)
    skipped: dict[str, str] = {}
    why = NO_CLUSTER_STEPS.get(dataset)
    run: dict[str, bool] = {}
    for key, (step, flag, asked) in {
        "pretrain": ("pre-training", "pretrain", pretrain),
        "baseline": ("AutoML baseline", "automl", automl),
    }.items():
        if why is not None:
            reason = why.format(step=step, module=flag)
            if asked:
                raise DemoError(f"--{flag} is not available for --dataset {dataset}: {reason}")
            skipped[key] = reason
            run[key] = False
        elif key == "pretrain" and model == GBDT:
            if asked:
                raise DemoError(f"--pretrain is not available for --model {GBDT}: {NO_PRETRAINED_TREES}")
            skipped[key] = NO_PRETRAINED_TREES
            run[key] = False
        else:
            run[key] = True if asked is None else asked
            if not run[key]:
                skipped[key] = f"not asked for (--no-{flag})"
    default_off = NO_AUDIT_BY_DEFAULT.get(dataset)
    if model == GBDT and audit is not False:
        refusal = gbdt_audit_refusal()
        if refusal is not None:
            if audit:
                raise DemoError(f"--audit is not available for --model {GBDT}: {refusal}")
            default_off = f"off for --model {GBDT} while the job spec refuses it: {refusal}"
    audits = audit if audit is not None else default_off is None
    if not audits:
        skipped["audits"] = default_off if audit is None and default_off else "not asked for (--no-audit)"
    return Steps(run["pretrain"], run["baseline"], audits, skipped)


def run_demo(
    *,
    devices: int,
    rounds: int | None = None,
    dataset: str,
    out: Path,
    seed: int = 7,
    pretrain: bool | None = None,
    automl: bool | None = None,
    audit: bool | None = None,
    automl_seconds: int = 30,
    pretrain_np: int = 2,
    pretrain_epochs: int = 10,
    central_share: float = 0.1,
    model: str = MLP,
    console: Console | None = None,
) -> dict[str, Any]:
    """The whole federation: coordinator, audit worker, agents; for a tabular set, optionally
    Horovod pre-training of version 0 (not for trees) and an H2O AutoML baseline on pooled central rows.

    ``model``: :data:`MLP` or :data:`GBDT` (a tabular set's; boosting rounds for ``rounds``).
    ``rounds``, ``pretrain``, ``automl`` and ``audit`` default to the dataset's and model's
    (:data:`DEFAULT_ROUNDS`, :func:`demo_steps`).
    """
    console = console or Console(markup=False)
    t_start = time.time()
    out = out.resolve()
    rounds = rounds if rounds is not None else DEFAULT_ROUNDS.get(dataset, 10)
    steps = demo_steps(dataset, pretrain, automl, audit, model)
    pretrain, automl, skipped = steps.pretrain, steps.automl, dict(steps.skipped)
    for sub in ("server", "devices", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if (out / "server" / "coordinator.db").exists():
        raise DemoError(f"{out} holds an earlier demo; pass another --out or remove it")
    data = prepare_data(
        dataset,
        devices,
        seed,
        out,
        rounds,
        central_share=central_share if (pretrain or automl) else 0.0,
        pretrained=pretrain,
        audit=steps.audit,
        model=model,
    )
    parts, test = data["parts"], data["test"]
    reference = data["reference"]
    spec = validate_spec(data["spec"])
    trained = (
        f"{rounds} boosting rounds of depth-{spec.gbdt.max_depth} trees"
        if model == GBDT
        else f"{rounds} rounds"
    )
    console.print(
        f"aicfl demo: {dataset}, {data['rows']} rows; {devices} devices split by"
        f" {data['group']!r} ({', '.join(str(len(p)) for p in parts)} rows); {len(test)} test rows; {trained}"
    )

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_dir = out / "server"
    boot = subprocess.run(
        python_cmd("server", "admin", "bootstrap", "--data-dir", str(server_dir)),
        capture_output=True,
        text=True,
        env=env,
    )
    if boot.returncode != 0:
        raise DemoError(f"admin bootstrap failed: {boot.stderr.strip()}")
    token = boot.stdout.strip()
    procs = _Processes()
    try:
        server = procs.start(
            python_cmd(
                "server",
                "server",
                "start",
                "--port",
                str(port),
                "--data-dir",
                str(server_dir),
                "--log-level",
                "warning",
            ),
            out / "logs" / "server.log",
            env,
        )
        wait_healthy(url, server)
        api = api_client(url, token)
        cluster_env = {**env, "AICFL_URL": url, "AICFL_TOKEN": token}
        audit_worker = None
        if spec.audit.enabled:
            audit_worker = procs.start(
                python_cmd("server", "audit", "worker", "--name", "demo-audit", "--poll", "0.5"),
                out / "logs" / "audit-worker.log",
                cluster_env,
            )
        tokens = api.json("POST", "/v1/enrollment-tokens", json={"count": devices, "ttl_seconds": 3600})[
            "tokens"
        ]
        homes = []
        enrolls = []
        for i, (data_file, tok) in enumerate(zip(data["files"], tokens, strict=True)):
            d = data_file.parent
            homes.append(d / "home")
            enrolls.append(
                subprocess.Popen(
                    python_cmd(
                        "client_agent",
                        "enroll",
                        "--coordinator",
                        url,
                        "--token",
                        tok,
                        "--data",
                        str(data_file),
                        "--home",
                        str(d / "home"),
                        "--name",
                        f"demo-{i:02d}",
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                )
            )
        for p in enrolls:
            _, stderr = p.communicate(timeout=120)
            if p.returncode != 0:
                raise DemoError(f"agent enrollment failed: {stderr.decode().strip()}")
        for i, home in enumerate(homes):
            procs.start(
                python_cmd("client_agent", "run", "--home", str(home)),
                out / "logs" / f"agent-{i:02d}.log",
                env,
            )
        job = api.json("POST", "/v1/jobs", json=spec.model_dump(mode="json"))
        job_id = str(job["id"])
        api.request("PUT", f"/v1/jobs/{job_id}/reference", content=reference.read_bytes())
        central = str(data["central"])
        automl_proc = None
        if automl:
            console.print(f"H2O AutoML on {central} ({automl_seconds} s budget), beside the rounds")
            automl_proc = procs.start(
                python_cmd(
                    "server", "cluster", "automl", "--job", job_id, "--data", central,
                    "--max-runtime-secs", str(automl_seconds), "--json",
                ),
                out / "logs" / "automl.log",
                cluster_env,
            )  # fmt: skip
        if pretrain:
            console.print(f"Horovod pre-training of version 0 on {central}: horovodrun -np {pretrain_np}")
            _run_step(
                python_cmd(
                    "server", "cluster", "pretrain", "--job", job_id, "--data", central,
                    "--np", str(pretrain_np), "--epochs", str(pretrain_epochs), "--json",
                ),
                out / "logs" / "pretrain.log",
                cluster_env,
                "pre-training",
                timeout=900,
            )  # fmt: skip
        final_job = watch_job(api, job["id"], interval=0.5, out=console)
        if final_job["status"] != "completed":
            raise DemoError(f"job {job_id} ended {final_job['status']}: {final_job['reason']}")
        if automl_proc is not None:
            _wait_step(automl_proc, out / "logs" / "automl.log", "AutoML", timeout=automl_seconds + 300)
        if audit_worker is not None:
            if spec.data is None:
                # An app job's audits are the app's and the worker's to do or to fail: the demo
                # reports what they recorded, and goes on without the ones still running.
                try:
                    _wait_for_audits(api, job["id"], audit_worker, timeout=120)
                except DemoError as err:
                    skipped["audits"] = f"{err}; the summary lists the audits recorded by then"
            else:
                _wait_for_audits(api, job["id"], audit_worker, timeout=600)
        summary = summarize(api, job["id"], spec, dataset, devices, data, rounds, reference.read_bytes())
        try:
            _record_ceiling(api, job["id"], summary["ceiling"], model)
        except CliError as err:
            skipped["ceiling_benchmark"] = f"the ceiling is not recorded with the job: {err}"
        try:
            _draw_learning_curve(api, job["id"], out / LEARNING_CURVE, summary)
            console.print(f"learning curve written to {out / LEARNING_CURVE}", soft_wrap=True)
        except PlotError as err:
            skipped["learning_curve"] = str(err)
    except CliError as err:
        raise DemoError(str(err)) from None
    finally:
        procs.stop()
    summary["skipped"] = skipped
    summary["seconds"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _run_step(cmd: list[str], log: Path, env: dict[str, str], what: str, timeout: float) -> None:
    """A cluster command that must succeed before the demo goes on."""
    with open(log, "wb") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(f"{what} did not finish within {timeout:.0f} s (see {log})") from None
    if proc.returncode != 0:
        raise DemoError(f"{what} failed: {_tail(log)}")


def _wait_step(proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DemoError(f"{what} did not finish within {timeout:.0f} s (see {log})") from None
    if proc.returncode != 0:
        raise DemoError(f"{what} failed: {_tail(log)}")


def _wait_for_audits(api: ApiClient, job_id: int, worker: subprocess.Popen[bytes], timeout: float) -> None:
    """Every version's audit done or failed (the worker runs beside the rounds; the last one may lag)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        versions = {v["version"] for v in api.json("GET", f"/v1/jobs/{job_id}/models")}
        audits = api.json("GET", f"/v1/jobs/{job_id}/audits")
        finished = {a["version"] for a in audits if a["status"] in ("done", "failed")}
        if versions <= finished:
            return
        if worker.poll() is not None:
            raise DemoError(f"the audit worker exited with code {worker.returncode}")
        time.sleep(0.5)
    raise DemoError(f"the audits of job {job_id} did not finish within {timeout:.0f} s")
