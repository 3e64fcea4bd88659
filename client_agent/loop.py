"""The check-in loop: paced by the coordinator, backing off on errors, stopping cleanly on SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import sys
import threading
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import ValidationError

from client_agent.config import AgentHome, ResumeState
from client_agent.identity import load_identity
from client_agent.transport import CoordinatorError, SignedClient, TransientError
from client_agent.worker import Declined, Worker
from shared.apps import AppError, preload
from shared.secagg.primitives import SecAggError
from shared.wire import Accepted, CheckinRequest, CheckinResponse, Task

log = logging.getLogger("aicfl.agent")
BINARY = "application/octet-stream"
# Seconds a check-in may be held by the coordinator until this device has a task: under the idle
# timeout of common proxies (60 s). AICFL_AGENT_WAIT overrides it; 0 asks for answers at once.
LONG_POLL_SECONDS = 55.0
# Beyond the hold, what the answer's trip may take before the check-in counts as lost.
HOLD_MARGIN_SECONDS = 30.0


class _Stopped(Exception):
    """The agent was asked to stop while a check-in was in flight."""


def long_poll_seconds() -> float:
    """How long this agent lets the coordinator hold a check-in (``AICFL_AGENT_WAIT``, default 55 s)."""
    raw = os.environ.get("AICFL_AGENT_WAIT", "").strip()
    try:
        return max(0.0, float(raw)) if raw else LONG_POLL_SECONDS
    except ValueError:
        log.warning("AICFL_AGENT_WAIT=%r is not a number of seconds; using %.0f", raw, LONG_POLL_SECONDS)
        return LONG_POLL_SECONDS


def agent_version() -> str:
    try:
        return version("aicfl")
    except PackageNotFoundError:
        return "dev"


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``execve``, so an agent started
    by a large process (the demo, a test runner) would report its parent's size as its own peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None):
        self.base, self.cap, self.failures = base, cap, 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, self.base * 2 ** (self.failures - 1))
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class Agent:
    def __init__(self, home: AgentHome):
        self.home = home
        self.cfg = home.load_config()
        key = load_identity(home.key_path)
        verify: str | bool = self.cfg.ca_cert or True
        self.client = SignedClient(self.cfg.coordinator, self.cfg.device_id, key, verify=verify)
        self.worker = Worker(
            self.client,
            self.cfg.data,
            self.cfg.coordinator_public_key,
            self.cfg.device_id,
            self.cfg.threads,
            self.cfg.node_config,
        )
        self.state = home.load_state()
        self.stop = threading.Event()
        self.wait = long_poll_seconds()
        self._in_flight: threading.Event | None = None  # set when the check-in in flight is answered
        self._rng = random.Random()
        # The message of each stage of the current round until the coordinator has answered it: sent
        # again as it was after a lost answer (a dropped connection, a coordinator restarted), never
        # made anew: a second masked input would carry fresh masks, a second advertisement fresh keys.
        self.outbox: dict[tuple[int, str], tuple[bytes, str]] = {}

    def warm_up(self) -> None:
        """Import the apps this device will likely run (``AICFL_AGENT_PRELOAD``, and those it worked
        with before) before its first check-in: on a small device importing torch can take longer
        than a stage's deadline, and a device that checks in may be selected at once."""
        for ref in dict.fromkeys([*_env_list("AICFL_AGENT_PRELOAD"), *self.state.apps]):
            try:
                preload(ref)
                log.info("app %s imported ahead of its rounds", ref)
            except AppError as err:
                log.warning("cannot import app ahead of its rounds: %s", err)

    def install_signal_handlers(self) -> None:
        def _stop(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping after the current step", signum)
            self.request_stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def request_stop(self) -> None:
        """Stop after the current step; a check-in held by the coordinator is given up at once."""
        self.stop.set()
        in_flight = self._in_flight
        if in_flight is not None:
            in_flight.set()

    def checkin(self) -> CheckinResponse:
        """Check in, letting the coordinator hold the request up to ``self.wait`` seconds for a task."""
        req = CheckinRequest(agent_version=agent_version(), peak_rss_mb=peak_rss_mb(), wait=self.wait)
        payload = req.model_dump(exclude={"wait"} if self.wait <= 0 else None)  # as before long polls
        timeout = self.wait + HOLD_MARGIN_SECONDS if self.wait > 0 else None
        return CheckinResponse.model_validate(
            self._interruptible(lambda: self.client.post_json("/v1/device/checkin", payload, timeout=timeout))
        )

    def _interruptible(self, call: Callable[[], Any]) -> Any:
        """``call()`` in a helper thread, given up (``_Stopped``) as soon as the agent is asked to stop:
        a held check-in must not keep a stopping agent waiting for its answer."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = call()
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = err
            finally:
                done.set()

        self._in_flight = done
        try:
            if self.stop.is_set():
                raise _Stopped
            threading.Thread(target=work, name="aicfl-checkin", daemon=True).start()
            done.wait()
        finally:
            self._in_flight = None
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            raise _Stopped
        return box["value"]

    def run(self) -> int:
        backoff = Backoff()
        self.warm_up()
        log.info("agent %s checking in with %s", self.cfg.device_id, self.cfg.coordinator)
        # The answer a stage's message carried (``?wait``): it stands for the next check-in.
        answered: CheckinResponse | None = None
        while not self.stop.is_set():
            try:
                resp = answered if answered is not None else self.checkin()
                answered = None
                backoff.reset()
                if resp.task is not None:
                    answered = self.handle(resp.task)
                    continue
                # Never later than told (the coordinator counts on it), a little earlier at random.
                delay = resp.retry_after * self._rng.uniform(0.9, 1.0)
            except _Stopped:
                break
            except TransientError as err:
                delay = backoff.next_delay()
                log.warning("coordinator unavailable (%s); retrying in %.1f s", err, delay)
            except CoordinatorError as err:
                if err.status == 401:
                    log.error("the coordinator refused this device: %s", err.detail)
                    return 3
                if err.status == 422 and self.wait > 0 and "wait" in err.detail:
                    # A coordinator older than long polls refuses the field: check in as before.
                    log.info("the coordinator does not hold check-ins; polling at its pace instead")
                    self.wait = 0.0
                    continue
                delay = backoff.next_delay()
                log.warning("request refused: %s; retrying in %.1f s", err, delay)
            self.stop.wait(delay)
        log.info("stopped")
        return 0

    def _withdraw(self, task: Task, reason: str) -> None:
        try:
            self.client.post_json(f"/v1/device/rounds/{task.round_id}/withdraw", {"reason": reason[:2000]})
        except CoordinatorError as err:  # the round ended or moved on meanwhile: nothing to leave
            log.info("round %s: withdrawal not needed: %s", task.round_id, err.detail)

    def handle(self, task: Task) -> CheckinResponse | None:
        """Do one stage of a round, at most once, and never for a stale round; the coordinator's answer
        to the device's next check-in when the message carried it (``?wait``), else None."""
        answered = None
        if task.round_id < self.state.last_round_id:
            log.warning(
                "ignoring task for round %s: already worked on newer round %s",
                task.round_id,
                self.state.last_round_id,
            )
            self.stop.wait(1.0)
            return None
        if task.round_id != self.state.round_id:
            self.state = ResumeState(
                round_id=task.round_id, stages_sent=[], last_round_id=task.round_id, apps=self.state.apps
            )
        if task.stage in self.state.stages_sent:
            self.stop.wait(0.5)
            return None
        crash_at = os.environ.get("AICFL_AGENT_CRASH_AT")  # fault injection for tests: "ROUND:STAGE"
        if crash_at and crash_at == f"{task.round}:{task.stage}":
            log.error("AICFL_AGENT_CRASH_AT=%s: exiting abruptly", crash_at)
            os._exit(17)
        path = f"/v1/device/rounds/{task.round_id}/{task.stage}"
        log.info("job %s round %s (%s): stage %s", task.job_id, task.round, task.kind, task.stage)
        key = (task.round_id, task.stage)
        try:
            message = self.outbox.get(key)
            if message is None:
                message = self._compose(task)
                self.outbox = {k: v for k, v in self.outbox.items() if k[0] == task.round_id}
                self.outbox[key] = message
            else:
                log.info("round %s stage %s: sending the same message again", task.round_id, task.stage)
            answered = self._send(path, *message)
        except CoordinatorError as err:
            # Dropped, deadline passed, round over: nothing to retry for this stage.
            log.warning("round %s stage %s not accepted: %s", task.round_id, task.stage, err.detail)
        except (Declined, SecAggError) as err:
            # The app failed, no secrets for this round (restarted), or a neighbour's message did not
            # check out: this device sits the round out, and says why so the round need not wait.
            log.warning("round %s stage %s: sitting the round out: %s", task.round_id, task.stage, err)
            self._withdraw(task, f"in stage {task.stage!r}: {err}")
        self.outbox.pop(key, None)  # answered (a TransientError leaves it to be sent again)
        self.state.stages_sent.append(task.stage)
        self.state.apps = sorted(set(self.state.apps) | self.worker.used_apps)
        self.home.save_state(self.state)
        return answered

    def _send(self, path: str, body: bytes, content_type: str) -> CheckinResponse | None:
        """POST a stage's message; a long-polling agent asks for its next task in the same request
        (``?wait``: held until it owes its next message, as a check-in is), a stopping one does not."""
        if self.wait <= 0 or self.stop.is_set():
            self.client.request("POST", path, body, content_type=content_type)
            return None
        resp = self._interruptible(
            lambda: self.client.request(
                "POST",
                f"{path}?wait={self.wait:g}",
                body,
                content_type=content_type,
                timeout=self.wait + HOLD_MARGIN_SECONDS,
            )
        )
        try:  # a coordinator older than this answers without ``next``: check in as before
            return Accepted.model_validate_json(resp.content).next
        except ValidationError:
            return None

    def _compose(self, task: Task) -> tuple[bytes, str]:
        """The message of ``task``'s stage, and its content type."""
        body: dict[str, Any]
        if task.stage == "configure":
            msg = self.worker.configure(task)
            if not msg.accepted:
                log.warning("declining round %s: %s", task.round_id, msg.reason)
            body = msg.model_dump()
        elif task.stage == "advertise_keys":
            body = self.worker.advertise(task)
        elif task.stage == "share_keys":
            body = self.worker.share_keys(task)
        elif task.stage == "masked_input":
            work = self.worker.masked_statistics if task.kind == "stats" else self.worker.masked_input
            return work(task), BINARY
        elif task.stage == "unmask":
            body = self.worker.unmask(task)
        elif task.kind == "stats":
            body = self.worker.statistics(task).model_dump()
        elif task.kind == "evaluate":
            body = self.worker.evaluate(task).model_dump()
        else:
            return self.worker.train(task), BINARY
        return json.dumps(body).encode(), "application/json"
