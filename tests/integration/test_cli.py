"""What an operator sees from ``aicfl``: every command, run through the entry point in this process.

Each command goes through ``server.cli.main``, the ``aicfl`` console script itself, so a failure is
checked as the operator meets it: one ``error:`` line on stderr, no traceback, a non-zero exit. The
commands that talk to a coordinator share one real coordinator on a free loopback port, which runs
one small job (two devices, two rounds) to its end with real agent processes; the values the tables
and the ``--json`` output show are checked against that job.
"""

from __future__ import annotations

import io
import json
import re
import signal
import struct
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import tomli_w
import torch
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.cli import main
from server.cli.rounds import ROUND_COLUMNS
from server.demo import free_port
from server.tables import left_out_note
from shared import codec
from shared.datasets import load_dataset
from shared.jobspec import load_spec
from shared.signing import b64e, public_key_bytes, save_private_key, sha256_hex
from shared.zoo import build_model, flatten_parameters, load_flat_parameters

from .harness import ENV, Coordinator, churn_slices, py, self_signed_certificate, small_spec

ROOT = Path(__file__).resolve().parents[2]
JOB_NAME = "cli-churn"
ROUNDS = 2
BASELINE_LEADER = "GBM_cli_1"


@dataclass
class Shown:
    """What one ``aicfl`` run showed: its exit status, stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def aicfl(*args: str, env: dict[str, str | None] | None = None) -> Shown:
    """Run ``aicfl ARGS`` through its entry point in this process, in a 250-column terminal.

    ``env`` overrides the environment (None removes a variable); AICFL_URL and AICFL_TOKEN are
    removed unless given, so nothing of the test process's environment reaches the command.
    """
    argv = sys.argv
    sys.argv = ["aicfl", *args]
    code: int | str | None = 0
    try:
        with CliRunner().isolation(
            env={"COLUMNS": "250", "AICFL_URL": None, "AICFL_TOKEN": None, **(env or {})}
        ) as (out, err, _):
            try:
                main()
            except SystemExit as ended:
                code = ended.code
            sys.stdout.flush()
            sys.stderr.flush()
            shown = Shown(0 if code is None else int(code), out.getvalue().decode(), err.getvalue().decode())
    finally:
        sys.argv = argv
    return shown


def aicfl_keeping_signals(*args: str, env: dict[str, str | None] | None = None) -> Shown:
    """``aicfl ARGS`` for ``audit worker``, which installs SIGTERM and SIGINT handlers for its stop flag:
    this process gets its own back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return aicfl(*args, env=env)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def assert_one_error_line(shown: Shown, *fragments: str, code: int = 1, blank_out: bool = False) -> str:
    """The operator got one ``error:`` line on stderr naming ``fragments``, nothing on stdout, exit ``code``.

    ``blank_out``: stdout may hold blank lines (a progress display closed by the error).
    """
    assert shown.code == code, shown
    assert (shown.out.strip() if blank_out else shown.out) == "", shown
    assert shown.err.startswith("error: ") and shown.err.endswith("\n"), shown
    assert shown.err.count("\n") == 1 and "Traceback" not in shown.err, shown
    for f in fragments:
        assert f in shown.err, shown
    return shown.err.strip()


def tables(out: str) -> list[list[dict[str, str]]]:
    """The tables in ``out``, each a list of rows keyed by column header (rich draws ┃ in headers, │ in rows).

    A row that wraps over several lines is ruled off (├) from the next; its lines after the first
    leave the first column blank. Its cells are its lines joined by a space.
    """
    found: list[list[dict[str, str]]] = []
    headers: list[str] = []
    new_row = True
    for line in out.splitlines():
        if line.startswith("┃"):
            headers = [c.strip() for c in line.strip("┃").split("┃")]
            found.append([])
        elif line.startswith(("├", "┡")):
            new_row = True
        elif line.startswith("│") and found:
            cells = dict(zip(headers, (c.strip() for c in line.strip("│").split("│")), strict=True))
            if new_row or cells[headers[0]] or not found[-1]:
                found[-1].append(cells)
            else:
                last = found[-1][-1]
                for h, c in cells.items():
                    last[h] = f"{last[h]} {c}".strip()
            new_row = False
    return found


def only_table(out: str) -> list[dict[str, str]]:
    (table,) = tables(out)
    return table


# -- one coordinator with one finished job ------------------------------------------------------


@dataclass
class FinishedJob:
    """The shared coordinator, its job, the job's data schema, the agents' data files and devices."""

    coord: Coordinator
    job_id: int
    schema: dict[str, Any]
    data: list[Path]
    agents: dict[str, str]  # device id -> name

    @property
    def env(self) -> dict[str, str | None]:
        """The operator's environment: the coordinator's URL and the admin token."""
        return {"AICFL_URL": self.coord.url, "AICFL_TOKEN": self.coord.token}

    def run(self, *args: str) -> Shown:
        """``aicfl ARGS`` as the admin."""
        return aicfl(*args, env=self.env)

    def api_json(self, path: str) -> Any:
        return self.coord.api().json("GET", path)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedJob]:
    """A coordinator, two agents and a job with reference rows and an AutoML baseline, left running."""
    root = tmp_path_factory.mktemp("cli")
    coord = Coordinator(root)
    coord.bootstrap()
    coord.start()
    try:
        paths, reference, schema = churn_slices(root / "data", 2)
        homes = [coord.enroll(p, f"a{i}") for i, p in enumerate(paths)]
        spec = small_spec(schema, rounds=ROUNDS, target=2, minimum=2, secure=False, name=JOB_NAME)
        spec["audit"] = {"rows": 60, "background": 20, "validate_rows": 0}
        api = coord.api()
        job_id = int(api.json("POST", "/v1/jobs", json=spec)["id"])
        api.request("PUT", f"/v1/jobs/{job_id}/reference", content=reference.read_bytes())
        # The baseline as `aicfl cluster automl` uploads it, so that `jobs show` and the audits compare with it.
        features = {f["name"]: float(i + 1) for i, f in enumerate(schema["features"])}
        api.json(
            "PUT",
            f"/v1/jobs/{job_id}/baseline",
            json={
                "leader": BASELINE_LEADER,
                "algorithm": "gbm",
                "metrics": {"auc": 0.91},
                "contributions": {"features": features},
            },
        )
        for home in homes:
            coord.run_agent(home)
        agents = {d["id"]: d["name"] for d in api.json("GET", "/v1/devices")}
        yield FinishedJob(coord, job_id, schema, paths, agents)
    finally:
        coord.stop_agents()
        coord.stop()


@pytest.fixture(scope="module")
def finished(federation: FinishedJob) -> FinishedJob:
    """The job completed; the agents stopped, so that a job submitted later waits for devices."""
    federation.coord.wait_job(federation.job_id, timeout=180)
    federation.coord.stop_agents()
    return federation


@pytest.fixture(scope="module")
def audited(finished: FinishedJob) -> Shown:
    """``aicfl audit worker --once`` run over the finished job's versions: what it showed."""
    shown = aicfl_keeping_signals(
        "audit", "worker", "--once", "--name", "cli-worker", "--poll", "0.2", env=finished.env
    )
    assert shown.code == 0, shown
    return shown


@pytest.fixture(scope="module")
def waiting_job(finished: FinishedJob) -> int:
    """A job submitted with no agent running: it waits for devices, with no model version and no audit."""
    spec = small_spec(finished.schema, rounds=1, target=2, minimum=2, name="cli-waiting")
    return int(finished.coord.api().json("POST", "/v1/jobs", json=spec)["id"])


slow = pytest.mark.slow


# -- rounds watch first: it follows the job while it runs ------------------------------------------


@slow
def test_rounds_watch_follows_the_job_until_it_ends(federation: FinishedJob) -> None:
    shown = federation.run("rounds", "watch", str(federation.job_id), "--interval", "0.2")
    assert shown.code == 0, shown
    # It returned because the job ended, not before.
    assert federation.coord.job(federation.job_id)["status"] == "completed"
    assert shown.lines[-1] == f"job {federation.job_id} completed"
    (progress,) = [line for line in shown.lines if line.startswith(f"job {federation.job_id} rounds")]
    assert f"{ROUNDS}/{ROUNDS}" in progress


# -- jobs ---------------------------------------------------------------------------------------


@slow
def test_jobs_list_shows_the_job_with_its_rounds_and_version(finished: FinishedJob) -> None:
    shown = finished.run("jobs", "list")
    assert shown.code == 0, shown
    (row,) = [r for r in only_table(shown.out) if r["id"] == str(finished.job_id)]
    assert row["name"] == JOB_NAME and row["status"] == "completed"
    assert row["rounds"] == f"{ROUNDS}/{ROUNDS}" and row["version"] == str(ROUNDS)

    listed = json.loads(finished.run("jobs", "list", "--json").out)
    (job,) = [j for j in listed if j["id"] == finished.job_id]
    assert (job["name"], job["status"], job["rounds"], job["rounds_completed"], job["current_version"]) == (
        JOB_NAME,
        "completed",
        ROUNDS,
        ROUNDS,
        ROUNDS,
    )


@slow
def test_jobs_show_gives_status_rounds_metrics_baseline_and_audit(
    finished: FinishedJob, audited: Shown
) -> None:
    job = json.loads(finished.run("jobs", "show", str(finished.job_id), "--json").out)
    assert job["id"] == finished.job_id and job["name"] == JOB_NAME and job["status"] == "completed"
    assert job["rounds_completed"] == ROUNDS and job["current_version"] == ROUNDS and job["reference"] is True
    assert job["baseline"]["leader"] == BASELINE_LEADER
    assert job["audit"]["latest_verdict"]["version"] == ROUNDS
    auc = job["latest_metrics"]["central"]["auc"]

    shown = finished.run("jobs", "show", str(finished.job_id))
    assert shown.code == 0, shown
    lines = shown.lines
    assert lines[0] == f"job {finished.job_id} {JOB_NAME}  status=completed"
    assert lines[1] == (
        f"rounds {ROUNDS}/{ROUNDS}  model version {ROUNDS}  strategy fedavg  model mlp [16]  cohort 2..2"
    )
    assert lines[2].startswith("central:") and f"auc={auc:.4g}" in lines[2]
    assert lines[3].startswith("federated:") and "auc=" in lines[3]
    last = job["latest_round"]
    assert f"latest round {last['number']} ({last['kind']}): completed stage={last['stage']}" in lines
    assert f"baseline:  {BASELINE_LEADER} (gbm)  auc=0.91" in lines
    verdict = job["audit"]["latest_verdict"]["verdict"]
    assert f"audit:     version {ROUNDS}: {verdict}  (version {ROUNDS} done)" in lines
    # Its spec aggregates in the clear: the warning the coordinator gave is repeated.
    assert any(line.startswith("warning: secure = false") for line in lines)


@slow
def test_unknown_job_id_is_one_error_line_for_every_command(finished: FinishedJob) -> None:
    for command in (
        ["jobs", "show", "999"],
        ["jobs", "cancel", "999"],
        ["rounds", "list", "999"],
        ["models", "list", "999"],
        ["models", "export", "999"],
        ["audit", "show", "999"],
    ):
        assert_one_error_line(finished.run(*command), "no job 999 (HTTP 404)")
    assert_one_error_line(finished.run("rounds", "show", "999", "1"), "job 999 has no round 1 (HTTP 404)")
    # `rounds watch` opens its progress display before it asks for the job: a blank line on stdout.
    assert_one_error_line(finished.run("rounds", "watch", "999"), "no job 999 (HTTP 404)", blank_out=True)


@slow
def test_jobs_submit_uploads_the_reference_its_spec_names(finished: FinishedJob, tmp_path: Path) -> None:
    # job.toml names reference.csv beside it, not in the working directory.
    assert aicfl("data", "split", "--out", str(tmp_path), "--devices", "2", "--rounds", "1").code == 0

    submitted = finished.run("jobs", "submit", str(tmp_path / "job.toml"), "--json")
    assert submitted.code == 0, submitted
    job = json.loads(submitted.out)
    assert job["name"] == "demo" and job["rounds"] == 1
    assert finished.coord.job(job["id"])["reference"] is True

    again = finished.run("jobs", "submit", str(tmp_path / "job.toml"))
    assert again.code == 0, again
    assert again.lines == [f"submitted job {job['id'] + 1} (demo)"]


@slow
def test_jobs_submit_json_shows_the_uploaded_reference(finished: FinishedJob, tmp_path: Path) -> None:
    assert aicfl("data", "split", "--out", str(tmp_path), "--devices", "2", "--rounds", "1").code == 0
    job = json.loads(finished.run("jobs", "submit", str(tmp_path / "job.toml"), "--json").out)
    assert finished.coord.job(job["id"])["reference"] is True
    assert job["reference"] is True


def spec_with_reference(finished: FinishedJob, tmp_path: Path, reference: str) -> Path:
    """A one-round job spec in ``tmp_path/job.toml`` whose reference data is ``reference`` beside it."""
    spec = small_spec(finished.schema, rounds=1, target=2, minimum=2)
    spec["evaluation"] = {"reference": reference}
    (tmp_path / "job.toml").write_text(tomli_w.dumps(spec))
    return tmp_path / "job.toml"


@slow
def test_jobs_submit_with_a_missing_reference_file_submits_nothing(
    finished: FinishedJob, tmp_path: Path
) -> None:
    spec_with_reference(finished, tmp_path, "nope.csv")
    before = len(finished.api_json("/v1/jobs"))

    shown = finished.run("jobs", "submit", str(tmp_path / "job.toml"))
    assert_one_error_line(shown, "evaluation.reference: no such file", str(tmp_path / "nope.csv"))
    assert len(finished.api_json("/v1/jobs")) == before


@slow
def test_jobs_submit_cancels_the_job_when_its_reference_is_refused(
    finished: FinishedJob, tmp_path: Path
) -> None:
    spec_with_reference(finished, tmp_path, "bad.csv")
    pd.read_csv(finished.data[0]).drop(columns=["total_day_minutes"]).to_csv(
        tmp_path / "bad.csv", index=False
    )

    shown = finished.run("jobs", "submit", str(tmp_path / "job.toml"))
    line = assert_one_error_line(shown, "cancelled", "total_day_minutes")
    job_id = int(line.removeprefix("error: job ").split()[0])
    assert finished.coord.job(job_id)["status"] == "cancelled"


@slow
def test_jobs_submit_prints_the_warnings_and_jobs_cancel_ends_the_job(
    finished: FinishedJob, tmp_path: Path
) -> None:
    spec = small_spec(finished.schema, rounds=1, target=2, minimum=2, secure=False, name="cli-cancel")
    (tmp_path / "job.toml").write_text(tomli_w.dumps(spec))
    submitted = finished.run("jobs", "submit", str(tmp_path / "job.toml"))
    assert submitted.code == 0, submitted
    said = re.fullmatch(r"submitted job (\d+) \(cli-cancel\)", submitted.lines[0])
    assert said, submitted
    job_id = int(said.group(1))
    warnings_ = finished.coord.job(job_id)["warnings"]
    assert warnings_ and submitted.lines[1:] == [f"warning: {w}" for w in warnings_]

    shown = finished.run("jobs", "cancel", str(job_id))
    assert shown.code == 0 and shown.lines == [f"job {job_id} cancelled"], shown
    assert finished.run("jobs", "show", str(job_id)).lines[0] == (
        f"job {job_id} cli-cancel  status=cancelled  (cancelled by admin)"
    )
    listed = {j["id"]: j["status"] for j in json.loads(finished.run("jobs", "list", "--json").out)}
    assert listed[job_id] == "cancelled" and listed[finished.job_id] == "completed"
    assert_one_error_line(finished.run("jobs", "cancel", str(job_id)), f"job {job_id} is already cancelled")


@slow
def test_jobs_list_and_show_print_a_job_name_with_brackets_as_it_is(finished: FinishedJob) -> None:
    spec = small_spec(finished.schema, rounds=1, target=2, minimum=2, name="churn [v2] [/]")
    job_id = finished.coord.api().json("POST", "/v1/jobs", json=spec)["id"]
    finished.coord.api().request("POST", f"/v1/jobs/{job_id}/cancel")
    rows = {r["id"]: r for r in only_table(finished.run("jobs", "list").out)}
    assert rows[str(job_id)]["name"] == "churn [v2] [/]"
    assert finished.run("jobs", "show", str(job_id)).lines[0].startswith(f"job {job_id} churn [v2] [/]  ")


def test_jobs_schema_prints_the_documented_spec_reference() -> None:
    shown = aicfl("jobs", "schema")
    assert shown.code == 0 and shown.err == ""
    # docs/jobspec.md says it is generated by `aicfl jobs schema > docs/jobspec.md`.
    assert shown.out == (ROOT / "docs" / "jobspec.md").read_text()


def test_jobs_submit_of_a_missing_or_invalid_spec_is_one_error_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the spec is refused before any request
    missing = assert_one_error_line(aicfl("--url", url, "jobs", "submit", str(tmp_path / "nope.toml")))
    assert "nope.toml" in missing and "cannot read" in missing

    (tmp_path / "bad.toml").write_text('name = "x"\nrounds = 0\n')
    assert_one_error_line(
        aicfl("--url", url, "jobs", "submit", str(tmp_path / "bad.toml")),
        "bad.toml",
        "rounds:",
        "data: required field is missing",
    )


def test_jobs_submit_names_a_missing_spec_file_once(tmp_path: Path) -> None:
    shown = aicfl("jobs", "submit", str(tmp_path / "nope.toml"))
    assert shown.err.count("nope.toml") == 1, shown.err


# -- rounds -------------------------------------------------------------------------------------


@slow
def test_rounds_list_shows_every_round_with_its_metrics(finished: FinishedJob) -> None:
    rounds = json.loads(finished.run("rounds", "list", str(finished.job_id), "--json").out)
    assert [r["number"] for r in rounds] == list(range(ROUNDS + 2))
    assert [r["kind"] for r in rounds] == ["stats"] + ["train"] * ROUNDS + ["evaluate"]
    assert all(r["status"] == "completed" and r["participants"] == 2 for r in rounds)

    shown = finished.run("rounds", "list", str(finished.job_id))
    assert shown.code == 0, shown
    rows = only_table(shown.out)
    assert [r["round"] for r in rows] == [str(r["number"]) for r in rounds]
    assert [r["kind"] for r in rows] == [r["kind"] for r in rounds]
    assert all(r["status"] == "completed" and r["devices"] == "2" and r["dropped"] == "0" for r in rows)
    for row, r in zip(rows, rounds, strict=True):
        if r["kind"] == "train":
            assert f"auc={r['metrics']['central']['auc']:.4g}" in row["central"]
            assert row["agg s"] != "-"
        else:
            assert row["central"] == "-" and row["agg s"] == "-"


@slow
@pytest.mark.parametrize("columns", ["80", None], ids=["COLUMNS=80", "piped"])
def test_rounds_list_at_80_columns_cuts_nothing_and_names_the_columns_left_out(
    finished: FinishedJob, columns: str | None
) -> None:
    rounds = json.loads(finished.run("rounds", "list", str(finished.job_id), "--json").out)
    # Piped with no COLUMNS, rich draws 80 columns wide.
    shown = aicfl("rounds", "list", str(finished.job_id), env={**finished.env, "COLUMNS": columns})
    assert shown.code == 0, shown
    assert all(len(line) <= 80 for line in shown.lines), shown.out
    assert "…" not in shown.out, shown.out
    rows = only_table(shown.out)
    assert [r["round"] for r in rows] == [str(r["number"]) for r in rounds]
    assert [r["kind"] for r in rows] == [r["kind"] for r in rounds]
    assert all(r["status"] == "completed" and r["devices"] == "2" for r in rows)
    for row, r in zip(rows, rounds, strict=True):
        central = (r["metrics"] or {}).get("central")
        if central:  # wrapped, one name=value a line
            assert row["central"].split() == [f"{k}={v:.4g}" for k, v in central.items() if k != "examples"]
    # Eleven columns do not fit in 80: those left out are named on the last line.
    left_out = [c.header for c in ROUND_COLUMNS if c.header not in rows[0]]
    assert {"stage", "federated"} <= set(left_out)
    assert {"round", "status", "devices", "central"} <= set(rows[0])
    assert shown.lines[-1] == left_out_note(left_out, 80)


@slow
def test_rounds_plot_writes_the_learning_curve_of_the_job(finished: FinishedJob, tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    shown = finished.run("rounds", "plot", str(finished.job_id), "--out", str(target))
    assert shown.code == 0 and shown.lines == [str(target)] and shown.err == "", shown
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert struct.unpack(">II", data[16:24]) == (800, 500)

    accuracy = finished.run(
        "rounds", "plot", str(finished.job_id), "--out", str(target), "--metric", "accuracy"
    )
    assert accuracy.code == 0, accuracy


@slow
def test_rounds_plot_errors_are_one_line(finished: FinishedJob, waiting_job: int, tmp_path: Path) -> None:
    target = tmp_path / "curve.png"
    assert_one_error_line(
        finished.run("rounds", "plot", str(waiting_job), "--out", str(target)),
        f"job {waiting_job} has no completed training round yet",
    )
    line = assert_one_error_line(
        finished.run("rounds", "plot", str(finished.job_id), "--out", str(target), "--metric", "f1"),
        f"job {finished.job_id}'s rounds have no metric 'f1'; they have ",
    )
    assert "auc" in line and "accuracy" in line
    assert_one_error_line(
        finished.run("rounds", "plot", "999", "--out", str(target)), "no job 999 (HTTP 404)"
    )
    assert not target.exists()


def test_rounds_plot_into_a_missing_folder_is_refused_before_any_request(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    assert_one_error_line(
        aicfl("--url", url, "rounds", "plot", "1", "--out", str(tmp_path / "nope" / "curve.png")),
        f"--out: no such folder {tmp_path / 'nope'}",
    )
    assert_one_error_line(
        aicfl("--url", url, "rounds", "plot", "1", "--out", str(tmp_path)), f"--out: {tmp_path} is a folder"
    )


@slow
def test_rounds_show_lists_the_devices_of_the_round(finished: FinishedJob) -> None:
    detail = json.loads(finished.run("rounds", "show", str(finished.job_id), "1", "--json").out)
    assert detail["number"] == 1 and detail["kind"] == "train"
    assert {d["device_id"] for d in detail["devices"]} == set(finished.agents)

    shown = finished.run("rounds", "show", str(finished.job_id), "1")
    assert shown.code == 0, shown
    (summary,), devices = tables(shown.out)
    assert (summary["round"], summary["kind"], summary["status"]) == ("1", "train", "completed")
    assert {d["device"] for d in devices} == set(finished.agents)
    examples = {d["device_id"]: d["num_examples"] for d in detail["devices"]}
    for d in devices:
        assert (d["status"], d["stage done"]) == ("active", "input")
        assert int(d["examples"]) == examples[d["device"]] > 0

    assert_one_error_line(finished.run("rounds", "show", str(finished.job_id), "9"), "no round 9")


# -- models -------------------------------------------------------------------------------------


def _version(federation: FinishedJob, version: int) -> tuple[dict[str, Any], np.ndarray]:
    """The header and parameters of a version as the coordinator signed and stored it."""
    blob = (
        federation.coord.api().request("GET", f"/v1/jobs/{federation.job_id}/models/{version}/blob").content
    )
    header, vec = codec.decode(blob)
    return header, vec


@slow
def test_models_list_shows_every_version_with_its_hash_and_lineage(finished: FinishedJob) -> None:
    versions = json.loads(finished.run("models", "list", str(finished.job_id), "--json").out)
    assert [v["version"] for v in versions] == list(range(ROUNDS + 1))
    for v in versions:
        blob = (
            finished.coord.api()
            .request("GET", f"/v1/jobs/{finished.job_id}/models/{v['version']}/blob")
            .content
        )
        assert sha256_hex(blob) == v["sha256"]

    shown = finished.run("models", "list", str(finished.job_id))
    assert shown.code == 0, shown
    rows = only_table(shown.out)
    assert [r["version"] for r in rows] == ["0", "1", "2"]
    assert [r["parent"] for r in rows] == ["-", "0", "1"]
    assert [r["round"] for r in rows] == ["-", "1", "2"]
    assert [r["sha256"] for r in rows] == [v["sha256"][:12] for v in versions]
    assert [r["source"] for r in rows] == ["initialised", "federated", "federated"]
    assert all(r["params"] == str(versions[0]["num_parameters"]) for r in rows)


@slow
def test_models_export_writes_the_newest_version_as_a_loadable_state_dict(
    finished: FinishedJob, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shown = finished.run("models", "export", str(finished.job_id))
    assert shown.code == 0, shown
    target = tmp_path / f"job{finished.job_id}-v{ROUNDS}.pt"
    size = target.stat().st_size
    assert shown.lines == [f"wrote {target.name} ({size} bytes, version {ROUNDS}, state_dict)"]

    saved = torch.load(io.BytesIO(target.read_bytes()), weights_only=True)
    header, vec = _version(finished, ROUNDS)
    assert saved["arch"] == header["arch"] and saved["preprocess"] == header["preprocess"]
    model = build_model(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    np.testing.assert_array_equal(flatten_parameters(model), vec)


@slow
@pytest.mark.parametrize("export_format", ["torchscript", "onnx"])
def test_models_export_of_a_version_gives_that_versions_outputs(
    finished: FinishedJob, tmp_path: Path, export_format: str
) -> None:
    target = tmp_path / "model.out"
    shown = finished.run(
        "models",
        "export",
        str(finished.job_id),
        "--version",
        "1",
        "--format",
        export_format,
        "--out",
        str(target),
    )
    assert shown.code == 0, shown
    assert shown.lines == [f"wrote {target} ({target.stat().st_size} bytes, version 1, {export_format})"]

    header, vec = _version(finished, 1)
    model = build_model(header["arch"]).eval()
    load_flat_parameters(model, vec)
    features = np.random.default_rng(0).normal(size=(5, header["arch"]["input_dim"])).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)).numpy()
    if export_format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            loaded = torch.jit.load(str(target))
        with torch.no_grad():
            out = loaded(torch.from_numpy(features)).numpy()
    else:
        import onnx
        from onnx.reference import ReferenceEvaluator

        proto = onnx.load(str(target))
        onnx.checker.check_model(proto)
        outputs: Any = ReferenceEvaluator(proto).run(None, {"features": features})
        out = outputs[0]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@slow
def test_models_export_errors_are_one_line(finished: FinishedJob, waiting_job: int, tmp_path: Path) -> None:
    assert_one_error_line(
        finished.run("models", "export", str(waiting_job), "--out", str(tmp_path / "m.pt")),
        f"job {waiting_job} has no model version yet",
    )
    assert_one_error_line(
        finished.run(
            "models", "export", str(finished.job_id), "--version", "7", "--out", str(tmp_path / "m.pt")
        ),
        "(HTTP 404)",
    )
    assert not (tmp_path / "m.pt").exists()
    # Refused before any request.
    assert_one_error_line(
        aicfl("models", "export", "1", "--format", "pickle"),
        "--format must be state_dict, torchscript or onnx",
    )


# -- devices ------------------------------------------------------------------------------------


@dataclass
class EnrolledByToken:
    """The tokens ``aicfl devices token`` gave, and the device an agent enrolled with the first one."""

    tokens: dict[str, Any]  # what `devices token --json` printed
    device_id: str
    name: str


@pytest.fixture(scope="module")
def enrolled(finished: FinishedJob) -> EnrolledByToken:
    """A device enrolled by a real agent with a token from ``aicfl devices token``."""
    shown = finished.run("devices", "token", "--count", "2", "--ttl", "10m", "--json")
    assert shown.code == 0, shown
    tokens = json.loads(shown.out)
    home = finished.coord.root / "agents" / "by-cli-token"
    out = subprocess.run(
        py(
            "client_agent",
            "enroll",
            "--coordinator",
            finished.coord.url,
            "--token",
            tokens["tokens"][0],
            "--data",
            str(finished.data[0]),
            "--home",
            str(home),
            "--name",
            "by-cli-token",
        ),
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 0, out.stderr
    device_id = out.stdout.strip().removeprefix("enrolled as ")
    return EnrolledByToken(tokens, device_id, "by-cli-token")


@slow
def test_devices_token_gives_tokens_an_agent_enrolls_with(
    finished: FinishedJob, enrolled: EnrolledByToken
) -> None:
    assert enrolled.tokens["expires_in_seconds"] == 600
    assert len(set(enrolled.tokens["tokens"])) == 2
    assert all(t.startswith("aicfl_enr_") for t in enrolled.tokens["tokens"])

    listed = {d["id"]: d for d in json.loads(finished.run("devices", "list", "--json").out)}
    assert listed[enrolled.device_id]["name"] == enrolled.name
    assert set(finished.agents) <= set(listed)

    rows = {r["id"]: r for r in only_table(finished.run("devices", "list").out)}
    assert rows[enrolled.device_id]["name"] == enrolled.name
    # Enrolled, never run: never seen, not online.
    assert (rows[enrolled.device_id]["last seen"], rows[enrolled.device_id]["online"]) == ("never", "no")
    assert {rows[d]["name"] for d in finished.agents} == set(finished.agents.values())

    plain = finished.run("devices", "token")
    assert plain.code == 0 and len(plain.lines) == 1 and plain.lines[0].startswith("aicfl_enr_"), plain
    assert_one_error_line(finished.run("devices", "token", "--ttl", "soon"), "--ttl:", "'soon'")


@slow
def test_devices_revoke_shows_the_device_revoked_in_the_list(
    finished: FinishedJob, enrolled: EnrolledByToken
) -> None:
    shown = finished.run("devices", "revoke", enrolled.device_id)
    assert shown.code == 0 and shown.lines == [f"revoked {enrolled.device_id}"], shown

    listed = {d["id"]: d for d in json.loads(finished.run("devices", "list", "--json").out)}
    assert listed[enrolled.device_id]["revoked_at"] is not None
    assert all(listed[d]["revoked_at"] is None for d in finished.agents)
    rows = {r["id"]: r for r in only_table(finished.run("devices", "list").out)}
    assert rows[enrolled.device_id]["revoked"] != "-"
    assert all(rows[d]["revoked"] == "-" for d in finished.agents)

    assert_one_error_line(finished.run("devices", "revoke", "dev-nope"), "no device 'dev-nope'", "(HTTP 404)")


# -- operators and their tokens -----------------------------------------------------------------


@slow
def test_viewer_token_reads_but_admin_commands_are_refused_in_one_line(finished: FinishedJob) -> None:
    made = finished.run("admin", "token", "cli-viewer")
    assert made.code == 0 and len(made.lines) == 1 and made.lines[0].startswith("aicfl_op_"), made
    viewer = ["--url", finished.coord.url, "--token", made.lines[0]]

    listed = aicfl(*viewer, "jobs", "list", "--json")
    assert listed.code == 0 and finished.job_id in [j["id"] for j in json.loads(listed.out)], listed
    for command in (["devices", "token"], ["jobs", "cancel", str(finished.job_id)], ["admin", "token", "x"]):
        assert_one_error_line(
            aicfl(*viewer, *command), "needs the admin role", "'cli-viewer' has 'viewer'", "(HTTP 403)"
        )
    assert finished.coord.job(finished.job_id)["status"] == "completed"

    assert_one_error_line(
        finished.run("admin", "token", "cli-root", "--role", "root"), "role must be one of", "'root'"
    )


@slow
def test_bad_or_missing_token_is_one_line_that_says_how_to_give_one(finished: FinishedJob) -> None:
    # The --token option wins over AICFL_TOKEN.
    bad = aicfl("--token", "aicfl_op_bogus", "jobs", "list", env=finished.env)
    assert_one_error_line(bad, "(set AICFL_TOKEN or pass --token)", "(HTTP 401)")
    missing = aicfl("jobs", "list", env={"AICFL_URL": finished.coord.url})
    assert_one_error_line(missing, "(set AICFL_TOKEN or pass --token)", "(HTTP 401)")


def test_unreachable_coordinator_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_error_line(
        aicfl("--url", url, "jobs", "list"), f"cannot reach the coordinator at {url}", code=2
    )


# -- audits -------------------------------------------------------------------------------------


def test_audit_worker_waits_for_the_server_then_gives_up_in_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    shown = aicfl_keeping_signals("--url", url, "audit", "worker", "--once", "--wait-for-server", "1")
    assert time.monotonic() - started >= 1.0
    assert_one_error_line(shown, f"cannot reach the coordinator at {url}", code=2)


@slow
def test_audit_worker_once_audits_every_version_then_exits(finished: FinishedJob, audited: Shown) -> None:
    assert audited.lines[-1] == "audit worker cli-worker: 3 audit(s) done"
    audits = finished.api_json(f"/v1/jobs/{finished.job_id}/audits")
    assert [(a["version"], a["status"], a["worker"]) for a in audits] == [
        (v, "done", "cli-worker") for v in range(ROUNDS + 1)
    ]
    for a in audits:
        said = re.compile(
            rf"audit \d+ \(job {finished.job_id} v{a['version']}, attempt 1\): {a['verdict']} in "
        )
        assert any(said.match(line) for line in audited.lines), audited.out


@slow
def test_audit_show_gives_the_newest_audit_with_its_features_and_comparisons(
    finished: FinishedJob, audited: Shown
) -> None:
    audit = json.loads(finished.run("audit", "show", str(finished.job_id), "--json").out)
    assert audit["version"] == ROUNDS and audit["status"] == "done" and audit["written"] == []
    report = audit["report"]
    assert report["previous_version"] == ROUNDS - 1 and report["baseline"]["model"] == BASELINE_LEADER

    shown = finished.run("audit", "show", str(finished.job_id))
    assert shown.code == 0, shown
    lines = shown.lines
    assert lines[0] == (
        f"audit of job {finished.job_id} version {ROUNDS}  status=done  verdict={audit['verdict']}"
        f"  attempts=1  seconds={audit['seconds']:.3g}"
    )
    assert f"explainer {report['explainer']} on 60 rows; output: {report['output']}" in lines
    assert f"top features: {', '.join(report['top_features'])}" in lines
    assert any(line.startswith(f"vs version {ROUNDS - 1}: rank correlation ") for line in lines)
    assert any(line.startswith(f"vs AutoML leader: model={BASELINE_LEADER} ") for line in lines)
    rows = only_table(shown.out)
    names = {f["name"] for f in finished.schema["features"]}
    assert len(rows) == 15 and {r["feature"] for r in rows} <= names
    assert [r["feature"] for r in rows[: len(report["top_features"])]] == report["top_features"]
    values = [float(r["mean |SHAP|"]) for r in rows]
    assert values == sorted(values, reverse=True)
    for reason in report["reasons"]:
        assert reason in lines


@slow
def test_audit_show_of_a_version_writes_its_plots(
    finished: FinishedJob, audited: Shown, tmp_path: Path
) -> None:
    shown = finished.run("audit", "show", str(finished.job_id), "--version", "0", "--plot", str(tmp_path))
    assert shown.code == 0, shown
    assert shown.lines[0].startswith(f"audit of job {finished.job_id} version 0  status=done  verdict=ok")
    assert "vs version -: rank correlation -" in shown.lines  # the first version has none to compare with
    written = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in written] == [
        f"job{finished.job_id}-v0-beeswarm.png",
        f"job{finished.job_id}-v0-importance.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert [line for line in shown.lines if line.startswith("wrote ")] == [f"wrote {p}" for p in written]


@slow
def test_audit_show_errors_are_one_line(finished: FinishedJob, audited: Shown, waiting_job: int) -> None:
    assert_one_error_line(
        finished.run("audit", "show", str(finished.job_id), "--version", "9"), "no audit of version 9"
    )
    assert_one_error_line(
        finished.run("audit", "show", str(waiting_job)), f"job {waiting_job} has no audits yet"
    )


# -- commands without a coordinator -------------------------------------------------------------


def test_data_split_writes_the_device_files_reference_and_job_spec_it_names(tmp_path: Path) -> None:
    out = tmp_path / "split"
    shown = aicfl("data", "split", "--out", str(out), "--devices", "3", "--rounds", "4", "--seed", "5")
    assert shown.code == 0 and shown.err == "", shown
    files = [out / "devices" / f"device-{i:02d}" / "data.csv" for i in range(3)]
    parts = [pd.read_csv(f) for f in files]
    test = pd.read_csv(out / "reference.csv")
    assert shown.lines == [
        *(f"{f}  {len(p)} rows" for f, p in zip(files, parts, strict=True)),
        f"{out / 'reference.csv'}  {len(test)} test rows",
        str(out / "job.toml"),
    ]
    df, schema, group = load_dataset("mlc_churn")
    assert sum(len(p) for p in parts) + len(test) == len(df)
    # A natural split: no two devices share a value of the grouping column.
    groups = [set(p[group]) for p in parts]
    assert all(groups[i].isdisjoint(groups[j]) for i in range(3) for j in range(i + 1, 3))

    spec = load_spec(out / "job.toml")
    assert spec.rounds == 4 and spec.seed == 5 and spec.evaluation.reference == "reference.csv"
    assert [f.name for f in spec.data.features] == [f["name"] for f in schema["features"]]
    assert spec.data.target == schema["target"]
    assert tomllib.loads((out / "job.toml").read_text())["cohort"]["target"] == 3


def test_data_split_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_error_line(aicfl("data", "split", "--out", str(tmp_path), "--dataset", "nope"), "'nope'")
    assert_one_error_line(
        aicfl("data", "split", "--out", str(tmp_path), "--devices", "1000"), "--devices 1000"
    )


def test_simulate_json_gives_the_documented_summary_of_an_exact_round() -> None:
    shown = aicfl("simulate", "--devices", "5", "--params", "60", "--json")
    assert shown.code == 0 and shown.err == "", shown
    out = json.loads(shown.out)
    assert (out["devices"], out["dropped"], out["status"], out["exact"], out["participants"]) == (
        5,
        0,
        "completed",
        True,
        5,
    )
    assert out["max_abs_error"] <= out["quantisation_bound"]
    for key in (
        "params",
        "round_seconds",
        "coordinator_cpu_seconds",
        "client_cpu_seconds",
        "aggregation_seconds",
    ):
        assert out[key] > 0, key


def test_simulate_prints_one_line_per_figure_and_reports_an_abandoned_round() -> None:
    shown = aicfl(
        "simulate", "--devices", "5", "--params", "60", "--dropout", "0.4", "--drop-after", "share_keys"
    )
    assert shown.code == 0, shown
    figures = dict(line.split(None, 1) for line in shown.lines)
    assert figures["devices"] == "5" and figures["dropped"] == "2" and figures["drop_after"] == "share_keys"
    assert figures["status"] == "abandoned" and figures["exact"] == "False"
    assert "shares" in figures["reason"]

    assert_one_error_line(
        aicfl("simulate", "--devices", "5", "--dropout", "0.2", "--drop-after", "later"),
        "--drop-after must be one of configure, advertise_keys, share_keys, masked_input",
    )


def test_admin_bootstrap_prints_the_first_token_once(tmp_path: Path) -> None:
    first = aicfl("admin", "bootstrap", "--data-dir", str(tmp_path))
    assert first.code == 0 and len(first.lines) == 1 and first.lines[0].startswith("aicfl_op_"), first
    assert_one_error_line(
        aicfl("admin", "bootstrap", "--data-dir", str(tmp_path)), "an admin token already exists"
    )
    assert_one_error_line(
        aicfl("admin", "bootstrap", "--db", "nosuchdb://x", "--data-dir", str(tmp_path)),
        "cannot open the database",
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "cert.pem", "--tls-key", "key.pem"], "cert.pem: no such file"),
        (["--db", "nosuchdb://x"], "cannot start the coordinator"),
        (["--with-audit-worker"], "--with-audit-worker needs an admin token"),
    ],
)
def test_server_start_refuses_a_bad_setup_in_one_line(tmp_path: Path, flags: list[str], message: str) -> None:
    args = [str(tmp_path / f) if f.endswith(".pem") else f for f in flags]
    shown = aicfl("server", "start", "--data-dir", str(tmp_path), "--port", str(free_port()), *args)
    assert_one_error_line(shown, message)


def test_server_start_with_a_bad_setting_in_the_environment_names_it_in_one_line(tmp_path: Path) -> None:
    shown = aicfl(
        "server",
        "start",
        "--data-dir",
        str(tmp_path),
        "--port",
        str(free_port()),
        env={"AICFL_ENROLL_UNLIMITED_NETWORKS": '["not-a-network"]'},
    )
    assert_one_error_line(
        shown, "invalid setting: enroll_unlimited_networks: Value error, 'not-a-network' is not an IP network"
    )


def test_server_start_signs_with_the_key_file_signing_key_names(tmp_path: Path) -> None:
    key_file = tmp_path / "secret" / "coordinator_key.pem"
    key_file.parent.mkdir(mode=0o700)
    key = Ed25519PrivateKey.generate()
    save_private_key(key, str(key_file))
    # A process of its own: in-process, ``server start`` would serve until the test ends.
    coord = Coordinator(tmp_path, extra=["--signing-key", str(key_file)])
    coord.start()
    try:
        served = httpx.get(coord.url + "/v1/coordinator/key", timeout=10).json()
    finally:
        coord.stop()
    assert served == {"algorithm": "Ed25519", "public_key": b64e(public_key_bytes(key))}
    assert not (coord.data_dir / "coordinator_key.pem").exists()  # no key of its own was made


# -- failures that once ended in a traceback ------------------------------------------------------


def test_jobs_submit_of_a_spec_that_is_not_utf8_is_one_error_line(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.toml"
    spec.write_bytes('name = "caf\xe9"\nrounds = 1\n'.encode("latin-1"))
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_error_line(
        aicfl("--url", url, "jobs", "submit", str(spec)), f"{spec}: not UTF-8 text: byte 0xe9 at offset 11"
    )


def test_server_start_with_a_key_that_is_not_the_certificates_is_one_error_line(tmp_path: Path) -> None:
    cert, _ = self_signed_certificate(tmp_path / "one")
    _, other_key = self_signed_certificate(tmp_path / "two")
    args = ["--data-dir", str(tmp_path / "data"), "--port", str(free_port())]
    shown = aicfl("server", "start", *args, "--tls-cert", str(cert), "--tls-key", str(other_key))
    assert_one_error_line(shown, f"--tls-key {other_key} is not the key of --tls-cert {cert}")
    shown = aicfl("server", "start", *args, "--tls-cert", str(other_key), "--tls-key", str(other_key))
    assert_one_error_line(shown, "are not a PEM certificate and its key")


def test_data_split_for_one_device_is_one_error_line(tmp_path: Path) -> None:
    shown = aicfl(
        "data", "split", "--out", str(tmp_path / "split"), "--dataset", "mlc_churn", "--devices", "1"
    )
    assert_one_error_line(shown, "--devices 1: a federation needs 2 devices at least")
    assert not (tmp_path / "split").exists()
