"""The non-tabular example end to end: `aicfl demo --dataset digits` at a small size, then its
summary.json, which has the churn demo's fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.summary import SUMMARY_FIELDS

pytestmark = pytest.mark.slow


def test_digits_demo_trains_the_example_app_under_secagg_and_reports_it_beside_its_ceiling(
    tmp_path: Path,
) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "server", "demo", "--dataset", "digits", "--devices", "3", "--rounds", "3",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    assert set(summary) == SUMMARY_FIELDS
    assert (summary["devices"], summary["dataset"], summary["headline"]) == (3, "digits", "accuracy")
    assert summary["secure"] is True and all(r["secure"] for r in summary["rounds"])
    assert len(summary["rounds"]) == 3 and summary["final_version"] == 3
    for r in summary["rounds"]:
        assert r["status"] == "completed" and r["participants"] == 3 and r["dropped"] == 0
        assert r["aggregation_seconds"] > 0
        assert 0.0 <= r["central"]["accuracy"] <= 1.0 and 0.0 <= r["federated"]["accuracy"] <= 1.0
    # The final model is the last round's, measured on the same 359 test images as the central evaluation
    # and as the ceiling, the same CNN trained on every device's images pooled.
    final, ceiling = summary["final"], summary["ceiling"]
    assert set(final) == set(ceiling) == {"loss", "accuracy", "examples"}
    assert final["examples"] == ceiling["examples"] == 359
    assert final["accuracy"] == pytest.approx(summary["rounds"][-1]["central"]["accuracy"], abs=1e-9)
    # Ten classes: chance is 0.1. Three rounds of label-skewed devices already get well past it.
    assert final["accuracy"] > 0.6, final
    assert ceiling["accuracy"] > 0.9, ceiling
    assert (
        f"accuracy: final {final['accuracy']:.4g} against the ceiling's {ceiling['accuracy']:.4g}"
        f" (gap {final['accuracy'] - ceiling['accuracy']:+.4f})" in " ".join(proc.stdout.split())
    )
    # The cluster's table-reading steps are skipped with their reasons, the audit is off by default.
    assert summary["pretrain"] is None and summary["baseline"] is None and summary["audits"] == []
    assert set(summary["skipped"]) == {"pretrain", "baseline", "audits"}
    assert "training_cluster/automl.py" in summary["skipped"]["baseline"]
    assert summary["agent_peak_rss_mb"]["max"] > 0

    # Real agents, each with its own device file, took part in every SecAgg+ stage.
    for i in range(3):
        log = (out / "logs" / f"agent-{i:02d}.log").read_text()
        assert "stage masked_input" in log and "stage unmask" in log
        assert (out / "devices" / f"device-{i:02d}" / "data.npz").exists()
    assert (out / "reference.npz").exists() and 'app = "digits_cnn:app"' in (out / "job.toml").read_text()


def test_digits_refuses_a_cluster_step_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server", "demo", "--dataset", "digits", "--pretrain", "--out",
         str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --pretrain is not available for --dataset digits:")
    assert "Traceback" not in proc.stderr
