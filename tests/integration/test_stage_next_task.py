"""A round message sent with ``?wait`` is also the device's next check-in, over real HTTP: its answer
carries the device's next task once that stage opens (held until then, no earlier), a message without
it is answered at once with no ``next``, and a bad ``wait`` is a 422 that names it and takes nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from . import harness
from .harness import Coordinator, enroll_devices
from .test_long_poll import SPEC as LONG_POLL_SPEC
from .test_long_poll import Device
from .test_long_poll_poke import send

pytestmark = pytest.mark.slow
DEVICES = 3
SPEC: dict[str, Any] = {
    **LONG_POLL_SPEC,
    "name": "next-task",
    "cohort": {"target": DEVICES, "minimum": DEVICES, "selection_timeout": 5, "stage_timeout": 60},
}


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    settings = {"AICFL_IDLE_RETRY": "0.3", "AICFL_ELIGIBILITY_WINDOW": "30"}
    with harness.running_coordinator(tmp_path_factory.mktemp("nexttask"), settings) as c:
        yield c


def task_of(coord: Coordinator, device: Device) -> dict[str, Any]:
    resp = send(coord, device, "/v1/device/checkin", {"wait": 20})
    assert resp.status_code == 200, resp.text
    task = resp.json()["task"]
    assert task is not None
    return task  # type: ignore[no-any-return]


def test_a_message_with_wait_is_answered_with_the_next_task_when_its_stage_opens(coord: Coordinator) -> None:
    devices = enroll_devices(coord, DEVICES)
    for d in devices:  # online, so that the job can select them
        assert send(coord, d, "/v1/device/checkin", {}).status_code == 200
    job = coord.api().json("POST", "/v1/jobs", json=SPEC)
    try:
        tasks = [task_of(coord, d) for d in devices]
        assert {t["stage"] for t in tasks} == {"configure"}
        configure = f"/v1/device/rounds/{tasks[0]['round_id']}/configure"
        message = {"accepted": True, "rows": 20}

        # Bad waits: refused by name, and the message is not taken (the device can still send it).
        for bad in ("-1", "abc", "3601"):
            resp = send(coord, devices[0], f"{configure}?wait={bad}", message)
            assert resp.status_code == 422 and "wait" in resp.text, resp.text

        answer: dict[str, Any] = {}

        def first() -> None:
            resp = send(coord, devices[0], f"{configure}?wait=20", message)
            answer["status"], answer["body"], answer["at"] = resp.status_code, resp.json(), time.monotonic()

        held = threading.Thread(target=first, daemon=True)
        held.start()
        time.sleep(1.0)
        assert held.is_alive(), "answered before the next stage opened: it owes nothing yet"
        for d in devices[1:]:
            resp = send(coord, d, configure, message)  # no wait: answered at once, as before
            assert resp.status_code == 200 and resp.json()["next"] is None, resp.text
        last_configured = time.monotonic()
        held.join(30)
        assert answer["status"] == 200, answer
        nxt = answer["body"]["next"]
        assert nxt is not None and nxt["task"] is not None, answer
        assert nxt["task"]["round_id"] == tasks[0]["round_id"] and nxt["task"]["stage"] == "input"
        assert answer["at"] - last_configured < 3.0  # woken when the stage opened, not at the hold's end
        # the same task a check-in now gives the device
        assert task_of(coord, devices[0])["stage"] == "input"
    finally:
        coord.api().json("POST", f"/v1/jobs/{job['id']}/cancel")
