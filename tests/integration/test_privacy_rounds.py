"""Differential privacy in real jobs (docs/privacy.md): device level under SecAgg+, central level in plaintext.

What is proved: a secure job with device-level DP and devices dropping at every stage runs through the real
engine and device code, and each round's new version is exactly the old plus the decoded sum of the noised
vectors the devices masked, over their count; epsilon stored with each round equals the accountant's,
computed here from the job's own settings; a job whose next round would pass its target epsilon ends,
with the reason, never overspending; a central round clips every update and adds the noise; the API
and the CLI show epsilon.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import registry
from coordinator.engine import Federation
from coordinator.models import Job, Round
from server.simulation import job as sim_job
from server.simulation import whole_job
from server.simulation.splits import parse_split
from server.simulation.whole_job import SimulationOptions, simulate_job
from shared.jobspec import validate_spec
from shared.privacy import QuantileClip, SkellamParams, honest_floor
from shared.privacy.accounting import epsilon, gaussian_round, skellam_round

from .test_engine_store import current_round, enroll, fed, open_train_round, run_stats_round, spec, update

__all__ = ["fed"]  # the fixture, imported for its side effect on pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DELTA = 1e-5
Z = 0.8
CLIP = 0.5


def dp_churn(level: str = "device", target_epsilon: float = 100.0, rounds: int = 3, **privacy: Any) -> dict:
    """examples/churn.toml, small, with differential privacy at ``level``."""
    out = tomllib.loads((ROOT / "examples" / "churn.toml").read_text())
    out["model"]["hidden"] = [16]
    out["training"]["epochs"] = 1
    out["rounds"] = rounds
    out["secure"] = level == "device"
    out["evaluation"] = {"federated": False}
    out["privacy"] = {
        "level": level,
        "target_epsilon": target_epsilon,
        "delta": DELTA,
        "clip": CLIP,
        "noise_multiplier": Z,
        **privacy,
    }
    return out


def drop_at_every_stage(devices: Any, stages: Any, rate: float, rng: Any) -> dict[str, int]:
    """The first devices of each cohort drop, one at each stage of the round (the draw, made certain)."""
    return {d: i for i, d in enumerate(sorted(devices)[: len(stages)])}


def keep_rounds(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the simulated job's database holds of its training rounds, read before the scratch
    federation goes: each round's privacy record and SecAgg+ state, version 0's size, and the model
    before and after the first training round."""
    stored: dict[str, Any] = {}
    summarize = whole_job.summarize

    def keep_rows(fed: Federation, job_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        with fed.read() as s:
            rounds = list(
                s.query(Round).filter(Round.job_id == job_id, Round.kind == "train").order_by(Round.number)
            )
            stored["privacy"] = [r.privacy for r in rounds]
            stored["sent"] = [(r.secagg or {}).get("privacy") for r in rounds]
            stored["dim"] = registry.get_version(s, job_id, 0).num_parameters
            first = rounds[0]
            stored["moved"] = [
                fed.vector(job_id, registry.get_version(s, job_id, v))[1].astype(np.float64)
                for v in (first.model_version_in, first.model_version_out)
            ]
        return summarize(fed, job_id, *args, **kw)

    monkeypatch.setattr(whole_job, "summarize", keep_rows)
    return stored


def test_the_adaptive_clip_follows_the_noised_count_into_the_next_round_s_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored = keep_rounds(monkeypatch)
    opts = SimulationOptions(
        devices=10, split=parse_split("group"), dropout=0.0, rounds=3, seed=3, ceiling=False
    )
    spec = dp_churn(adaptive_quantile=0.5, indicator_noise=2.0, clip_learning_rate=0.5)
    summary = simulate_job(validate_spec(spec), opts, None)

    assert summary["status"] == "completed", summary["reason"]
    assert all(c["exact"] and c["max_abs_error"] == 0.0 for c in summary["simulation"]["secagg_checks"])
    records, sent = stored["privacy"], stored["sent"]
    assert records[0]["clip"] == sent[0]["clip"] == CLIP
    for before, after, task in zip(records, records[1:], sent[1:], strict=False):
        # Andrew et al.: C <- C exp(-eta (b - gamma)), b the noised fraction under the clip.
        want = QuantileClip(before["clip"], 0.5, 0.5, 2.0).next(before["fraction_under"]).clip
        assert after["clip"] == task["clip"] == pytest.approx(want, rel=1e-12)
        assert task["indicator_noise"] == 2.0
    assert len({r["clip"] for r in records}) == 3  # the clip moved every round
    # The noised fraction is the true one (in [0, 1]) plus the count's noise over the 10 devices; that
    # noise has the variance of all 10 shares, each sized for min_contributors: within 6 deviations.
    params = SkellamParams(
        clip=CLIP,
        bits=16,
        dim=stored["dim"],
        noise_multiplier=Z,
        min_contributors=honest_floor(3, 0.1),
        indicator_noise=2.0,
    )
    spread = 6 * params.indicator_std * (10 / params.min_contributors) ** 0.5 / 10
    assert all(-spread < r["fraction_under"] < 1 + spread for r in records), (spread, records)


def test_device_dp_with_dropouts_at_every_stage_reconstructs_the_noised_sum_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sim_job, "draw_dropouts", drop_at_every_stage)
    stored = keep_rounds(monkeypatch)
    opts = SimulationOptions(
        devices=12, split=parse_split("group"), dropout=0.45, rounds=3, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_churn()), opts, tmp_path / "out")

    assert summary["status"] == "completed", summary["reason"]
    sim = summary["simulation"]
    assert sim["silent_answers"] > 0 and sim["deadlines_waited_out"] > 0  # the drops were real
    checks = sim["secagg_checks"]
    assert [c["round"] for c in checks] == [1, 2, 3]
    for c in checks:
        # Exact: the new version is old + decoded(sum of noised_input vectors) / count, to the bit. The
        # device that drops at unmask is in the sum; those that drop before their masked input are not.
        assert c["max_abs_error"] == 0.0 and c["exact"], c
        assert c["summed"] == 12 - 4, c  # silent from configure, advertise_keys, share_keys, masked_input

    # Epsilon stored with each round: the accountant's, from the job's settings, computed here.
    params = SkellamParams(
        clip=CLIP, bits=16, dim=stored["dim"], noise_multiplier=Z, min_contributors=honest_floor(3, 0.1)
    )
    want = [epsilon([skellam_round(params)] * i, DELTA) for i in (1, 2, 3)]
    assert [p["epsilon"] for p in stored["privacy"]] == pytest.approx(want, rel=1e-12)
    assert [p["contributors"] for p in stored["privacy"]] == [8, 8, 8]
    # The noise is in the model: each of the 8 contributors added Skellam(variance / min_contributors) to
    # every coordinate; over the scale and the count that is the spread of the mean delta (the clipped
    # updates themselves add at most clip / sqrt(dim) per coordinate on average, about 1/6 of it).
    v0, v1 = stored["moved"]
    noise_std = (8 * params.local_variance) ** 0.5 / params.scale / 8
    assert (v1 - v0).std() == pytest.approx(noise_std, rel=0.15)
    assert [r["privacy"]["epsilon"] for r in summary["rounds"]] == [p["epsilon"] for p in stored["privacy"]]
    for r in summary["rounds"]:
        assert r["privacy"]["level"] == "device" and r["privacy"]["trusts_coordinator"] is False
        assert (r["privacy"]["delta"], r["privacy"]["noise_multiplier"], r["privacy"]["clip"]) == (
            DELTA,
            Z,
            CLIP,
        )
    assert summary["privacy"]["epsilon"] == pytest.approx(want[-1], rel=1e-12)
    assert (summary["privacy"]["rounds_spent"], summary["privacy"]["target_epsilon"]) == (3, 100.0)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (
        written["privacy"] == summary["privacy"]
        and written["rounds"][2]["privacy"] == summary["rounds"][2]["privacy"]
    )


def test_a_job_whose_next_round_would_pass_the_budget_ends_with_the_reason(tmp_path: Path) -> None:
    # Epsilon after 2 rounds is 9.34 and after 3 would be 11.8: a target of 10 allows two.
    opts = SimulationOptions(
        devices=8, split=parse_split("group"), dropout=0.0, rounds=3, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_churn(target_epsilon=10.0)), opts, None)

    assert summary["status"] == "completed"
    assert summary["reason"].startswith("privacy budget: one more round would spend epsilon 11.")
    assert "> target_epsilon 10" in summary["reason"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]  # the third round never opened
    spent = [r["privacy"]["epsilon"] for r in summary["rounds"]]
    assert spent[0] < spent[1] <= 10.0 == summary["privacy"]["target_epsilon"]
    assert summary["privacy"]["epsilon"] == spent[1]


def test_a_central_dp_job_runs_with_the_agents_code_and_says_it_trusts_the_coordinator() -> None:
    opts = SimulationOptions(
        devices=8, split=parse_split("group"), dropout=0.0, rounds=2, seed=3, ceiling=False
    )
    summary = simulate_job(validate_spec(dp_churn("central", rounds=2)), opts, None)

    assert summary["status"] == "completed" and summary["reason"] is None
    assert summary["secure"] is False and summary["simulation"]["secagg_checks"] == []
    want = [epsilon([gaussian_round(Z)] * i, DELTA) for i in (1, 2)]
    assert [r["privacy"]["epsilon"] for r in summary["rounds"]] == pytest.approx(want, rel=1e-12)
    assert all(r["privacy"]["trusts_coordinator"] is True for r in summary["rounds"])
    assert summary["privacy"]["trusts_coordinator"] is True and summary["privacy"]["level"] == "central"


def central_spec(**privacy: Any) -> dict:
    out = {**spec(rounds=2, target=3, minimum=3), "evaluation": {"federated": False}}
    out["model"] = {"zoo": "mlp", "hidden": [256]}  # a thousand parameters: the noise's spread is measured
    out["privacy"] = {"level": "central", "target_epsilon": 50.0, "delta": DELTA, "clip": CLIP, **privacy}
    return out


def test_central_dp_clips_every_update_and_adds_the_noise(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(central_spec(noise_multiplier=1.0), "op")
    run_stats_round(fed, job.id, devices)
    with fed.read() as s:
        _, w0 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 0))
    tasks = open_train_round(fed, devices)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=w0.size)
    direction /= np.linalg.norm(direction)
    # Each update 100 clips long, along the same direction: clipped, each adds exactly CLIP * direction.
    for d, t in tasks.items():
        fed.devices.update(d, t.round_id, update(t.round_id, (100 * CLIP * direction).astype(np.float32), 1))
    r = current_round(fed, job.id)
    assert r.status == "completed", r.reason
    with fed.read() as s:
        _, w1 = registry.load_vector(fed.blobs, registry.get_version(s, job.id, 1))
    residual = (w1.astype(np.float64) - w0) - CLIP * direction  # the noise over the 3 devices
    # The noise: N(0, (z * clip)**2) on the sum, so std z * clip / 3 on the mean; without clipping the
    # residual would be 99 clips along the direction.
    assert residual.std() == pytest.approx(1.0 * CLIP / 3, rel=0.15)
    assert abs(float(residual @ direction)) < 6 * CLIP / 3
    assert r.privacy is not None and r.privacy["trusts_coordinator"] is True
    assert r.privacy["epsilon"] == pytest.approx(epsilon([gaussian_round(1.0)], DELTA), rel=1e-12)
    assert r.privacy["clip"] == CLIP and r.privacy["contributors"] == 3


def test_submission_refuses_a_device_job_whose_noised_sum_could_wrap(fed: Federation) -> None:
    from shared.jobspec import JobSpecError

    job = {**central_spec(noise_multiplier=1e15), "secure": True}
    job["privacy"] = {**job["privacy"], "level": "device"}
    with pytest.raises(JobSpecError, match=r"privacy: the noised sum of 3 devices could wrap modulo 2\*\*64"):
        fed.jobs.submit(job, "op")
    with fed.read() as s:
        assert s.query(Job).count() == 0


def test_round_privacy_migration_goes_down_and_up(database_url: str) -> None:
    """0007 adds ``rounds.privacy``; down to 0006 removes it, and up again restores it (both databases)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from coordinator.store import MIGRATIONS, make_engine, migrate

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = make_engine(database_url)
    try:
        migrate(engine)

        def columns() -> set[str]:
            return {c["name"] for c in inspect(engine).get_columns("rounds")}

        assert "privacy" in columns()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        assert "privacy" not in columns()
        migrate(engine)
        assert "privacy" in columns()
    finally:
        engine.dispose()
