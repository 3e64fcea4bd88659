"""TensorFlow Federated's side of the DP bench (bench/tff_peer.py) runs and cleans up after itself.

Runs only where TFF's own virtualenv exists (scripts/install_tff.sh builds it): TFF's FedAvg over
three churn devices for two rounds, from the same preprocessed arrays and version 0 the bench
writes, in TFF's venv, as the bench runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
TFF_PYTHON = ROOT / ".venv-tff" / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not TFF_PYTHON.exists(),
        reason="TensorFlow Federated's venv .venv-tff is absent: build it with scripts/install_tff.sh",
    ),
]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tff_peer", ROOT / "bench" / "tff_peer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tff_fedavg_on_three_devices_reports_sane_rounds_and_leaves_no_worker_binary(
    tmp_path: Path,
) -> None:
    from shared.jobspec import load_spec

    bench = _bench()
    before = set(bench.worker_binaries())
    args = argparse.Namespace(
        job=str(bench.JOB), data="mlc_churn", split="rows", devices=3, seed=7, rounds=2, dp=False
    )
    config = bench.write_inputs(load_spec(args.job), args, tmp_path)
    assert len(config["train_examples"]) == 3

    report = bench.run_tff_side(tmp_path, TFF_PYTHON, timeout=120)

    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["finite"]
    for row in report["rounds"]:
        assert math.isfinite(row["loss"]) and math.isfinite(row["train_loss"])
        assert 0.0 <= row["auc"] <= 1.0
        assert 0.0 <= row["accuracy"] <= 1.0
    # Three devices of about 900 churn rows each reach well above chance in two rounds.
    assert report["final_auc"] > 0.6
    assert report["leftover_worker_binaries"] == []
    assert set(bench.worker_binaries()) <= before
