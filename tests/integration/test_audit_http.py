"""SHAP audits end to end: a real coordinator, real agents, real `aicfl audit worker` processes.

A worker killed (SIGKILL) in the middle of an audit leaves it to be taken again
once its lease runs out; every version ends audited exactly once; operators read
the reports and plots with `aicfl audit show`, and `aicfl jobs show` shows the
latest verdict.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import ENV, Coordinator, churn_slices, py, small_spec, wait_for

pytestmark = pytest.mark.slow


def _worker(coord: Coordinator, name: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    with open(log, "ab") as fh:
        return subprocess.Popen(
            py("server", "audit", "worker", "--name", name, "--lease", "10", "--poll", "0.2"),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _audited_job(
    coord: Coordinator, folder: Path, devices: int, rounds: int, minimum: int, audit: dict[str, int]
) -> tuple[Any, int, dict[str, Any]]:
    """Agents on churn slices and a plain job with reference rows (what an audit needs): the API, the job id
    and the data schema."""
    paths, ref, schema = churn_slices(folder, devices)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    spec = small_spec(schema, rounds=rounds, target=devices, minimum=minimum, secure=False)
    spec["audit"] = audit
    api = coord.api()
    job_id = api.json("POST", "/v1/jobs", json=spec)["id"]
    api.request("PUT", f"/v1/jobs/{job_id}/reference", content=ref.read_bytes())
    return api, job_id, schema


def test_killed_worker_leaves_its_audit_to_another_and_every_version_is_audited_once(
    coord: Coordinator, tmp_path: Path
) -> None:
    api, job_id, schema = _audited_job(
        coord, tmp_path / "data", 3, 2, 2, {"rows": 300, "background": 50, "validate_rows": 5}
    )

    doomed = _worker(coord, "doomed", tmp_path / "doomed.log")

    def doomed_is_auditing() -> dict | None:
        for a in api.json("GET", f"/v1/jobs/{job_id}/audits"):
            if a["status"] == "running" and a["worker"] == "doomed":
                return a  # type: ignore[no-any-return]
        return None

    taken = wait_for(doomed_is_auditing, 120, "the first worker to take an audit", interval=0.02)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)

    survivor = _worker(coord, "survivor", tmp_path / "survivor.log")
    try:
        coord.wait_job(job_id, timeout=300)
        versions = [v["version"] for v in api.json("GET", f"/v1/jobs/{job_id}/models")]
        assert versions == [0, 1, 2]

        def all_done() -> list | None:
            rows = api.json("GET", f"/v1/jobs/{job_id}/audits")
            return rows if sorted(a["version"] for a in rows if a["status"] == "done") == versions else None

        audits = wait_for(all_done, 180, "every version's audit", interval=0.3)
    finally:
        survivor.send_signal(signal.SIGTERM)
        survivor.wait(timeout=60)
    assert survivor.returncode == 0, (tmp_path / "survivor.log").read_text()[-2000:]
    by_version = {a["version"]: a for a in audits}
    retaken = by_version[taken["version"]]
    assert retaken["worker"] == "survivor" and retaken["attempts"] == 2
    assert all(a["verdict"] in ("ok", "drift") for a in audits)
    assert all(a["attempts"] == 1 for v, a in by_version.items() if v != taken["version"])

    env = {**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    plots = tmp_path / "plots"
    out = subprocess.run(
        py("server", "audit", "show", str(job_id), "--version", "2", "--plot", str(plots), "--json"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    report = shown["report"]
    assert shown["version"] == 2 and report["previous_version"] == 1
    assert set(report["importance"]) == {f["name"] for f in schema["features"]}
    assert report["top_features"] and report["drift"]["rank_correlation"] is not None
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)

    text = subprocess.run(py("server", "jobs", "show", str(job_id)), capture_output=True, text=True, env=env)
    assert text.returncode == 0 and "audit:" in text.stdout and "version 2:" in text.stdout

    missing = subprocess.run(
        py("server", "audit", "show", str(job_id), "--version", "9"), capture_output=True, text=True, env=env
    )
    assert missing.returncode == 1 and "no audit of version 9" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_server_started_with_an_audit_worker_audits_every_version(tmp_path: Path) -> None:
    import psutil

    coord = Coordinator(tmp_path, extra=["--with-audit-worker"])
    coord.bootstrap()
    coord.start()
    assert coord.proc is not None
    workers = [
        p
        for p in psutil.Process(coord.proc.pid).children()
        if "worker" in p.cmdline() and "audit" in p.cmdline()
    ]
    try:
        assert len(workers) == 1
        api, job_id, _ = _audited_job(
            coord, tmp_path / "data", 2, 1, 2, {"rows": 200, "background": 40, "validate_rows": 0}
        )
        coord.wait_job(job_id, timeout=240)

        def audited() -> list | None:
            rows = api.json("GET", f"/v1/jobs/{job_id}/audits")
            return rows if [a["status"] for a in rows] == ["done", "done"] else None

        wait_for(audited, 180, "the server's own audit worker")
    finally:
        coord.stop_agents()
        coord.stop()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive  # the worker stops with the server
