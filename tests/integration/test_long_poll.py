"""Held check-ins over real HTTP: woken by a round, ended at their bound, bounded in number, released
at shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.signing import sign_request

from . import harness
from .harness import Coordinator, enroll_devices

pytestmark = pytest.mark.slow
PATH = "/v1/device/checkin"
MAX_HELD = 3
SETTINGS = {
    "AICFL_LONG_POLL_MAX_HELD": str(MAX_HELD),
    "AICFL_ELIGIBILITY_WINDOW": "2",  # a device held longer than this must still count as online
    "AICFL_IDLE_RETRY": "0.3",
}
SPEC: dict[str, Any] = {
    "name": "long-poll",
    "rounds": 1,
    "secure": False,
    "data": {
        "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
        "target": "y",
        "task": "binary",
    },
    "cohort": {"target": MAX_HELD, "minimum": MAX_HELD, "selection_timeout": 0.5, "stage_timeout": 30},
}
Device = tuple[str, Ed25519PrivateKey]


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    with harness.running_coordinator(tmp_path_factory.mktemp("longpoll"), SETTINGS) as c:
        yield c


@pytest.fixture(scope="module")
def devices(coord: Coordinator) -> list[Device]:
    return enroll_devices(coord, MAX_HELD + 1)


def checkin(coord: Coordinator, device: Device, wait: float) -> tuple[float, httpx.Response]:
    """A signed check-in that lets the coordinator hold it ``wait`` seconds; its duration and answer."""
    body = json.dumps({"wait": wait}).encode()
    headers = {**sign_request(device[1], device[0], "POST", PATH, body), "Content-Type": "application/json"}
    started = time.monotonic()
    resp = httpx.post(coord.url + PATH, content=body, headers=headers, timeout=wait + 30)
    return time.monotonic() - started, resp


class InFlight:
    """A check-in running in a thread."""

    def __init__(self, coord: Coordinator, device: Device, wait: float):
        self.result: tuple[float, httpx.Response] | None = None
        self.answered_at = 0.0  # monotonic
        self.answered_wall = 0.0  # epoch seconds, as the coordinator's records
        self._thread = threading.Thread(target=self._run, args=(coord, device, wait), daemon=True)
        self._thread.start()

    def _run(self, coord: Coordinator, device: Device, wait: float) -> None:
        self.result = checkin(coord, device, wait)
        self.answered_at = time.monotonic()
        self.answered_wall = time.time()

    def join(self, timeout: float) -> tuple[float, httpx.Response]:
        self._thread.join(timeout)
        assert self.result is not None, "the check-in was not answered"
        return self.result


def test_a_held_checkin_with_nothing_to_do_ends_at_its_bound(
    coord: Coordinator, devices: list[Device]
) -> None:
    elapsed, resp = checkin(coord, devices[0], wait=1.0)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"retry_after": 0.0, "task": None}  # come back at once, and wait again
    assert 0.85 <= elapsed < 1.8  # held (less up to 10 % jitter), not answered at once


def test_a_checkin_that_does_not_wait_is_answered_at_once(coord: Coordinator, devices: list[Device]) -> None:
    elapsed, resp = checkin(coord, devices[0], wait=0.0)
    assert resp.status_code == 200 and elapsed < 0.8
    assert 0.27 <= resp.json()["retry_after"] <= 0.33  # AICFL_IDLE_RETRY ±10 %: no job could select it


def test_beyond_the_bound_on_held_checkins_one_is_answered_at_once(
    coord: Coordinator, devices: list[Device]
) -> None:
    held = [InFlight(coord, d, wait=2.0) for d in devices[:MAX_HELD]]
    time.sleep(0.6)
    elapsed, resp = checkin(coord, devices[MAX_HELD], wait=2.0)
    assert resp.status_code == 200 and elapsed < 0.8, elapsed
    assert resp.json()["retry_after"] > 0  # told when to come back, as a device that does not wait
    for h in held:
        assert h.join(5)[1].json()["retry_after"] == 0.0  # those held ran to their bound


def test_held_devices_stay_online_and_hear_of_the_round_that_selects_them_at_once(
    coord: Coordinator, devices: list[Device]
) -> None:
    held = [InFlight(coord, d, wait=20.0) for d in devices[:MAX_HELD]]
    time.sleep(2.6)  # longer than the 2 s (raised to 2.36 s) eligibility window: online while held
    submitted = time.monotonic()
    job = coord.api().json("POST", "/v1/jobs", json=SPEC)
    answered = [h.join(10) for h in held]
    for _, resp in answered:
        assert resp.status_code == 200, resp.text
        task = resp.json()["task"]
        assert task is not None and task["job_id"] == job["id"] and task["stage"] == "configure"
    latest = max(h.answered_at for h in held) - submitted
    assert latest < 1.5, f"the last selected device heard of its round {latest:.2f} s after the submit"
    coord.api().json("POST", f"/v1/jobs/{job['id']}/cancel")


def test_a_coordinator_stopping_answers_its_held_checkins_and_does_not_wait_for_them(
    coord: Coordinator, devices: list[Device]
) -> None:
    held = InFlight(coord, devices[MAX_HELD], wait=30.0)
    time.sleep(0.6)
    assert coord.proc is not None
    stopping = time.monotonic()
    coord.proc.send_signal(signal.SIGTERM)
    coord.proc.wait(timeout=10)
    assert time.monotonic() - stopping < 5
    elapsed, resp = held.join(5)
    assert resp.status_code == 200 and resp.json()["task"] is None and elapsed < 10
