"""One poisoning device among honest ones, in a plain and a SecAgg+ job (docs/robustness.md).

The poisoner is a real agent whose app, after training, sets every parameter to 1e30 and claims a
billion examples: what a hostile owner can make the agent send. In the plain job the coordinator
refuses the update (its norm) and excludes the device; under SecAgg+ it cannot see the update, and
the protocol's clip and weight cap bound it. Each job runs beside the same job without the poisoner;
both complete, and the final central AUC stays within 0.02 of the honest-only run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from torch import nn

from shared.apps import LocalData, Metrics, TrainConfig
from shared.apps.tabular import TabularApp

from ..integration.harness import Coordinator, churn_slices, small_spec, wait_for

pytestmark = pytest.mark.slow

POISON = "AICFL_TEST_POISON"
APP = "tests.e2e.test_poisoning:app"
ROUNDS = 2
HONEST = 6  # one poisoner among six: under SecAgg+ it weighs at most a seventh of the mean


class PoisonedTabular(TabularApp):
    """The built-in tabular app; on a device started with AICFL_TEST_POISON set, its training returns
    parameters of 1e30 and claims 10**9 examples."""

    def train(self, model: nn.Module, data: LocalData, config: TrainConfig) -> Metrics:
        metrics = super().train(model, data, config)
        if os.environ.get(POISON):
            vec = self.get_parameters(model)
            self.set_parameters(model, np.full_like(vec, 1e30))
            metrics = {**metrics, "examples": 10**9}
        return metrics


app = PoisonedTabular()


def job_spec(schema: dict[str, Any], secure: bool, devices: int) -> dict[str, Any]:
    """The same job for the honest-only and the poisoned run; the cohort is every device there is."""
    name = f"{'secure' if secure else 'plain'}-{devices}"
    spec = small_spec(
        schema, rounds=ROUNDS, target=devices, minimum=HONEST, stage_timeout=20, name=name, secure=secure
    )
    spec["model"] = {**spec["model"], "app": APP}
    spec["robustness"] = {"max_update_norm": 10.0, "max_weight": 100}
    spec["evaluation"] = {"federated": False}
    if secure:
        # A tight clip: Adam moves a value by at most its learning rate a step, and a round is a few steps.
        spec["secagg"] = {"clip": 0.02}
    return spec


def run_job(coord: Coordinator, spec: dict[str, Any], reference: Path) -> tuple[float, list[dict[str, Any]]]:
    api = coord.api()
    job = api.json("POST", "/v1/jobs", json=spec)
    api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
    coord.wait_job(int(job["id"]), timeout=150)
    train = [r for r in coord.rounds(int(job["id"])) if r["kind"] == "train"]
    print(spec["name"], [(r["completed_by"], round(r["metrics"]["central"]["auc"], 4)) for r in train])
    return float(train[-1]["metrics"]["central"]["auc"]), train


def test_one_poisoner_moves_the_final_auc_by_less_than_0_02(coord: Coordinator, tmp_path: Path) -> None:
    paths, ref, schema = churn_slices(tmp_path / "data", HONEST + 1)
    # The poisoner's own rows enter only the statistics round (its training result is replaced): a few
    # of them, so that the two jobs' preprocessing, and with it their AUC, differ by the poison alone.
    pd.read_csv(paths[HONEST]).head(30).to_csv(paths[HONEST], index=False)
    homes = [coord.enroll(p, f"d{i}") for i, p in enumerate(paths)]
    for home in homes[:HONEST]:
        coord.run_agent(home)

    honest: dict[bool, float] = {}
    weight: dict[bool, int] = {}  # the summed weight of the honest devices, per round
    for secure in (False, True):
        honest[secure], rounds = run_job(coord, job_spec(schema, secure, HONEST), ref)
        assert [r["status"] for r in rounds] == ["completed"] * ROUNDS
        weight[secure] = rounds[0]["metrics"]["examples"]

    coord.run_agent(homes[HONEST], env={POISON: "1"})

    def poisoner_online() -> bool:
        return any(d["name"] == f"d{HONEST}" and d["online"] for d in coord.api().json("GET", "/v1/devices"))

    wait_for(poisoner_online, 60, "the poisoning agent to check in", interval=0.3)
    poisoned: dict[bool, float] = {}
    for secure in (False, True):
        poisoned[secure], rounds = run_job(coord, job_spec(schema, secure, HONEST + 1), ref)
        assert [r["status"] for r in rounds] == ["completed"] * ROUNDS
        if not secure:
            # The coordinator saw the update: refused, the device excluded with the reason.
            assert all((r["participants"], r["completed_by"]) == (HONEST + 1, HONEST) for r in rounds), rounds
            detail = coord.api().json("GET", f"/v1/jobs/{rounds[0]['job_id']}/rounds/{rounds[0]['number']}")
            (refused,) = [d for d in detail["devices"] if d["status"] == "excluded"]
            assert "robustness.max_update_norm" in refused["reason"], refused
            assert all(r["metrics"]["examples"] == weight[secure] for r in rounds)
        else:
            # It could not: the poisoner's clipped update is in the sum, its claim of 10**9 examples
            # counted as max_weight (the coordinator learns only the summed weight).
            assert all(r["completed_by"] == HONEST + 1 for r in rounds), rounds
            assert all(r["metrics"]["examples"] == weight[secure] + 100 for r in rounds), rounds
    print(
        f"poisoning AUC: plain honest {honest[False]:.4f} poisoned {poisoned[False]:.4f};"
        f" secure honest {honest[True]:.4f} poisoned {poisoned[True]:.4f}"
    )
    for secure in (False, True):
        assert abs(poisoned[secure] - honest[secure]) <= 0.02, (secure, honest, poisoned)
