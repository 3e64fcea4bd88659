"""loadtests/run.py drives locust devices through a whole SecAgg+ job and reports it truthfully.

A real coordinator (SQLite), real locust (``RoundDeviceUser``: Ed25519-signed
requests, the model download and signature check, SecAgg+ advertise, share
keys, masked input of a synthetic update, unmask), and the report's exactness
check against the models the coordinator registered.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Not imported here: locust patches the standard library (gevent) when imported.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason='needs "aicfl[load]" (locust)'
)

REPO = Path(__file__).resolve().parents[2]
STAGES = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")


@pytest.mark.slow
def test_secure_round_under_locust_completes_exactly_with_no_failure(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # A quicker engine tick and in-round pace than the defaults: the same protocol, less waiting.
    env = dict(os.environ, AICFL_TICK_INTERVAL="0.05", AICFL_ACTIVE_RETRY="0.1", AICFL_POLL_RETRY="0.5")
    proc = subprocess.run(
        [
            sys.executable,
            "loadtests/run.py",
            "--scenario",
            "secure",
            "--devices",
            "6",
            "--params",
            "1000",
            "--rounds",
            "1",
            "--duration",
            "90s",
            "--db",
            "sqlite",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.html").stat().st_size > 0

    assert report["database"] == "sqlite"
    assert report["job_status"] == "completed"
    assert report["rounds_completed"] == 1
    train = [r for r in report["rounds"] if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["exact"] is True
    assert train[0]["max_abs_error"] <= train[0]["bound"]
    assert train[0]["inputs_recorded"] == 6  # every device's masked input was accepted and summed

    assert report["failures"] == 0
    requests = report["requests"]
    for stage in STAGES:
        row = requests[f"POST /v1/device/rounds/[id]/{stage}"]
        assert {"rps", "p50_ms", "p95_ms", "p99_ms"} <= set(row) and row["failures"] == 0, (stage, row)
        # Each device answers each stage of the statistics round and of the training round; a round
        # may end once every secret has t = 3 shares, before a slow device is asked to unmask.
        assert row["count"] == 12 if stage != "unmask" else 6 <= row["count"] <= 12, (stage, row)
    assert requests["GET /v1/device/jobs/[id]/models/[version]"]["count"] == 6
    assert requests["POST /v1/device/checkin"]["count"] > 6

    coordinator = report["coordinator"]
    assert coordinator["cpu_seconds"] > 0 and coordinator["peak_rss_mb"] > 0
    per = report["per_device_round"]
    assert per["coordinator_cpu_ms"] > 0
    # At least the masked input: 1001 uint64 values and its header.
    assert per["bytes_in"] > 8 * 1000 and per["bytes_out"] > 0
