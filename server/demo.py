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
step did not run.
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
from shared import codec
from shared.api_client import ApiClient, CliError
from shared.apps import App, AppError, JobContext, LocalData, TrainConfig, load_app
from shared.datasets import load_dataset, natural_split, test_split
from shared.jobspec import JobSpec, validate_spec
from shared.tabular import Preprocessor, local_statistics
from shared.training import evaluate, train_local
from shared.zoo import architecture, build_model

DIGITS = "digits"
DIGITS_APP = "digits_cnn:app"
DIGITS_ALPHA = 0.5
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


class DemoError(Exception):
    """The demo could not run; the message says which step failed."""


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


def demo_spec(
    schema: dict[str, Any], *, rounds: int, devices: int, seed: int, reference: str
) -> dict[str, Any]:
    """The job the demo runs: an MLP, FedAvg, every device in every round."""
    return {
        "name": "demo",
        "rounds": rounds,
        "seed": seed,
        "data": schema,
        "model": {"zoo": "mlp", "hidden": [64, 32]},
        "cohort": {
            "target": devices,
            "minimum": max(2, (devices + 1) // 2),
            "stage_timeout": 120,
            "selection_timeout": 5,
        },
        "training": {
            "epochs": 2,
            "batch_size": 32,
            "learning_rate": 0.005,
            "optimizer": "adam",
            "holdout": 0.2,
        },
        "strategy": {"name": "fedavg"},
        "evaluation": {"reference": reference},
    }


def digits_spec(*, rounds: int, devices: int, seed: int, app_version: str, reference: str) -> dict[str, Any]:
    """The digits job: the example app's CNN, 2 local epochs of Adam at 0.002 per round, FedAvg with
    server momentum, every device in every round.

    Server momentum 0.5 (FedAvgM; Hsu, Qi and Brown 2019, who also propose the Dirichlet split)
    carries the mean update across rounds, which the label-skewed devices pull apart.
    """
    return {
        "name": "digits",
        "rounds": rounds,
        "seed": seed,
        "model": {"app": DIGITS_APP, "app_version": app_version},
        "cohort": {
            "target": devices,
            "minimum": max(2, (devices + 1) // 2),
            "stage_timeout": 120,
            "selection_timeout": 5,
        },
        "training": {
            "epochs": 2,
            "batch_size": 32,
            "learning_rate": 0.002,
            "optimizer": "adam",
            "holdout": 0.2,
        },
        "strategy": {"name": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.5},
        "evaluation": {"reference": reference},
    }


def digits_app() -> App:
    """The installed example app, or ``DemoError`` saying how to install it."""
    try:
        return load_app(DIGITS_APP)
    except AppError as err:
        raise DemoError(
            f"the digits demo needs the example app: pip install -e examples/digits_cnn ({err})"
        ) from None


def prepare_digits(devices: int, seed: int, out: Path, rounds: int, audit: bool = True) -> dict[str, Any]:
    """The digits on disk: ``devices/device-NN/data.npz`` (Dirichlet label skew, ``seed``),
    ``reference.npz`` (the stratified test images) and ``job.toml``."""
    import tomli_w

    app = digits_app()
    from digits_cnn.data import split, write_split

    try:
        data = split(devices, alpha=DIGITS_ALPHA, seed=seed)
    except ValueError as err:
        raise DemoError(f"--devices {devices}: {err}") from None
    except ImportError as err:
        raise DemoError(f"the digits split needs scikit-learn's bundled data: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    files, reference = write_split(data, out)
    spec_dict = digits_spec(
        rounds=rounds, devices=devices, seed=seed, app_version=app.version, reference=reference.name
    )
    spec_dict["audit"] = {"enabled": audit}
    validate_spec(spec_dict)
    (out / "job.toml").write_text(tomli_w.dumps(spec_dict))
    return {
        "rows": sum(len(labels) for _, labels in data.devices) + len(data.test[1]),
        "split": data,
        "parts": [labels for _, labels in data.devices],
        "test": data.test[1],
        "group": f"label skew, Dirichlet alpha={DIGITS_ALPHA}",
        "files": files,
        "reference": reference,
        "central": None,
        "spec": spec_dict,
    }


def prepare_data(
    dataset: str,
    devices: int,
    seed: int,
    out: Path,
    rounds: int = 10,
    central_share: float = 0.0,
    pretrained: bool = False,
    audit: bool = True,
) -> dict[str, Any]:
    """Split a bundled dataset into held-out test rows and one slice per device, on disk.

    Tabular sets: writes ``devices/device-NN/data.csv`` (one natural slice each),
    ``reference.csv`` (the test rows) and ``job.toml``; with ``central_share``,
    that share of the training rows is pooled in ``central.csv`` (the public or
    proxy data the central cluster pre-trains and runs AutoML on) and never
    reaches a device. ``digits``: see :func:`prepare_digits`. Returns what the
    caller needs: ``files``, ``parts`` and ``test`` (sized by ``len``),
    ``reference``, ``central``, ``spec``.
    """
    import tomli_w

    if dataset == DIGITS:
        return prepare_digits(devices, seed, out, rounds, audit=audit)
    try:
        df, schema, group = load_dataset(dataset)
    except ValueError as err:
        raise DemoError(str(err)) from None
    stratify = schema["target"] if schema["task"] != "regression" else None
    train_df, test_df = test_split(df, 0.2, seed, stratify_column=stratify)
    device_df, central_df = train_df, None
    if central_share > 0:
        device_df, central_df = test_split(train_df, central_share, seed + 1, stratify_column=stratify)
    try:
        parts = natural_split(device_df, group, devices, seed)
    except ValueError as err:
        raise DemoError(f"--devices {devices}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, part in enumerate(parts):
        d = out / "devices" / f"device-{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        part.to_csv(d / "data.csv", index=False)
        files.append(d / "data.csv")
    reference = out / "reference.csv"
    test_df.to_csv(reference, index=False)
    central = None
    if central_df is not None:
        central = out / "central.csv"
        central_df.to_csv(central, index=False)
    spec_dict = demo_spec(schema, rounds=rounds, devices=devices, seed=seed, reference="reference.csv")
    if pretrained:
        spec_dict["model"]["initial"] = "pretrained"
    if not audit:
        spec_dict["audit"] = {"enabled": False}
    validate_spec(spec_dict)
    (out / "job.toml").write_text(tomli_w.dumps(spec_dict))
    return {
        "rows": len(df),
        "df": df,
        "train": train_df,
        "test": test_df,
        "parts": parts,
        "group": group,
        "files": files,
        "reference": reference,
        "central": central,
        "spec": spec_dict,
        "schema": schema,
    }


def ceiling_metrics(spec: JobSpec, train_rows: Any, test_rows: Any, epochs: int) -> dict[str, float]:
    """The same architecture trained centrally on the pooled training rows."""
    schema = spec.tabular
    pre = Preprocessor.from_statistics(local_statistics(train_rows, schema), schema)
    model = build_model(architecture(spec.model, pre.input_dim, pre.output_dim), seed=spec.seed)
    x, y = pre.transform(train_rows)
    train_local(
        model,
        x,
        y,
        task=schema.task,
        epochs=epochs,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        seed=spec.seed,
        threads=2,
    )
    xt, yt = pre.transform(test_rows)
    return evaluate(model, xt, yt, task=schema.task, target_mean=pre.target_mean, target_std=pre.target_std)


def digits_ceiling(spec: JobSpec, data: Any, reference: bytes, epochs: int) -> dict[str, float]:
    """The same CNN, from the same seeded start, trained centrally on every device's images pooled
    (``data``: the demo's ``digits_cnn.data.Split``), measured on the same test images."""
    import torch
    from digits_cnn.cnn import Digits
    from digits_cnn.data import pixel_scale

    app = digits_app()
    job = JobContext(spec, {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # as the coordinator builds version 0
        model = app.build_model(job)
    images, labels = data.pooled
    pooled = Digits(images, labels, pixel_scale(images))
    config = TrainConfig(
        round=0,
        epochs=epochs,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        seed=spec.seed,
        threads=2,
    )
    app.train(model, LocalData(pooled, None, len(pooled), 0), config)
    metrics = app.evaluate_central(model, app.load_reference(reference, job), job)
    assert metrics is not None  # the digits app always evaluates centrally
    return {k: float(v) for k, v in metrics.items()}


def final_metrics(spec: JobSpec, header: dict[str, Any], vector: Any, reference: bytes) -> dict[str, float]:
    """A version's metrics on the test rows, computed as the coordinator's central evaluation
    computes them: by the job's app, on the reference bytes, under the version's signed setup."""
    app = load_app(spec.app_ref, spec.model.app_version)
    job = JobContext(spec, header.get("preprocess"))
    model = app.build_model(job)
    app.set_parameters(model, vector)
    metrics = app.evaluate_central(model, app.load_reference(reference, job), job)
    if metrics is None:
        raise DemoError(f"app {spec.app_ref} has no central evaluation to measure the final model with")
    return {k: float(v) for k, v in metrics.items()}


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


def headline(spec: JobSpec) -> str:
    """The metric a demo's final model is judged on next to its ceiling: ROC AUC for a tabular
    classifier, RMSE for a regression, accuracy for the digits app."""
    if spec.data is None:
        return "accuracy"
    return "rmse" if spec.data.task == "regression" else "auc"


@dataclass(frozen=True)
class Steps:
    """The steps beside the rounds that a demo runs, and why each of the others does not."""

    pretrain: bool
    automl: bool
    audit: bool
    skipped: dict[str, str]


def demo_steps(dataset: str, pretrain: bool | None, automl: bool | None, audit: bool | None) -> Steps:
    """Which steps run (``None``: the dataset's default) and why the others do not.

    A tabular set runs all three by default. Digits cannot run the cluster's two (they read a
    table schema), and audits only when asked: its audit worker explains a CNN with ten outputs for
    every version, which on a small machine takes longer than a round and competes with the agents
    for the same cores. A step asked for on a dataset that cannot run it is a ``DemoError``.
    """
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
        else:
            run[key] = True if asked is None else asked
            if not run[key]:
                skipped[key] = f"not asked for (--no-{flag})"
    default_off = NO_AUDIT_BY_DEFAULT.get(dataset)
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
    console: Console | None = None,
) -> dict[str, Any]:
    """The whole federation: coordinator, audit worker, agents; for a tabular set, optionally
    Horovod pre-training of version 0 and an H2O AutoML baseline on pooled central rows.

    ``rounds``, ``pretrain``, ``automl`` and ``audit`` default to the dataset's
    (:data:`DEFAULT_ROUNDS`, :func:`demo_steps`).
    """
    console = console or Console(markup=False)
    t_start = time.time()
    out = out.resolve()
    rounds = rounds if rounds is not None else DEFAULT_ROUNDS.get(dataset, 10)
    steps = demo_steps(dataset, pretrain, automl, audit)
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
    )
    parts, test = data["parts"], data["test"]
    reference = data["reference"]
    spec = validate_spec(data["spec"])
    console.print(
        f"aicfl demo: {dataset}, {data['rows']} rows; {devices} devices split by"
        f" {data['group']!r} ({', '.join(str(len(p)) for p in parts)} rows); {len(test)} test rows; {rounds} rounds"
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
        summary = _summary(api, job["id"], spec, dataset, devices, data, rounds, reference.read_bytes())
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


def _audit_summary(api: ApiClient, job_id: int, all_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per version: verdict, top features, drift; and how audit time compares with round time."""
    from datetime import datetime

    audits = api.json("GET", f"/v1/jobs/{job_id}/audits")
    rows = [
        {
            "version": a["version"],
            "verdict": a["verdict"] if a["status"] == "done" else a["status"],
            "top_features": a["top_features"],
            "rank_correlation_to_previous": a["rank_correlation_to_previous"],
            "seconds": a["seconds"],
        }
        for a in audits
    ]
    train = [r for r in all_rounds if r["kind"] == "train" and r["status"] == "completed"]

    def ts(v: str) -> float:
        return datetime.fromisoformat(v).timestamp()

    round_seconds = [ts(r["ended_at"]) - ts(r["started_at"]) for r in train]
    audit_seconds = [a["seconds"] for a in audits if a["seconds"] is not None]
    # An audit keeps up when the version a round made is audited before the next round ends.
    made_by = {r["model_version_out"]: i for i, r in enumerate(train)}
    on_time = total = 0
    for a in audits:
        i = made_by.get(a["version"])
        if i is None or i + 1 >= len(train) or a["status"] != "done":
            continue
        total += 1
        on_time += ts(a["updated_at"]) <= ts(train[i + 1]["ended_at"])
    mean_audit = sum(audit_seconds) / len(audit_seconds) if audit_seconds else None
    mean_round = sum(round_seconds) / len(round_seconds) if round_seconds else None
    timing = {
        "mean_audit_seconds": mean_audit,
        "mean_round_seconds": mean_round,
        "audit_to_round_ratio": mean_audit / mean_round if mean_audit and mean_round else None,
        "audited_before_next_round_ended": f"{on_time}/{total}",
    }
    return {"audits": rows, "audit_timing": timing}


def _summary(
    api: ApiClient,
    job_id: int,
    spec: JobSpec,
    dataset: str,
    devices: int,
    data: dict[str, Any],
    rounds: int,
    reference: bytes,
) -> dict[str, Any]:
    all_rounds = api.json("GET", f"/v1/jobs/{job_id}/rounds")
    versions = api.json("GET", f"/v1/jobs/{job_id}/models")
    last = versions[-1]
    blob = api.request("GET", f"/v1/jobs/{job_id}/models/{last['version']}/blob").content
    header, vec = codec.decode(blob)
    final = final_metrics(spec, header, vec, reference)
    # As many passes over the pooled rows as each device makes over its own in the whole job.
    epochs = max(10, rounds * spec.training.epochs)
    if dataset == DIGITS:
        ceiling = digits_ceiling(spec, data["split"], reference, epochs)
    else:
        ceiling = ceiling_metrics(spec, data["train"], data["test"], epochs=epochs)
    rss = [d["peak_rss_mb"] for d in api.json("GET", "/v1/devices") if d["peak_rss_mb"]]
    job = api.json("GET", f"/v1/jobs/{job_id}")
    pretrain = None
    if job.get("pretrain"):
        p = job["pretrain"]
        pretrain = {"world_size": p["world_size"], "epochs": p["epochs"], "metrics": p["metrics"]}
    baseline = None
    if job.get("baseline"):
        b = job["baseline"]
        baseline = {
            "leader": b["leader"],
            "algorithm": b["algorithm"],
            "metrics": b["metrics"],
            "federated_final": final,  # the same reference rows
        }
    return {
        "devices": devices,
        "dataset": dataset,
        "headline": headline(spec),
        "job_id": job_id,
        "secure": spec.secure,
        "rounds": [
            {
                "round": r["number"],
                "status": r["status"],
                "participants": r["participants"],
                "dropped": r["dropped"],
                "aggregation_seconds": r["aggregation_seconds"],
                "secure": bool((r["metrics"] or {}).get("secure")),
                "central": (r["metrics"] or {}).get("central", {}),
                "federated": (r["metrics"] or {}).get("federated", {}),
            }
            for r in all_rounds
            if r["kind"] == "train"
        ],
        "final": final,
        "ceiling": ceiling,
        "final_version": last["version"],
        "agent_peak_rss_mb": {"max": max(rss) if rss else None, "mean": sum(rss) / len(rss) if rss else None},
        "pretrain": pretrain,
        "baseline": baseline,
        **_audit_summary(api, job_id, all_rounds),
    }
