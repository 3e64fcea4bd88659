"""Example-level differential privacy in real jobs (docs/privacy.md): DP-SGD on every device, through the
real engine and the agent's code in the whole-job simulation.

What is proved: each round's stored epsilon is, for every device, epsilon of its own ledger (the
``dpsgd_costs`` of every round its update was in) computed here from the job's settings, and the round's
is the largest; every update counts with weight 1; a job whose next round would pass its target for some
device ends with the reason, never overspending; the same under SecAgg+; a device whose DP-SGD report
differs from what the job asked is refused with the reason and charged nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from client_agent.worker import Worker
from coordinator import registry
from coordinator.engine import Federation
from coordinator.models import Participant, Round
from server.simulation import whole_job
from server.simulation.splits import parse_split
from server.simulation.whole_job import SimulationOptions, simulate_job
from shared.jobspec import validate_spec
from shared.privacy.accounting import dpsgd_costs, epsilon

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
Z = 1.2
CLIP = 1.0
STEPS_PER_EPOCH = 4
STEPS = STEPS_PER_EPOCH  # one epoch a round
Q = 1 / STEPS_PER_EPOCH


def round_eps(rounds: int) -> float:
    """Epsilon of a device whose update was in ``rounds`` rounds, straight from the accountant."""
    return epsilon(dpsgd_costs(Z, Q, STEPS) * rounds, DELTA)


def dp_sgd_churn(target_epsilon: float = 100.0, rounds: int = 3, secure: bool = False) -> dict:
    """examples/churn.toml, small, with example-level differential privacy."""
    out = tomllib.loads((ROOT / "examples" / "churn.toml").read_text())
    out["model"]["hidden"] = [16]
    out["training"]["epochs"] = 1
    out["rounds"] = rounds
    out["secure"] = secure
    out["evaluation"] = {"federated": False}
    out["privacy"] = {
        "level": "example",
        "target_epsilon": target_epsilon,
        "delta": DELTA,
        "clip": CLIP,
        "noise_multiplier": Z,
        "steps_per_epoch": STEPS_PER_EPOCH,
    }
    return out


def keep_rounds(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the simulated job's database holds of its training rounds, read before the scratch federation
    goes: each round's privacy record, its participants' (status, reason) and the models in and out."""
    stored: dict[str, Any] = {}
    summarize = whole_job.summarize

    def keep_rows(fed: Federation, job_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        with fed.read() as s:
            rounds = list(
                s.query(Round).filter(Round.job_id == job_id, Round.kind == "train").order_by(Round.number)
            )
            stored["privacy"] = [r.privacy for r in rounds]
            stored["participants"] = [
                {
                    p.device_id: (p.status, p.reason)
                    for p in s.scalars(select(Participant).where(Participant.round_id == r.id))
                }
                for r in rounds
            ]
            stored["versions"] = [
                fed.vector(job_id, registry.get_version(s, job_id, v))[1].astype(np.float64)
                for v in (rounds[0].model_version_in, rounds[0].model_version_out)
            ]
        return summarize(fed, job_id, *args, **kw)

    monkeypatch.setattr(whole_job, "summarize", keep_rows)
    return stored


def test_each_round_charges_every_device_s_own_ledger_and_the_budget_stops_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = keep_rounds(monkeypatch)
    # A target between two and three rounds' epsilon: two rounds run, the third would pass it.
    target = (round_eps(2) + round_eps(3)) / 2
    opts = SimulationOptions(
        devices=5, split=parse_split("group"), dropout=0.0, rounds=3, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_sgd_churn(target, rounds=3)), opts, None)

    assert summary["status"] == "completed"
    assert summary["reason"].startswith(
        f"privacy budget: one more round would spend epsilon {round_eps(3):.4g}"
    )
    assert f"> target_epsilon {target:g}" in summary["reason"]
    assert summary["reason"].endswith(f"stopped after 2 noised rounds at epsilon {round_eps(2):.4g}")
    assert [r["round"] for r in summary["rounds"]] == [1, 2]  # the third round never opened
    records = stored["privacy"]
    for i, record in enumerate(records, start=1):
        devices = record["devices"]
        assert len(devices) == 5 and record["contributors"] == 5
        # Every device was in every round: its ledger is i rounds of DP-SGD; the round's the largest.
        assert record["device_epsilon"] == pytest.approx({d: round_eps(i) for d in devices}, rel=1e-12)
        assert record["epsilon"] == pytest.approx(round_eps(i), rel=1e-12)
        assert record["cost"] == {"noise_multiplier": Z, "sampling_rate": Q, "steps": STEPS}
    for r, record in zip(summary["rounds"], records, strict=True):
        assert r["privacy"] == {
            "level": "example",
            "epsilon": record["epsilon"],
            "delta": DELTA,
            "noise_multiplier": Z,
            "clip": CLIP,
            "trusts_coordinator": False,
        }
    assert summary["privacy"]["epsilon"] == records[-1]["epsilon"] <= target
    assert summary["privacy"]["rounds_spent"] == 2
    v0, v1 = stored["versions"]
    assert np.isfinite(v1).all() and not np.array_equal(v0, v1)  # the noised updates moved the model


def test_under_secure_aggregation_every_device_weighs_one_and_is_charged() -> None:
    opts = SimulationOptions(
        devices=5, split=parse_split("group"), dropout=0.0, rounds=2, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_sgd_churn(rounds=2, secure=True)), opts, None)

    assert summary["status"] == "completed", summary["reason"]
    checks = summary["simulation"]["secagg_checks"]
    # The simulation's check rebuilds each round's mean from the devices' plaintext updates with weight
    # 1 each (not their example counts): the unmasked sum matches it within SecAgg+'s quantisation.
    assert [c["round"] for c in checks] == [1, 2] and all(c["max_abs_error"] <= c["bound"] for c in checks)
    assert [r["privacy"]["epsilon"] for r in summary["rounds"]] == pytest.approx(
        [round_eps(1), round_eps(2)], rel=1e-12
    )


def test_a_device_reporting_other_dp_parameters_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = keep_rounds(monkeypatch)
    honest = Worker._dp_wire
    liars: list[str] = []

    def lying(self: Worker, task: Any) -> dict[str, float | int]:
        if not liars:
            liars.append(self.device_id)
        report = honest(self, task)
        return {**report, "noise_multiplier": 0.3} if self.device_id in liars else report

    monkeypatch.setattr(Worker, "_dp_wire", lying)
    opts = SimulationOptions(
        devices=4, split=parse_split("group"), dropout=0.0, rounds=2, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_sgd_churn(rounds=2)), opts, None)

    assert summary["status"] == "completed", summary["reason"]
    (liar,) = liars
    for participants, record in zip(stored["participants"], stored["privacy"], strict=True):
        status, reason = participants[liar]
        assert status == "excluded"
        assert (
            reason
            == f"update refused: DP-SGD report differs from the job's: noise_multiplier 0.3 (asked {Z})"
        )
        assert liar not in record["devices"] and record["contributors"] == 3  # charged nothing
    # The liar's ledger is empty; the others' hold both rounds.
    assert stored["privacy"][-1]["device_epsilon"] == pytest.approx(
        {d: round_eps(2) for d in stored["privacy"][-1]["devices"]}, rel=1e-12
    )
