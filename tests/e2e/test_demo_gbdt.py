"""`aicfl demo --model gbdt` end to end at a small size: trees grown by real agent processes over
HTTP under SecAgg+, beside H2O AutoML on the central rows, then its summary.json."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from server.demo import NO_PRETRAINED_TREES, gbdt_audit_refusal

pytestmark = pytest.mark.slow

#: The smallest gbdt demo: 3 devices, 2 boosting rounds, AutoML's budget as in tests/e2e/test_demo.py.
DEMO = "demo --model gbdt --devices 3 --rounds 2 --automl-secs 20"


def test_gbdt_demo_grows_a_version_per_boosting_round_beside_automl(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "server", *DEMO.split(), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    assert summary["model"] == "gbdt" and summary["dataset"] == "mlc_churn" and summary["devices"] == 3
    assert summary["headline"] == "auc" and summary["secure"] is True
    # A version per boosting round, each registered by the level round that finished its tree and
    # measured centrally on the test rows; every level summed under SecAgg+ from all three devices.
    rounds = summary["rounds"]
    assert [r["boosting_round"] for r in rounds] == [1, 2] and summary["final_version"] == 2
    for r in rounds:
        assert r["status"] == "completed" and r["secure"] and r["participants"] == 3 and r["dropped"] == 0
        assert 0.8 < r["central"]["auc"] <= 1.0 and r["central"]["examples"] == 1000
    tree_rounds = summary["tree_rounds"]
    assert tree_rounds["bins_completed"] == 1 and 2 <= tree_rounds["level_completed"] <= 2 * 4
    trees = summary["gbdt"]
    assert (trees["trees"], trees["boosting_rounds"], trees["max_depth"]) == (2, 2, 4)
    assert trees["objective"] == "binary:logistic" and 2 < trees["leaves"] <= 2 * 2**4

    # The final ensemble is the last version, well above chance and near XGBoost's own on the pooled rows.
    final, ceiling = summary["final"], summary["ceiling"]
    assert final["auc"] == pytest.approx(rounds[-1]["central"]["auc"], abs=1e-9)
    assert final["auc"] > 0.85 and abs(final["auc"] - ceiling["auc"]) < 0.03
    assert ceiling["examples"] == final["examples"] == 1000

    # AutoML beside the trees, on the same test rows, and the verdict the issue asks for.
    base = summary["baseline"]
    assert base["leader"] and 0.5 < base["metrics"]["auc"] <= 1.0
    assert base["metrics"]["examples"] == final["examples"] and base["federated_final"] == final
    assert base["gap_to_leader"] == pytest.approx(final["auc"] - base["metrics"]["auc"])
    assert base["federated_beats_leader"] is (final["auc"] > base["metrics"]["auc"])
    assert ("beats the AutoML leader" in proc.stdout) is base["federated_beats_leader"]

    # No pre-training of trees, said so; audits of every version once the spec accepts them.
    assert summary["pretrain"] is None and summary["skipped"]["pretrain"] == NO_PRETRAINED_TREES
    assert not (out / "logs" / "pretrain.log").exists() and "skipped pretrain:" in proc.stdout
    refusal = gbdt_audit_refusal()
    if refusal is None:
        audits = summary["audits"]
        assert [a["version"] for a in audits] == [0, 1, 2] and "audits" not in summary["skipped"]
        assert all(a["verdict"] in ("ok", "drift") and a["top_features"] for a in audits)
    else:
        assert summary["audits"] == [] and refusal in summary["skipped"]["audits"]

    # The three agents' own processes took part in the binning and the level rounds' SecAgg+ sums.
    logs = sorted((out / "logs").glob("agent-*.log"))
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        assert "(bins): stage masked_input" in text and "(level): stage masked_input" in text

    curve = (out / "learning_curve.png").read_bytes()
    assert curve.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", curve[16:24]) == (800, 500)
    assert not {"learning_curve", "ceiling_benchmark", "baseline"} & set(summary["skipped"])
