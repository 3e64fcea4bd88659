"""``aicfl simulate JOB.toml``: whole jobs with virtual devices through the real engine and device code.

What is proved: a secure job with dropouts drawn in every round runs to its end through the
coordinator engine's own rules, every SecAgg+ round's new version is the exact mean of the clipped
updates the coordinator summed, and summary.json carries the demo's fields; a plaintext job
runs too; bad flags are one line; and the same job runs with its devices on Ray actors or in
worker processes of this machine, dropouts included (a device's secrets stay in its process).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from server.simulation.splits import parse_split
from server.simulation.whole_job import SimulationOptions, simulate_job
from shared.jobspec import load_spec, validate_spec
from tests.fixtures.summary import ROUND_FIELDS, SUMMARY_FIELDS
from tests.integration import test_cli as cli

ROOT = Path(__file__).resolve().parents[2]
CHURN = ROOT / "examples" / "churn.toml"


def small_churn(tmp_path: Path, **changes: Any) -> Path:
    """examples/churn.toml with a smaller network and ``changes`` (top-level keys)."""
    spec = tomllib.loads(CHURN.read_text())
    spec["model"]["hidden"] = [16]
    spec["training"]["epochs"] = 1
    spec.update(changes)
    validate_spec({**spec, "evaluation": {}})
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(spec))
    return path


def test_secure_job_with_dropouts_ends_exact_and_writes_the_demo_summary(tmp_path: Path) -> None:
    opts = SimulationOptions(
        devices=20, split=parse_split("group"), dropout=0.2, rounds=2, seed=3, ceiling=False
    )
    summary = simulate_job(load_spec(small_churn(tmp_path)), opts, tmp_path / "out")

    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(
        json.dumps(summary, default=str)
    )
    assert set(summary) >= SUMMARY_FIELDS
    assert (summary["status"], summary["secure"], summary["devices"], summary["final_version"]) == (
        "completed",
        True,
        20,
        2,
    )
    assert [r["round"] for r in summary["rounds"]] == [1, 2]  # the statistics round is round 0
    for r in summary["rounds"]:
        assert set(r) == ROUND_FIELDS
        assert (r["status"], r["secure"], r["participants"]) == ("completed", True, 20)
        assert 0 <= r["dropped"] <= 4  # 4 of 20 drop; those that drop at unmask are not counted
        assert {"auc", "accuracy", "loss"} <= set(r["central"]) and r["central"]["examples"] == 1000
        assert r["federated"]["examples"] > 0
    sim = summary["simulation"]
    assert sim["silent_answers"] > 0 and sim["deadlines_waited_out"] > 0  # the drops were real
    checks = sim["secagg_checks"]
    assert [c["round"] for c in checks] == [1, 2] and sim["secagg_exact"] is True
    for c in checks:
        assert c["max_abs_error"] <= c["bound"] and 16 <= c["summed"] <= 20
    assert 0.0 < summary["final"]["auc"] <= 1.0 and summary["final"]["examples"] == 1000
    assert summary["ceiling"] is None and "ceiling" in summary["skipped"]
    assert summary["pretrain"] is None and summary["baseline"] is None and summary["audits"] == []


def test_plain_job_over_iid_rows_through_the_cli_prints_its_summary_as_json(tmp_path: Path) -> None:
    job = small_churn(tmp_path, secure=False)
    shown = cli.aicfl(
        "simulate", str(job), "--devices", "8", "--rounds", "1", "--split", "rows", "--no-ceiling", "--json"
    )
    assert shown.code == 0 and shown.err == "", shown
    out = json.loads(shown.out)
    assert (out["status"], out["secure"], out["simulation"]["split"]) == ("completed", False, "rows")
    assert out["simulation"]["device_rows"]["max"] - out["simulation"]["device_rows"]["min"] <= 1
    assert out["rounds"][0]["participants"] == 8 and out["rounds"][0]["secure"] is False
    assert out["simulation"]["secagg_checks"] == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--split", "rows"], "--split is for the whole-job simulation, which needs a JOB.toml"),
        ([str(CHURN), "--params", "100"], "--params is for the protocol simulation, which takes no JOB.toml"),
        ([str(CHURN), "--split", "dirichlet:x"], "dirichlet needs a concentration"),
        ([str(CHURN), "--split", "group:planet"], "no column 'planet'"),
        ([str(CHURN), "--devices", "20000"], "cannot give 20000 devices a row each"),
        ([str(CHURN), "--cohort", "1"], "--cohort 1: must be between 2 and --devices"),
        ([str(CHURN), "--data", "nosuch"], "neither a bundled data set"),
        (["nosuch.toml"], "nosuch.toml"),
    ],
)
def test_bad_simulation_flags_are_refused_in_one_line(args: list[str], fragment: str) -> None:
    cli.assert_one_error_line(cli.aicfl("simulate", *args), fragment)


@pytest.mark.slow
def test_devices_on_ray_actors_run_the_same_job(tmp_path: Path) -> None:
    opts = SimulationOptions(
        devices=6,
        split=parse_split("dirichlet:1"),
        rounds=1,
        seed=1,
        ceiling=False,
        ray_address="local",
        ray_actors=2,
    )
    summary = simulate_job(load_spec(small_churn(tmp_path)), opts)
    assert summary["status"] == "completed" and summary["simulation"]["engine"] == "ray (2 actors)"
    assert summary["simulation"]["secagg_exact"] is True
    assert summary["rounds"][0]["participants"] == 6


@pytest.mark.slow
def test_devices_in_local_processes_run_the_job_with_dropouts(tmp_path: Path) -> None:
    opts = SimulationOptions(
        devices=8,
        split=parse_split("rows"),
        dropout=0.2,
        rounds=2,
        seed=3,
        ceiling=False,
        processes=2,
    )
    summary = simulate_job(load_spec(small_churn(tmp_path)), opts)
    sim = summary["simulation"]
    assert summary["status"] == "completed" and sim["engine"] == "2 local processes", sim
    assert sim["secagg_exact"] is True
    assert [r["status"] for r in summary["rounds"]] == ["completed"] * 2
    # Dropouts were drawn and the engine counted them (every stage's deadline passed for someone).
    assert sim["silent_answers"] > 0 and sim["deadlines_waited_out"] > 0, sim


def test_processes_and_ray_together_are_refused_in_one_line() -> None:
    cli.assert_one_error_line(
        cli.aicfl("simulate", str(CHURN), "--processes", "2", "--ray-address", "local"),
        "--processes and --ray-address",
    )
