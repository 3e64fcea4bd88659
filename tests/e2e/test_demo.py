"""The main job at a small size: `aicfl demo` end to end, then its summary.json."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_writes_a_complete_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "demo",
            "--devices",
            "3",
            "--rounds",
            "2",
            "--automl-secs",
            "20",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    assert summary["devices"] == 3 and summary["dataset"] == "mlc_churn"
    assert summary["secure"] is True and all(r["secure"] for r in summary["rounds"])
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert r["participants"] == 3 and r["dropped"] == 0
        assert r["aggregation_seconds"] > 0
        for metrics in (r["central"], r["federated"]):
            assert 0.5 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    for key in ("final", "ceiling"):
        assert set(summary[key]) >= {"accuracy", "auc"}
    # The final model is the last round's, measured on the same test rows as the central evaluation.
    assert summary["final"]["auc"] == pytest.approx(summary["rounds"][-1]["central"]["auc"], abs=1e-9)
    # Two rounds already beat the majority class rate of the churn data (about 0.86).
    assert summary["final"]["auc"] > 0.75
    assert summary["agent_peak_rss_mb"]["max"] > 0
    # The agents' logs show the real processes took part.
    logs = list((out / "logs").glob("agent-*.log"))
    assert len(logs) == 3 and all("stage input" in p.read_text() for p in logs)

    # The central cluster: version 0 pre-trained by two Horovod ranks on the pooled central rows,
    # the AutoML leader measured on the same test rows as the federated model, and every version audited.
    pre = summary["pretrain"]
    assert pre["world_size"] == 2 and pre["epochs"] == 10 and pre["metrics"]["central"]["auc"] > 0.6
    base = summary["baseline"]
    assert base["leader"] and 0.5 < base["metrics"]["auc"] <= 1.0
    assert base["metrics"]["examples"] == summary["final"]["examples"]  # the same held-out rows
    assert base["federated_final"] == summary["final"]
    audits = summary["audits"]
    assert [a["version"] for a in audits] == [0, 1, 2] and summary["final_version"] == 2
    for a in audits:
        assert a["verdict"] in ("ok", "drift") and len(a["top_features"]) == 5 and a["seconds"] > 0
    assert audits[0]["rank_correlation_to_previous"] is None
    assert all(-1.0 <= a["rank_correlation_to_previous"] <= 1.0 for a in audits[1:])
    assert summary["audit_timing"]["mean_audit_seconds"] > 0
    assert (out / "central.csv").exists() and (out / "logs" / "pretrain.log").exists()

    # The learning curve beside the summary: the headline metric per round against the leader,
    # version 0 and the ceiling.
    curve = (out / "learning_curve.png").read_bytes()
    assert curve.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", curve[16:24]) == (800, 500)
    assert f"learning curve written to {out.resolve() / 'learning_curve.png'}" in proc.stdout
    assert not {"learning_curve", "ceiling_benchmark"} & set(summary["skipped"])


def test_demo_with_more_devices_than_groups_fails_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "demo",
            "--devices",
            "64",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --devices 64:") and "Traceback" not in proc.stderr
