"""Device-level differential privacy over real HTTP with real agent processes (docs/privacy.md).

What is proved: agents noise their updates (``noised_input``) under SecAgg+ as the round's task says,
the coordinator unmasks and decodes the noised sum, each round's epsilon is stored with it and the
budget ends the job; the API, `aicfl rounds list` and `aicfl jobs show` show epsilon spent.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from shared.api_client import CliError
from tests.integration import test_cli as cli

from .harness import Coordinator, churn_slices, small_spec

pytestmark = pytest.mark.slow


def test_real_agents_run_a_device_dp_job_until_its_budget_ends_it(coord: Coordinator, tmp_path: Path) -> None:
    paths, _, schema = churn_slices(tmp_path / "data", 3)
    with ThreadPoolExecutor(3) as pool:  # each enrolment is a process of its own: at once
        homes = list(pool.map(lambda ip: coord.enroll(ip[1], f"a{ip[0]}"), enumerate(paths)))
    for home in homes:
        coord.run_agent(home)
    spec = {
        **small_spec(schema, rounds=2, target=3, minimum=3, stage_timeout=15, selection_timeout=1),
        "evaluation": {"federated": False},
        # z = 1.5: epsilon 2.99 after a round, 4.43 after two; a target of 4 allows one.
        "privacy": {
            "level": "device",
            "target_epsilon": 4.0,
            "delta": 1e-5,
            "clip": 0.5,
            "noise_multiplier": 1.5,
        },
    }
    # Bad privacy settings are refused at submission, over HTTP too, naming the field.
    example = {**spec, "privacy": {**spec["privacy"], "level": "example"}}
    with pytest.raises(CliError, match=r"privacy.steps_per_epoch: required with level = example"):
        coord.api().json("POST", "/v1/jobs", json=example)
    job = coord.api().json("POST", "/v1/jobs", json=spec)
    assert job["privacy"]["epsilon"] == 0.0 and job["privacy"]["trusts_coordinator"] is False
    done = coord.wait_job(job["id"], timeout=120)

    assert done["reason"].startswith("privacy budget: one more round would spend epsilon")
    rounds = [r for r in coord.rounds(job["id"]) if r["kind"] == "train"]
    assert [r["status"] for r in rounds] == ["completed"], [r["reason"] for r in rounds]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert 2.9 < eps[0] < 3.0  # computed directly in tests/integration/test_privacy_rounds.py's way
    assert all(r["privacy"]["contributors"] == 3 and r["metrics"]["secure"] for r in rounds)
    assert done["privacy"]["epsilon"] == eps[0] and done["privacy"]["rounds_spent"] == 1

    env = {"AICFL_URL": coord.url, "AICFL_TOKEN": coord.token}
    listed = cli.aicfl("rounds", "list", str(job["id"]), env=env)
    assert listed.code == 0, listed
    for e in eps:
        assert f"{e:.3g} (d=1e-05)" in listed.out, listed.out
    shown = cli.aicfl("jobs", "show", str(job["id"]), env=env)
    assert shown.code == 0, shown
    assert (
        f"privacy:   device level, epsilon {eps[0]:.4g} spent of 4 at delta 1e-05 over 1 rounds" in shown.out
    )
    as_json = json.loads(cli.aicfl("rounds", "list", str(job["id"]), "--json", env=env).out)
    assert [r["privacy"]["epsilon"] for r in as_json if r["kind"] == "train"] == eps

    # The dashboard's job page: epsilon spent of the target.
    with httpx.Client(base_url=coord.url, verify=coord.verify) as ui:
        assert ui.post("/ui/login", data={"token": coord.token}).status_code in (200, 303)
        page = ui.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    assert f"{eps[0]:.3g} / 4 at δ = 1e-05, device level" in page.text
