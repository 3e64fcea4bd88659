"""The federation over real HTTP on loopback, with real agent processes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from shared.signing import load_public_key, verify_model

from .harness import ENV, Coordinator, churn_slices, drop_column, py, small_spec, wait_for

pytestmark = pytest.mark.slow


def submit(coord: Coordinator, spec: dict, reference: Path | None = None) -> int:
    api = coord.api()
    job = api.json("POST", "/v1/jobs", json=spec)
    if reference is not None:
        api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
    return int(job["id"])


def train_rounds(coord: Coordinator, job_id: int) -> list[dict]:
    return [r for r in coord.rounds(job_id) if r["kind"] == "train"]


def test_three_rounds_complete_with_real_agents(coord: Coordinator, tmp_path: Path) -> None:
    paths, ref, schema = churn_slices(tmp_path / "data", 3)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    job_id = submit(coord, small_spec(schema, rounds=3, target=3, minimum=2), ref)
    job = coord.wait_job(job_id)

    rounds = train_rounds(coord, job_id)
    assert [r["status"] for r in rounds] == ["completed"] * 3
    assert all(r["participants"] == 3 and r["dropped"] == 0 for r in rounds)
    assert all(r["aggregation_seconds"] is not None for r in rounds)
    # central metrics on the reference rows, federated metrics from the devices' holdouts
    assert all(0.0 <= r["metrics"]["central"]["auc"] <= 1.0 for r in rounds)
    assert all(r["metrics"]["federated"]["examples"] > 0 for r in rounds)
    assert job["rounds_completed"] == 3

    versions = coord.api().json("GET", f"/v1/jobs/{job_id}/models")
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    assert [v["parent"] for v in versions] == [None, 0, 1, 2]
    key = load_public_key(coord.api().json("GET", "/v1/coordinator/key")["public_key"])
    for v in versions:
        blob = coord.api().request("GET", f"/v1/jobs/{job_id}/models/{v['version']}/blob").content
        verify_model(key, job_id, v["version"], blob, v["sha256"], v["signature"])
    assert len({v["sha256"] for v in versions}) == 4

    # The operator CLI exports the last version; the ONNX file carries the model.
    env = {**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    target = tmp_path / "model.onnx"
    out = subprocess.run(
        py("server", "models", "export", str(job_id), "--format", "onnx", "--out", str(target)),
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    import onnx

    graph = onnx.load(str(target)).graph
    assert [i.name for i in graph.input] == ["features"] and [o.name for o in graph.output] == ["output"]


def test_device_killed_mid_round_is_dropped_and_round_completes(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 3)
    # Agent 0 dies abruptly when it reaches the training round's input (the kill below may come
    # after a fast round has already ended).
    crash = [{"AICFL_AGENT_CRASH_AT": "1:input"}, None, None]
    procs = [coord.run_agent(coord.enroll(p, f"a{i}"), crash[i]) for i, p in enumerate(paths)]
    # Plain aggregation: with 3 devices SecAgg+ has k = t = 2 and cannot lose one after sharing keys.
    job_id = submit(coord, small_spec(schema, rounds=1, target=3, minimum=2, stage_timeout=6, secure=False))

    # Kill one agent as soon as the training round has picked its cohort.
    wait_for(lambda: any(r["kind"] == "train" for r in coord.rounds(job_id)), 60, "the training round")
    procs[0].send_signal(signal.SIGKILL)
    coord.wait_job(job_id, timeout=90)

    (r,) = train_rounds(coord, job_id)
    assert r["status"] == "completed"
    assert (r["participants"], r["dropped"]) == (3, 1)
    detail = coord.api().json("GET", f"/v1/jobs/{job_id}/rounds/{r['number']}")
    dropped = [d for d in detail["devices"] if d["status"] == "dropped"]
    assert len(dropped) == 1 and "missed the deadline" in dropped[0]["reason"]


def test_below_minimum_round_is_abandoned_and_model_unchanged(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 2)
    # Agent 1 dies abruptly when it reaches the training round's input: a fast round cannot end
    # before the kill below.
    crash = [None, {"AICFL_AGENT_CRASH_AT": "1:input"}]
    procs = [coord.run_agent(coord.enroll(p, f"a{i}"), crash[i]) for i, p in enumerate(paths)]
    job_id = submit(coord, small_spec(schema, rounds=2, target=2, minimum=2, stage_timeout=5, secure=False))

    wait_for(lambda: any(r["kind"] == "train" for r in coord.rounds(job_id)), 60, "the training round")
    before = coord.api().json("GET", f"/v1/jobs/{job_id}/models")
    procs[1].send_signal(signal.SIGKILL)

    def abandoned() -> dict | None:
        return next((r for r in train_rounds(coord, job_id) if r["status"] == "abandoned"), None)

    r = wait_for(abandoned, 60, "the round to be abandoned")
    assert "minimum is 2" in r["reason"]
    assert r["model_version_out"] is None
    after = coord.api().json("GET", f"/v1/jobs/{job_id}/models")
    assert after == before
    assert coord.job(job_id)["current_version"] == before[-1]["version"]
    assert coord.job(job_id)["status"] == "running"


def test_tampered_model_is_refused_by_the_agent(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 2)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    # A target above the cohort leaves a few seconds between version 0 and round 1.
    spec = small_spec(schema, rounds=1, target=3, minimum=2, stage_timeout=10, selection_timeout=4)
    job_id = submit(coord, spec)

    v0 = wait_for(lambda: coord.api().json("GET", f"/v1/jobs/{job_id}/models"), 60, "version 0")[0]
    blob = coord.data_dir / "blobs" / v0["sha256"][:2] / v0["sha256"]
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    blob.write_bytes(bytes(data))

    def refused() -> dict | None:
        rounds = train_rounds(coord, job_id)
        if not rounds or rounds[0]["status"] != "abandoned":
            return None
        return coord.api().json("GET", f"/v1/jobs/{job_id}/rounds/{rounds[0]['number']}")

    detail = wait_for(refused, 60, "the agents to refuse the model")
    declined = [d for d in detail["devices"] if d["status"] == "declined"]
    assert declined, detail
    for d in declined:
        assert "model refused" in d["reason"] and "hash mismatch" in d["reason"]
    assert "minimum is 2" in detail["reason"]
    assert coord.api().json("GET", f"/v1/jobs/{job_id}/models") == [v0]


def test_bad_data_file_is_declined_naming_the_column(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 3)
    bad = drop_column(paths[2], "total_day_minutes", tmp_path / "data" / "bad.csv")
    for i, p in enumerate([paths[0], paths[1], bad]):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    # All three online first, so the statistics round selects them at once and the bad file meets the
    # schema check there. The later rounds find two eligible devices of the three they wait for, and
    # wait out the selection timeout each: keep it short.
    wait_for(
        lambda: sum(d["online"] for d in coord.api().json("GET", "/v1/devices")) == 3,
        60,
        "the three agents to check in",
    )
    job_id = submit(coord, small_spec(schema, rounds=1, target=3, minimum=2, selection_timeout=5))
    coord.wait_job(job_id)

    stats = coord.rounds(job_id)[0]
    assert stats["kind"] == "stats" and stats["status"] == "completed"
    detail = coord.api().json("GET", f"/v1/jobs/{job_id}/rounds/0")
    (declined,) = [d for d in detail["devices"] if d["status"] == "declined"]
    assert "total_day_minutes" in declined["reason"] and "missing" in declined["reason"]
    # A device that declined a job is not selected for it again.
    assert all(r["participants"] == 2 for r in train_rounds(coord, job_id))


def test_agent_enroll_with_missing_data_file_gives_one_clear_line(coord: Coordinator, tmp_path: Path) -> None:
    token = coord.api().json("POST", "/v1/enrollment-tokens", json={"count": 1})["tokens"][0]
    out = subprocess.run(
        py(
            "client_agent",
            "enroll",
            "--coordinator",
            coord.url,
            "--token",
            token,
            "--data",
            str(tmp_path / "nope.csv"),
            "--home",
            str(tmp_path / "h"),
        ),
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: --data:") and "nope.csv" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_job_specs_give_one_clear_error(coord: Coordinator, tmp_path: Path) -> None:
    cases = {
        "minimum": (
            'name="x"\nrounds=1\n[data]\ntarget="y"\ntask="binary"\n[[data.features]]\nname="a"\ntype="numeric"\n'
            "[cohort]\ntarget=2\nminimum=5\n",
            "cohort: minimum (5) must not exceed target (2)",
        ),
        "unknown": (
            'name="x"\nrounds=1\nroundz=2\n[data]\ntarget="y"\ntask="binary"\n[[data.features]]\nname="a"\ntype="numeric"\n',
            "roundz: unknown field",
        ),
        "task": (
            'name="x"\nrounds=1\n[data]\ntarget="y"\ntask="ranking"\n[[data.features]]\nname="a"\ntype="numeric"\n',
            "data.task:",
        ),
        "toml": ('name="x\n', "not valid TOML"),
    }
    env = {**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    for name, (text, expected) in cases.items():
        f = tmp_path / f"{name}.toml"
        f.write_text(text)
        out = subprocess.run(py("server", "jobs", "submit", str(f)), capture_output=True, text=True, env=env)
        assert out.returncode == 1, (name, out.stdout)
        assert expected in out.stderr, (name, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # Nothing reached the coordinator.
    assert coord.api().json("GET", "/v1/jobs") == []
    # The API itself refuses a bad spec with a problem document naming the field.
    resp = coord.api()._http.post("/v1/jobs", json={"name": "x", "rounds": 0})
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert "rounds" in resp.json()["detail"] and "data: required field is missing" in resp.json()["detail"]


def test_viewer_token_cannot_submit_jobs(coord: Coordinator) -> None:
    viewer = coord.api().json("POST", "/v1/operators", json={"name": "v", "role": "viewer"})["token"]
    from shared.api_client import ApiClient

    api = ApiClient(coord.url, viewer)
    assert api.json("GET", "/v1/jobs") == []
    resp = api._http.post("/v1/jobs", json={})
    assert resp.status_code == 403 and "admin role" in resp.json()["detail"]
    assert ApiClient(coord.url, "nope")._http.get("/v1/jobs").status_code == 401
    assert ApiClient(coord.url, None)._http.get("/v1/devices").status_code == 401


def test_coordinator_killed_mid_job_restarts_and_finishes(coord: Coordinator, tmp_path: Path) -> None:
    paths, ref, schema = churn_slices(tmp_path / "data", 3)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    job_id = submit(coord, small_spec(schema, rounds=3, target=3, minimum=2, stage_timeout=15), ref)
    wait_for(lambda: coord.job(job_id)["rounds_completed"] >= 1, 90, "the first training round")

    coord.stop(signal.SIGKILL)
    coord.start()  # same database, blobs and key; the agents reconnect by themselves
    job = coord.wait_job(job_id, timeout=180)

    assert job["rounds_completed"] == 3
    versions = coord.api().json("GET", f"/v1/jobs/{job_id}/models")
    assert [v["version"] for v in versions] == [0, 1, 2, 3]
    assert [v["parent"] for v in versions] == [None, 0, 1, 2]
    statuses = [r["status"] for r in train_rounds(coord, job_id)]
    assert statuses.count("completed") == 3 and set(statuses) <= {"completed", "abandoned"}


def test_agent_restarted_mid_round_resumes_and_nobody_is_dropped(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 3)
    homes = [coord.enroll(p, f"a{i}") for i, p in enumerate(paths)]
    procs = [coord.run_agent(h) for h in homes]
    # Plain rounds: a device's SecAgg+ secrets live in memory only, so under SecAgg+ a restarted
    # device is counted dropped instead (tested in test_secure_http.py).
    job_id = submit(coord, small_spec(schema, rounds=2, target=3, minimum=3, stage_timeout=40, secure=False))

    wait_for(lambda: any(r["kind"] == "train" for r in coord.rounds(job_id)), 60, "the training round")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    coord.run_agent(homes[0])  # same identity and state file: it picks the round up again
    coord.wait_job(job_id, timeout=120)

    rounds = train_rounds(coord, job_id)
    assert [r["status"] for r in rounds] == ["completed", "completed"]
    assert all(r["dropped"] == 0 and r["participants"] == 3 for r in rounds)


def test_agent_stops_cleanly_on_sigterm_and_reports_status(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, _ = churn_slices(tmp_path / "data", 1)
    home = coord.enroll(paths[0], "a0")
    proc = coord.run_agent(home)
    wait_for(
        lambda: any(d["online"] for d in coord.api().json("GET", "/v1/devices")), 60, "the agent to check in"
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    out = subprocess.run(
        py("client_agent", "status", "--home", str(home), "--json"), capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr
    import json

    status = json.loads(out.stdout)
    assert status["coordinator_reachable"] is True and status["data_present"] is True
    assert status["device_id"].startswith("dev-")


def test_tls_coordinator_with_agent_and_cli(tmp_path: Path) -> None:
    from .harness import self_signed_certificate

    c = Coordinator(tmp_path, tls=self_signed_certificate(tmp_path / "tls"))
    c.bootstrap()
    c.start()
    try:
        paths, _, _ = churn_slices(tmp_path / "data", 1)
        c.run_agent(c.enroll(paths[0], "a0"))
        wait_for(
            lambda: any(d["online"] for d in c.api().json("GET", "/v1/devices")), 60, "the agent over TLS"
        )
        env = {**ENV, "AICFL_URL": c.url, "AICFL_TOKEN": c.token, "AICFL_CA_CERT": str(c.tls[0])}
        out = subprocess.run(
            py("server", "devices", "list", "--json"), capture_output=True, text=True, env=env
        )
        assert out.returncode == 0 and '"online": true' in out.stdout
        # Without the CA the client refuses the certificate, with one clear line.
        env.pop("AICFL_CA_CERT")
        out = subprocess.run(py("server", "devices", "list"), capture_output=True, text=True, env=env)
        assert out.returncode == 2 and "certificate" in out.stderr.lower() and "Traceback" not in out.stderr
    finally:
        c.stop_agents()
        c.stop()
