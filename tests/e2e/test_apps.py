"""A user's app through a real coordinator and real agent processes: devices that lack it, hold
another version, or run code that fails in any of the ways a user's code can, each sit the round out
with one clear reason, and the round goes on with the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import codec
from shared.api_client import CliError
from tests.fixtures.toy_app import make_data
from tests.integration.harness import ENV, Coordinator, py, wait_for

pytestmark = pytest.mark.slow

APP = "tests.fixtures.toy_app:app"
AGENT_ENV = {"AICFL_AGENT_PRELOAD": APP}


def app_spec(rounds: int, target: int, *, secure: bool, version: str = "1.0", **model: Any) -> dict[str, Any]:
    return {
        "name": "toy",
        "rounds": rounds,
        "seed": 2,
        "secure": secure,
        "model": {"app": APP, "app_version": version, **model},
        "cohort": {"target": target, "minimum": 2, "stage_timeout": 60, "selection_timeout": 3},
        "training": {"epochs": 5, "learning_rate": 0.5},
        "audit": {"enabled": False},
    }


def agent_outside_the_repository(coord: Coordinator, home: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """An agent started elsewhere: the test fixtures (and so the app) are not importable there."""
    with open(home.parent / f"{home.name}.log", "ab") as fh:
        proc = subprocess.Popen(
            py("client_agent", "run", "--home", str(home)),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=ENV,
            cwd=cwd,
        )
    coord.agents.append(proc)
    return proc


def test_devices_without_the_app_or_with_failing_app_code_sit_out_with_their_reason(
    coord: Coordinator, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    faults = {
        "good-0": {},
        "good-1": {},
        "other-version": {"TOY_APP_VERSION": "2.0"},
        "load": {"TOY_APP_FAULT": "load"},
        "check": {"TOY_APP_FAULT": "check"},
        "raise": {"TOY_APP_FAULT": "raise"},
        "nan": {"TOY_APP_FAULT": "nan"},
        "shape": {"TOY_APP_FAULT": "shape"},
        "dtype": {"TOY_APP_FAULT": "dtype"},
    }
    devices: dict[str, str] = {}
    for i, (name, env) in enumerate([*faults.items(), ("missing", None)]):
        home = coord.enroll(make_data(data / f"{name}.npz", 120, seed=i), name)
        devices[name] = json.loads((home / "agent.json").read_text())["device_id"]
        if env is None:
            agent_outside_the_repository(coord, home, tmp_path)
        else:
            coord.run_agent(home, {**AGENT_ENV, **env})
    api = coord.api()
    wait_for(lambda: all(d["online"] for d in api.json("GET", "/v1/devices")), 120, "every agent online")
    job = api.json("POST", "/v1/jobs", json=app_spec(2, target=len(devices), secure=False))
    reference = make_data(tmp_path / "ref.npz", 300, seed=99)
    api.request("PUT", f"/v1/jobs/{job['id']}/reference", content=reference.read_bytes())
    done = coord.wait_job(job["id"], timeout=240)

    rounds = [r for r in coord.rounds(job["id"]) if r["kind"] == "train"]
    assert done["status"] == "completed" and len(rounds) == 2
    first = api.json("GET", f"/v1/jobs/{job['id']}/rounds/{rounds[0]['number']}")
    why = {d["device_id"]: (d["status"], d["reason"] or "") for d in first["devices"]}
    name_of = {v: k for k, v in devices.items()}
    seen = {name_of[d]: v for d, v in why.items()}
    # Declined at configure, with the reason the operator reads in `aicfl rounds list`:
    assert seen["missing"][0] == "declined"
    assert seen["missing"][1].startswith(
        f"app '{APP}' does not import here: ModuleNotFoundError: No module named"
    )
    assert seen["other-version"] == ("declined", f"app '{APP}' is version 2.0 here; the job needs 1.0")
    assert seen["load"][0] == "declined" and "RuntimeError: the sensor folder is locked" in seen["load"][1]
    assert seen["check"] == ("declined", "data does not match the job's schema: x must have 4 columns")
    # Accepted, then failed in training: withdrawn with the reason, counted as dropped.
    assert (
        seen["raise"][0] == "dropped"
        and "ZeroDivisionError: the user's loss divided by zero" in seen["raise"][1]
    )
    assert seen["nan"][0] == "dropped" and "metric 'loss' = nan" in seen["nan"][1]
    assert seen["shape"][0] == "dropped" and "shape (11,)" in seen["shape"][1] and "(10,)" in seen["shape"][1]
    assert seen["dtype"][0] == "dropped" and "float64" in seen["dtype"][1]
    assert seen["good-0"][0] == seen["good-1"][0] == "active"
    assert first["declines"][seen["check"][1]] == 1 and sum(first["declines"].values()) == 4
    # The round went on with the two good devices, without waiting out the 60 s stage deadline.
    assert all(r["status"] == "completed" and r["completed_by"] == 2 for r in rounds)
    central = [r["metrics"]["central"]["accuracy"] for r in rounds]
    assert central[-1] > 0.9, central

    # `aicfl rounds list` shows each reason beside the round.
    out = subprocess.run(
        py("server", "rounds", "list", str(job["id"]), "--json"),
        capture_output=True,
        text=True,
        env={**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token},
    )
    assert out.returncode == 0, out.stderr
    assert f"app '{APP}' is version 2.0 here; the job needs 1.0" in out.stdout
    assert (done["app"], done["app_version"]) == (APP, "1.0")
    shown = subprocess.run(
        py("server", "jobs", "show", str(job["id"])),
        capture_output=True,
        text=True,
        env={**ENV, "AICFL_URL": coord.url, "AICFL_TOKEN": coord.token, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert f"app {APP} 1.0" in shown.stdout
    wait_for(lambda: all(p.poll() is None for p in coord.agents), 5, "every agent to keep running")


def test_a_secure_round_goes_on_when_a_device_s_app_fails_after_sharing_keys(
    coord: Coordinator, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i, env in enumerate([{}, {}, {}, {"TOY_APP_FAULT": "nan"}]):
        coord.run_agent(
            coord.enroll(make_data(data / f"d{i}.npz", 150, seed=i), f"d{i}"), {**AGENT_ENV, **env}
        )
    api = coord.api()
    wait_for(lambda: all(d["online"] for d in api.json("GET", "/v1/devices")), 120, "every agent online")
    job = api.json("POST", "/v1/jobs", json=app_spec(1, target=4, secure=True))
    coord.wait_job(job["id"], timeout=180)
    (r,) = [r for r in coord.rounds(job["id"]) if r["kind"] == "train"]
    assert (r["status"], r["participants"], r["dropped"], r["completed_by"]) == ("completed", 4, 1, 3)
    versions = api.json("GET", f"/v1/jobs/{job['id']}/models")
    assert [v["version"] for v in versions] == [0, 1]
    (_, vec0), (_, vec1) = (
        codec.decode(api.request("GET", f"/v1/jobs/{job['id']}/models/{v}/blob").content) for v in (0, 1)
    )
    assert vec0.shape == vec1.shape == (10,) and np.isfinite(vec1).all() and not np.array_equal(vec0, vec1)


def test_a_job_whose_app_does_not_import_on_the_coordinator_is_refused_with_the_import_error(
    coord: Coordinator,
) -> None:
    api = coord.api()
    for model, message in [
        ({"app": "no_such_package.apps:app"}, "ModuleNotFoundError: No module named 'no_such_package'"),
        ({"app": APP, "app_version": "3.1"}, f"app '{APP}' is version 1.0 here; the job needs 3.1"),
        ({"app": "tests.fixtures.toy_app:nope"}, "has no attribute 'nope'"),
        ({"app": "tests.fixtures.toy_app:make_data"}, "is a function, not an aicfl App"),
    ]:
        spec = app_spec(1, 2, secure=False)
        spec["model"] = model
        with pytest.raises(CliError) as refused:
            api.request("POST", "/v1/jobs", json=spec)
        assert message in str(refused.value) and "(HTTP 422)" in str(refused.value)
    assert api.json("GET", "/v1/jobs") == []
