"""A round this coordinator opens or moves on wakes its held check-ins at once, not at the next pass of the
long-poll loop: with passes 6 s apart, devices hear of a new round and of the next stage within a second."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.signing import sign_request

from . import harness
from .harness import Coordinator, enroll_devices
from .test_long_poll import SPEC, Device, InFlight

pytestmark = pytest.mark.slow
PASS_SECONDS = 6.0  # AICFL_TICK_INTERVAL: the ticker's and the long-poll loop's interval


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    # Held devices are marked online once a pass, so the window must outlast two passes.
    settings = {"AICFL_TICK_INTERVAL": str(PASS_SECONDS), "AICFL_ELIGIBILITY_WINDOW": "30"}
    with harness.running_coordinator(tmp_path_factory.mktemp("poke"), settings) as c:
        yield c


def send(coord: Coordinator, device: Device, path: str, message: dict[str, Any]) -> httpx.Response:
    body = json.dumps(message).encode()
    headers = {**sign_request(device[1], device[0], "POST", path, body), "Content-Type": "application/json"}
    return httpx.post(coord.url + path, content=body, headers=headers, timeout=30)


def test_held_devices_hear_of_their_round_and_its_next_stage_at_once(coord: Coordinator) -> None:
    a, b = enroll_devices(coord, 2)
    held = [InFlight(coord, d, wait=30.0) for d in (a, b)]
    time.sleep(0.5)
    job = coord.api().json(
        "POST", "/v1/jobs", json={**SPEC, "cohort": {**SPEC["cohort"], "target": 2, "minimum": 2}}
    )
    tasks = [h.join(PASS_SECONDS * 2 + 5)[1].json()["task"] for h in held]
    assert all(t is not None and t["stage"] == "configure" for t in tasks), tasks
    (opened,) = coord.api().json("GET", f"/v1/jobs/{job['id']}/rounds")
    heard = max(h.answered_wall for h in held) - opened["stages"][0]["started"]
    assert heard < 1.0, f"held devices heard of the round {heard:.2f} s after it opened"

    path = f"/v1/device/rounds/{tasks[0]['round_id']}/configure"
    assert send(coord, a, path, {"accepted": True, "rows": 10}).status_code == 200
    waiting = InFlight(coord, a, wait=30.0)  # a is done with configure: held until the next stage
    time.sleep(0.5)
    assert waiting.result is None
    assert send(coord, b, path, {"accepted": True, "rows": 10}).status_code == 200  # the stage ends here
    moved = time.monotonic()
    _, resp = waiting.join(PASS_SECONDS + 5)
    task = resp.json()["task"]
    assert task is not None and task["stage"] != "configure", resp.text
    assert waiting.answered_at - moved < 1.0, (
        f"heard of the next stage {waiting.answered_at - moved:.2f} s late"
    )
    coord.api().json("POST", f"/v1/jobs/{job['id']}/cancel")
