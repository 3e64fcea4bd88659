"""A user's existing Flower client under aicfl-agent, unchanged: Flower's PyTorch quickstart
(tests/fixtures/flower_quickstart, its ``ClientApp`` built from ``client_fn``) trained through a
real coordinator and three real agent processes, every round under SecAgg+."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import harness
from tests.integration.harness import Coordinator

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEVICES = 3
ROUNDS = 3


@pytest.fixture
def coord(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Coordinator]:
    # The quickstart imports itself as `flower_quickstart`, as an installed project would: the
    # coordinator (which builds version 0 from its Net) and every agent find it on PYTHONPATH.
    path = os.pathsep.join(p for p in (str(FIXTURES), harness.ENV.get("PYTHONPATH", "")) if p)
    monkeypatch.setitem(harness.ENV, "PYTHONPATH", path)
    c = Coordinator(tmp_path)
    c.bootstrap()
    c.start()
    yield c
    c.stop_agents()
    c.stop()


def quickstart_spec() -> dict[str, Any]:
    return {
        "name": "flower-quickstart",
        "rounds": ROUNDS,
        "seed": 1,
        "secure": True,
        "model": {
            "app": "flower_quickstart.client_app:app",
            "app_version": "0",  # a project on PYTHONPATH, not an installed distribution
            "options": {
                # What the quickstart's server_app starts from: get_weights(Net()).
                "initial": "flower_quickstart.task:Net",
                # Its pyproject's [tool.flwr.app.config], as the client reads it from run_config.
                "run_config": {"local-epochs": 3, "learning-rate": 0.05, "batch-size": 16},
            },
        },
        "cohort": {"target": DEVICES, "minimum": DEVICES, "stage_timeout": 40, "selection_timeout": 5},
        "audit": {"enabled": False},
    }


def test_the_flower_quickstart_trains_unchanged_under_secagg(coord: Coordinator, tmp_path: Path) -> None:
    data = tmp_path / "unused"  # the quickstart loads its own partition from partition-id
    data.mkdir()
    devices = []
    for i in range(DEVICES):
        home = coord.enroll(
            data, f"node-{i}", ["--node-config", f"partition-id={i} num-partitions={DEVICES}"]
        )
        devices.append(json.loads((home / "agent.json").read_text())["device_id"])
        coord.run_agent(home, {"OMP_NUM_THREADS": "1"})
    api = coord.api()
    job = api.json("POST", "/v1/jobs", json=quickstart_spec())
    coord.wait_job(job["id"], timeout=150)

    rounds = coord.rounds(job["id"])
    train = [r for r in rounds if r["kind"] == "train"]
    assert [r["status"] for r in train] == ["completed"] * ROUNDS, [r["reason"] for r in train]
    for r in train:
        assert r["metrics"]["secure"] is True
        assert (r["participants"], r["completed_by"], r["dropped"]) == (DEVICES, DEVICES, 0), r
        detail = api.json("GET", f"/v1/jobs/{job['id']}/rounds/{r['number']}")
        assert sorted(d["device_id"] for d in detail["devices"]) == sorted(devices)
        assert all(d["status"] == "active" for d in detail["devices"]), detail["devices"]
        # Each device weighs in with the count its fit reported: len(trainloader.dataset).
        assert r["metrics"]["examples"] == DEVICES * 479

    versions = api.json("GET", f"/v1/jobs/{job['id']}/models")
    assert [v["version"] for v in versions] == list(range(ROUNDS + 1))
    # Federated accuracy: each version as the devices' own evaluate() measured it on their
    # validation splits (the last one in the evaluation round after training).
    accuracy = [v["metrics"]["federated"]["accuracy"] for v in versions]
    assert accuracy[0] < 0.25, accuracy  # ten classes: chance is 0.1
    assert accuracy[-1] > 0.7 and accuracy[-1] > accuracy[0] + 0.45, accuracy
