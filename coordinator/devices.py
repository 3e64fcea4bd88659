"""The device side of the round protocol: one handler per message a device sends in a round.

Devices pull: a check-in tells a device its task (``coordinator.checkins``); then, stage by stage, it
sends its configure
answer, its input (statistics, evaluation metrics or a plain update), or its SecAgg+ messages
(advertise_keys, share_keys, masked input, unmask). Each handler checks the device's place in the
round (``participation``), validates the message, stores it, and drives the round on if the message
may have completed its stage. A malformed SecAgg+ message excludes its sender from the round; it
never reaches the arithmetic.

A device whose answer was lost (a dropped connection, a coordinator restarted mid-request) sends its
message again. Each accepted message is stored with its SHA-256, so that the same message sent again
while its stage runs (or once the round is over) is answered as the first was and counted once, and a
different one is refused (409). A SecAgg+ message of a stage that is over still excludes its sender:
an agent that lost an answer asks for its task again, and is given the new stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
from sqlalchemy import bindparam, select, update

from coordinator import apps, boosting, participation, privacy, robustness, secure
from coordinator.aggregation import Sums
from coordinator.context import EngineContext
from coordinator.driver import RoundDriver
from coordinator.errors import Conflict, Invalid, NotFound
from coordinator.models import Event, Participant, RoundMessage
from coordinator.participation import one_less
from coordinator.rounds import ACTIVE, DECLINED, DROPPED, EXCLUDED
from coordinator.statements import ADD_MESSAGE, STAGE_DONE, PartRow, RoundRow
from coordinator.validation import check_metrics, check_update_header
from shared import codec
from shared.gbdt.rounds import TREE_KINDS
from shared.privacy.skellam import SkellamParams
from shared.wire import (
    ConfigureMessage,
    EvaluateMessage,
    StatsMessage,
)

log = logging.getLogger("aicfl.coordinator")

# The digest of the message a device had accepted for a stage of a round (a row only if it sent one).
_ACCEPTED = select(RoundMessage.digest).where(
    RoundMessage.round_id == bindparam("round"),
    RoundMessage.device_id == bindparam("device"),
    RoundMessage.stage == bindparam("stage"),
)


def message_digest(message: bytes | dict[str, Any]) -> str:
    """SHA-256 of a device message: of its bytes, or of a JSON object's canonical form (so that key order
    and spacing do not make a message different)."""
    if isinstance(message, dict):
        message = json.dumps(message, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(message).hexdigest()


class DeviceProtocol:
    """Every stage's message from an authenticated device (check-ins and downloads: ``checkins``)."""

    def __init__(self, ctx: EngineContext, driver: RoundDriver, sums: Sums):
        self.ctx = ctx
        self.driver = driver
        self.sums = sums

    # -- plain stages --------------------------------------------------------

    @staticmethod
    def _store(
        s: secure.Db,
        round_id: int,
        device_id: str,
        stage: str,
        payload: dict[str, Any],
        digest: str,
        blob: str | None = None,
        done: int | None = None,
    ) -> None:
        """Record the device's message of ``stage`` (``digest``: what it sent, see ``message_digest``); with
        ``done`` (its participant id), mark the stage sent."""
        secure.run(
            s,
            ADD_MESSAGE,
            round_id=round_id,
            device_id=device_id,
            stage=stage,
            payload=payload,
            blob_sha256=blob,
            digest=digest,
        )
        if done is not None:
            secure.run(s, STAGE_DONE, pid=done, done=stage)

    def _load(
        self, s: secure.Db, device_id: str, round_id: int, lock: bool = True
    ) -> tuple[RoundRow | None, PartRow | None]:
        return participation.load(s, device_id, round_id, lock, row_locks=not self.ctx.sqlite)

    def _participation(
        self, s: secure.Db, device_id: str, round_id: int, stage: str, now: float, lock: bool = True
    ) -> tuple[RoundRow, PartRow]:
        r, p = self._load(s, device_id, round_id, lock)
        return participation.check(r, p, device_id, round_id, stage, now)

    @staticmethod
    def _resent(
        s: secure.Db, device_id: str, round_id: int, stage: str, message: bytes | dict[str, Any]
    ) -> bool:
        """Whether this ``stage`` message repeats the one the device had accepted: a resend after a lost
        answer, to be answered as the first was and counted once. Refuses a different one (Conflict).

        Asked only once a message failed its checks: the messages that pass them cost nothing more.
        """
        row = secure.run(s, _ACCEPTED, round=round_id, device=device_id, stage=stage).one_or_none()
        if row is None:
            return False
        if row.digest == message_digest(message):
            return True
        if row.digest is None:  # accepted before digests were kept: nothing to compare it with
            raise Conflict(f"device {device_id} already sent its {stage!r} message for round {round_id}")
        raise Conflict(
            f"device {device_id} already sent a different {stage!r} message for round {round_id}:"
            " only the same message may be sent again"
        )

    def _checked(
        self,
        s: secure.Db,
        device_id: str,
        round_id: int,
        stage: str,
        message: bytes | dict[str, Any],
        now: float,
        lock: bool = True,
    ) -> tuple[RoundRow, PartRow] | None:
        """The round and the device's row for a ``stage`` message that passes its checks; None for a
        resend of the message already accepted (see ``_resent``)."""
        try:
            return self._participation(s, device_id, round_id, stage, now, lock)
        except Conflict:
            if self._resent(s, device_id, round_id, stage, message):
                return None
            raise

    def configure(self, device_id: str, round_id: int, msg: ConfigureMessage) -> None:
        """The device accepts the round, or declines it with its reason (recorded, shown to operators)."""
        now = self.ctx.clock()
        payload = msg.model_dump()
        with self.ctx.device_write() as s:
            checked = self._checked(s, device_id, round_id, "configure", payload, now)
            if checked is None:
                return
            r, p = checked
            if msg.accepted:
                secure.run(s, STAGE_DONE, pid=p.id, done="configure")
            else:
                reason = (msg.reason or "declined without a reason")[:2000]
                secure.run(
                    s,
                    update(Participant).where(Participant.id == p.id).values(status=DECLINED, reason=reason),
                )
                log.info("device %s declined round %s of job %s: %s", device_id, r.number, r.job_id, reason)
            self._store(s, round_id, device_id, "configure", payload, message_digest(payload))
            self.driver.maybe_drive(s, r, now, one_less(r))

    def input_json(self, device_id: str, round_id: int, body: dict[str, Any]) -> None:
        """A statistics or evaluation round's input (JSON)."""
        now = self.ctx.clock()
        with self.ctx.device_write() as s:
            checked = self._checked(s, device_id, round_id, "input", body, now)
            if checked is None:
                return
            r, p = checked
            try:
                if r.kind == "stats":
                    payload = StatsMessage.model_validate(body).model_dump()
                    spec = self.ctx.spec(secure.orm(s), r.job_id)
                    statistics = apps.app_for(spec).statistics
                    if statistics is None:
                        raise Invalid(f"job {r.job_id}'s app gathers no statistics")
                    statistics.check(payload["statistics"], apps.context(spec, None))
                elif r.kind == "evaluate":
                    ev = EvaluateMessage.model_validate(body)
                    check_metrics(ev.metrics)
                    payload = ev.model_dump()
                else:
                    raise Invalid(
                        f"round {round_id} is a training round: send the update as application/octet-stream"
                    )
            except ValueError as err:
                raise Invalid(f"{r.kind} message: {err}") from None
            self._store(s, round_id, device_id, "input", payload, message_digest(body), done=p.id)
            self.driver.maybe_drive(s, r, now, one_less(r))

    def update(self, device_id: str, round_id: int, body: bytes) -> None:
        """A device's model update in a plain training round: checked, stored, added to the running sum."""
        now = self.ctx.clock()
        with self.ctx.device_read() as s:
            checked = self._checked(s, device_id, round_id, "input", body, now, lock=False)
            if checked is None:
                return
            r, _ = checked
            if r.kind in TREE_KINDS:
                numel = boosting.numel(self.ctx, s, r)
            elif r.kind != "train":
                raise Invalid(f"round {round_id} is a {r.kind} round: send a JSON message")
            else:
                numel = self.ctx.num_parameters(s, r)
                spec_data = self.ctx.job_spec(s, r.job_id, False)[0]
        if r.kind in TREE_KINDS:
            self._tree_update(device_id, round_id, r, body, numel)
            return
        try:
            header, vec = codec.decode(body, expected_numel=numel)
        except codec.CodecError as err:
            raise Invalid(f"update: {err}") from None
        meta = check_update_header(header, round_id)
        problem = privacy.report_problem(spec_data, meta.get("dp"))  # example-level DP: the cost asked
        if problem is not None:
            self._exclude(device_id, round_id, f"update refused: {problem}")
            raise Invalid(f"device excluded from round {round_id}: update refused: {problem}")
        robustness.check_plain_update(self, device_id, round_id, r.job_id, vec, meta["num_examples"])
        self._accept_input(device_id, round_id, body, vec, meta)

    def _accept_input(
        self, device_id: str, round_id: int, body: bytes, vec: np.ndarray, meta: dict[str, Any]
    ) -> None:
        """A checked plaintext vector: stored, its sender's input recorded, added to the running sum,
        and the round driven on if that was the last one it waited for."""
        sha = self.ctx.blobs.put(body)  # its SHA-256: the message's digest too
        with self.ctx.device_write() as s:
            checked = self._checked(s, device_id, round_id, "input", body, self.ctx.clock())
            if checked is None:  # the same update, sent again while this one was being read
                return
            _, p = checked
            self._store(s, round_id, device_id, "input", meta, sha, blob=sha)
            secure.run(
                s,
                update(Participant)
                .where(Participant.id == p.id)
                .values(stage_done="input", num_examples=meta["num_examples"]),
            )
        self.sums.add(round_id, device_id, vec, meta["num_examples"])
        with self.ctx.device_write() as s:
            r2, _ = self._load(s, device_id, round_id)
            if r2 is not None and r2.status == "running":
                self.driver.maybe_drive(s, r2, self.ctx.clock())

    def _tree_update(self, device_id: str, round_id: int, r: RoundRow, body: bytes, numel: int) -> None:
        """A gbdt job's plaintext vector (cell counts or a level's histogram): checked against the rows the
        device declared, stored, added to the running sum. One that cannot be used excludes its sender
        from the round with the reason; the round goes on without it."""
        problem: str | None = None
        try:
            header, vec = codec.decode(body, expected_numel=numel, dtype="uint64")
            meta = check_update_header(header, round_id)
        except (codec.CodecError, Invalid) as err:
            problem = f"histogram refused: shape: {getattr(err, 'detail', str(err))}"
        if problem is None:
            with self.ctx.device_read() as s:
                reason = boosting.check_plain(self.ctx, s, r, device_id, vec)
            if reason is not None:
                problem = f"histogram refused: {reason}"
        if problem is not None:
            self._exclude(device_id, round_id, problem)
            raise Invalid(f"device excluded from round {round_id}: {problem}")
        self._accept_input(device_id, round_id, body, vec, meta)

    # -- secure stages (SecAgg+) ---------------------------------------------

    def _exclude_in(self, s: secure.Db, r: RoundRow, device_id: str, p: PartRow, reason: str) -> None:
        """Take a device out of a secure round for a message that cannot be used; the round goes on."""
        secure.run(
            s, update(Participant).where(Participant.id == p.id).values(status=EXCLUDED, reason=reason[:2000])
        )
        session = secure.orm(s)
        session.add(
            Event(
                actor="coordinator",
                action="participant.exclude",
                target=f"{r.job_id}/{r.number}/{device_id}",
                detail={"reason": reason[:500]},
            )
        )
        log.warning("job %s round %s: excluded %s: %s", r.job_id, r.number, device_id, reason)
        self.driver.drive(session, self.driver.orm_round(session, r), self.ctx.clock())

    def withdraw(self, device_id: str, round_id: int, reason: str) -> None:
        """The device leaves a round it accepted, saying why; it counts as dropped (under SecAgg+ its
        masks are recovered as any dropped device's) and the round goes on without waiting for it."""
        now = self.ctx.clock()
        with self.ctx.device_write() as s:
            r, p = participation.member(*self._load(s, device_id, round_id), device_id, round_id)
            reason = f"withdrew: {reason}"[:2000]
            secure.run(
                s, update(Participant).where(Participant.id == p.id).values(status=DROPPED, reason=reason)
            )
            session = secure.orm(s)
            session.add(
                Event(
                    actor=f"device:{device_id}",
                    action="participant.withdraw",
                    target=f"{r.job_id}/{r.number}/{device_id}",
                    detail={"reason": reason[:500]},
                )
            )
            log.warning("job %s round %s: %s %s", r.job_id, r.number, device_id, reason)
            self.driver.drive(session, self.driver.orm_round(session, r), now)

    def _exclude(self, device_id: str, round_id: int, reason: str) -> None:
        with self.ctx.device_write() as s:
            r, p = self._load(s, device_id, round_id)
            if r is not None and p is not None and p.status == ACTIVE and r.status == "running":
                self._exclude_in(s, r, device_id, p, reason)

    def _secure_message(
        self, s: secure.Db, device_id: str, round_id: int, stage: str, lock: bool = True
    ) -> tuple[RoundRow, PartRow, str | None]:
        """The round and participant for a secure-stage message, or the reason to exclude its sender."""
        r, p = self._load(s, device_id, round_id, lock)
        if r is not None and not r.secure:
            raise Invalid(f"round {round_id} does not use secure aggregation")
        if (
            r is not None
            and p is not None
            and r.status == "running"
            and p.status == ACTIVE
            and r.stage != stage
        ):
            return r, p, f"sent a {stage!r} message while the round is in stage {r.stage!r}"
        r, p = participation.check(r, p, device_id, round_id, stage, self.ctx.clock())
        return r, p, None

    def secure_json(self, device_id: str, round_id: int, stage: str, raw: bytes | dict[str, Any]) -> None:
        """advertise_keys, share_keys or unmask: checked, stored, and the round driven on.

        A message that is malformed, wrongly signed, addressed wrongly or sent
        in another stage excludes its sender from the round (reason recorded);
        it never reaches the arithmetic.
        """
        if stage not in secure.JSON_STAGES:
            raise NotFound(f"no stage {stage!r} takes a JSON message")
        body: Any = raw
        if isinstance(raw, bytes | bytearray):
            try:
                body = json.loads(raw or b"{}")
            except (ValueError, RecursionError):
                body = None
        # A body that is not a JSON object is refused below, unless it repeats what was accepted.
        message = bytes(raw) if isinstance(raw, bytes | bytearray) and not isinstance(body, dict) else body
        problem: str | None = None
        with self.ctx.device_write() as s:
            try:
                r, p, problem = self._secure_message(s, device_id, round_id, stage)
            except Conflict:
                if self._resent(s, device_id, round_id, stage, message):
                    return
                raise
            if problem is None and not isinstance(body, dict):
                problem = f"{stage} message refused: not a JSON object"
            if problem is None:
                sr = secure.SecureRound(s, r)
                try:
                    if stage == "advertise_keys":
                        payload = sr.check_advertise(s, device_id, body)
                    elif stage == "share_keys":
                        payload = sr.check_share_keys(device_id, body)
                    else:
                        payload = sr.check_unmask(device_id, body)
                except secure.Refused as err:
                    problem = f"{stage} message refused: {err}"
                else:
                    self._store(s, round_id, device_id, stage, payload, message_digest(message), done=p.id)
                    self.driver.maybe_drive(s, r, self.ctx.clock(), one_less(r))
            if problem is not None:
                self._exclude_in(s, r, device_id, p, problem)
        if problem is not None:
            raise Invalid(f"device excluded from round {round_id}: {problem}")

    def masked_input(self, device_id: str, round_id: int, body: bytes) -> None:
        """A masked vector: checked, stored (it reveals nothing alone) and added to the running sum."""
        problem: str | None = None
        with self.ctx.device_read() as s:
            try:
                r, _, problem = self._secure_message(s, device_id, round_id, "masked_input", lock=False)
            except Conflict:
                if self._resent(s, device_id, round_id, "masked_input", body):
                    return
                raise
            if r.kind == "stats":
                numel = len(secure.SecureRound(s, r).layout())
            elif r.kind in TREE_KINDS:
                numel = boosting.numel(self.ctx, s, r)
            elif (r.secagg or {}).get("privacy"):
                numel = SkellamParams(**(r.secagg or {})["privacy"]).coordinates  # noised: docs/privacy.md
            else:
                numel = self.ctx.num_parameters(s, r) + 1
            spec_data = self.ctx.job_spec(s, r.job_id, False)[0] if r.kind == "train" else {}
        if problem is None:
            try:
                header, vec = codec.decode(body, expected_numel=numel, dtype="uint64")
                if header.get("kind") != "masked_input":
                    raise Invalid("header kind must be 'masked_input'")
                meta = check_update_header({**header, "kind": "update", "num_examples": 1}, round_id)
            except (codec.CodecError, Invalid, Conflict) as err:
                problem = f"masked input refused: {getattr(err, 'detail', str(err))}"
        if problem is None:
            refused = privacy.report_problem(spec_data, meta.get("dp"))  # example-level DP: the cost asked
            problem = f"masked input refused: {refused}" if refused is not None else None
        if problem is not None:
            self._exclude(device_id, round_id, problem)
            raise Invalid(f"device excluded from round {round_id}: {problem}")
        meta.pop("num_examples")
        # With replicas (PostgreSQL) whichever one finishes the round needs every vector: each is stored. One
        # coordinator process (SQLite) keeps the running sum and stores it once, when the stage ends.
        digest = message_digest(body)
        name = None if self.ctx.sqlite else self.sums.spool(body)
        added = False
        try:
            with self.ctx.device_write() as s:
                checked = self._checked(s, device_id, round_id, "masked_input", body, self.ctx.clock())
                if checked is not None:
                    r, p = checked
                    self._store(s, round_id, device_id, "masked_input", meta, digest, blob=name, done=p.id)
                    # Into the running sum before the commit, so that this message may end the stage itself.
                    added = self.sums.add(round_id, device_id, vec, 0)
                    self.driver.maybe_drive(s, r, self.ctx.clock(), one_less(r))
        except BaseException:
            if name is not None:
                self.ctx.blobs.delete(name)
            if added:  # not committed: take the vector out of the running sum again
                self.sums.take_back(round_id, device_id, vec)
            raise
        if checked is None and name is not None:  # the same vector, sent again while this one was read
            self.ctx.blobs.delete(name)
