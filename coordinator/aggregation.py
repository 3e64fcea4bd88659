"""The sums a round aggregates: plain example-weighted updates, or SecAgg+ masked vectors modulo 2**64.

Vectors are added to a running sum in memory as they arrive, so that a round ends without reading
them back. When that sum does not account for exactly the devices the database says have sent theirs
(another replica took some, or this process restarted), the sum is recomputed from what the blob
store holds. Under SecAgg+ with one coordinator process (SQLite) only the running masked sum is
stored, once, when the masked-input stage ends; with replicas (PostgreSQL) each masked vector is.
A masked vector alone reveals nothing; no unmasked individual update is ever held here.

A round's masked vectors and masked sum are stored under names that begin with the round's own prefix
(``round_prefix``), and ending the round deletes everything under it: also a vector written by a
process killed before the row that names it committed, which no row would ever lead to.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from coordinator import robustness, secure
from coordinator.context import EngineContext
from coordinator.models import Round, RoundMessage
from shared import codec
from shared.secagg.primitives import SecAggError
from shared.signing import public_key_bytes

# Hex digits of a spooled blob's name that say whose round it is: 64 bits, so that a model's SHA-256
# starts with a round's prefix with odds of 2**-64; the 192 bits after them are random.
ROUND_PREFIX_DIGITS = 16


def round_prefix(coordinator_key: bytes, round_id: int) -> str:
    """The first hex digits of the names of round ``round_id``'s masked vectors and masked sum.

    Derived from the round's id and the coordinator's public key (``coordinator_key``, raw), so that
    another federation (another key) on the same bucket, whose round ids repeat ours, never shares it.
    """
    tag = hashlib.sha256(b"aicfl round blobs\0" + coordinator_key + str(round_id).encode()).hexdigest()
    return tag[:ROUND_PREFIX_DIGITS]


@dataclass
class Accumulator:
    """The running weighted sum of one round's updates, as they arrive."""

    total: np.ndarray
    examples: int = 0
    contributors: set[str] = field(default_factory=set)
    seconds: float = 0.0


class Sums:
    """Each running round's sum, and the stored vectors it falls back on."""

    def __init__(self, ctx: EngineContext):
        self.ctx = ctx
        self._acc: dict[int, Accumulator] = {}
        self._acc_lock = threading.Lock()

    def add(self, round_id: int, device_id: str, vec: np.ndarray, n: int) -> bool:
        """Add a vector to the round's running sum; False when it was not added (already in, or misfit)."""
        with self._acc_lock:
            # This thread's CPU time: what the addition costs, not the wait for the lock or the GIL
            # while other uploads are being received.
            t0 = time.thread_time()
            acc = self._acc.get(round_id)
            if acc is None:
                acc = self._acc[round_id] = Accumulator(total=np.zeros(vec.size, dtype=vec.dtype))
            if device_id in acc.contributors or acc.total.size != vec.size or acc.total.dtype != vec.dtype:
                return False
            acc.total += vec  # updates arrive weighted by their example counts
            acc.examples += n
            acc.contributors.add(device_id)
            acc.seconds += time.thread_time() - t0
            return True

    def held(self) -> set[int]:
        """The rounds whose running sum this process holds."""
        with self._acc_lock:
            return set(self._acc)

    def forget_ended(self, running: AbstractSet[int]) -> None:
        """Forget the running sums of rounds that have ended, wherever they ended.

        The process that ends a round forgets its sum (``discard``); with replicas the others held a
        part of it too, which nothing else would free: a model-sized array per round and replica.
        ``running``: the rounds known to run (the ticker's read), never forgotten; the others are
        forgotten only once the database says they are over.
        """
        with self._acc_lock:
            candidates = [r for r in self._acc if r not in running]
        if not candidates:
            return
        with self.ctx.read() as s:
            ended = s.scalars(
                select(Round.id).where(Round.id.in_(candidates), Round.status != "running")
            ).all()
        with self._acc_lock:
            for round_id in ended:
                self._acc.pop(round_id, None)

    def take_back(self, round_id: int, device_id: str, vec: np.ndarray) -> None:
        """Remove a vector whose message was not committed (exact: modulo 2**64 for masked vectors)."""
        with self._acc_lock:
            acc = self._acc.get(round_id)
            if acc is not None and device_id in acc.contributors:
                acc.total -= vec
                acc.contributors.discard(device_id)

    def prefix(self, round_id: int) -> str:
        """``round_prefix`` of one of this federation's rounds."""
        return round_prefix(public_key_bytes(self.ctx.key), round_id)

    def spool(self, body: bytes) -> str:
        """Keep a masked vector (or a masked sum) in the blob store until its round ends, so that a restarted
        coordinator or another replica can still add it; returns the name it is stored under.

        The name is the round's prefix (the round the body's header names, which the device-message path
        has checked against the request's round) and 192 random bits, not the body's SHA-256: content
        addressing buys nothing for data written once, read at most once and deleted with its round, and
        hashing 8 MB costs as much as writing it.
        """
        header, _ = codec.decode_header(body)
        round_id = header.get("round_id")
        if not isinstance(round_id, int) or isinstance(round_id, bool):
            raise ValueError(f"a spooled vector's header names no round: {header.get('round_id')!r}")
        name = self.prefix(round_id) + secrets.token_hex(32 - ROUND_PREFIX_DIGITS // 2)
        self.ctx.blobs.put_new(name, body)  # read only once its message row is committed, after this returns
        return name

    def _running(self, r: Round, senders: AbstractSet[str], numel: int) -> Accumulator | None:
        """The sum kept in memory as the vectors arrived, if it holds exactly the senders' vectors."""
        with self._acc_lock:
            acc = self._acc.pop(r.id, None)
        if acc is not None and acc.contributors == senders and acc.total.size == numel:
            return acc
        return None  # another replica took some vectors, or this process restarted: sum from the store

    def plain(self, r: Round, msgs: list[RoundMessage], numel: int) -> tuple[np.ndarray, int, float]:
        """The sum of a plain round's example-weighted updates, their example count, and the adding's CPU time.

        The sum goes through the job's robust rule, if any, and its bounds are checked
        (``robustness.check_plain_aggregate``: ``AggregateRejected`` rejects the round).
        """
        acc = self._running(r, {m.device_id for m in msgs}, numel)
        if acc is not None:
            total, examples, seconds = acc.total, acc.examples, acc.seconds
        else:
            total = np.zeros(numel, dtype=np.float32)
            for m in msgs:
                total += codec.decode(self.ctx.blobs.get(m.blob_sha256 or ""), expected_numel=numel)[1]
            examples, seconds = sum(int(m.payload["num_examples"]) for m in msgs), 0.0
        s = object_session(r)
        if s is not None:
            total, examples = robustness.check_plain_aggregate(self.ctx, s, r, msgs, total, examples)
        return total, examples, seconds

    def histograms(self, r: Round, msgs: list[RoundMessage], numel: int) -> np.ndarray:
        """The sum modulo 2**64 of a plaintext tree round's vectors (a gbdt job, ``secure = false``)."""
        acc = self._running(r, {m.device_id for m in msgs}, numel)
        if acc is not None:
            return acc.total
        total = np.zeros(numel, dtype=np.uint64)
        for m in msgs:
            total += codec.decode(
                self.ctx.blobs.get(m.blob_sha256 or ""), expected_numel=numel, dtype="uint64"
            )[1]
        return total

    def masked(self, r: Round, sr: secure.SecureRound, numel: int) -> tuple[np.ndarray, float]:
        """The sum modulo 2**64 of a secure round's masked vectors, and the adding's CPU time."""
        senders = sr.sent("masked_input")
        acc = self._running(r, senders, numel)
        if acc is not None:
            return acc.total, acc.seconds
        # This process restarted (or another replica took some vectors): the stored sum, or the stored vectors.
        stored_sum = (r.secagg or {}).get("masked_sum")
        if stored_sum and set(stored_sum["contributors"]) == senders:
            blob = self.ctx.blobs.get(stored_sum["blob"])
            return codec.decode(blob, expected_numel=numel, dtype="uint64")[1].copy(), 0.0
        stored = sr.blobs()
        missing = sorted(senders - set(stored))
        if missing:
            raise SecAggError(
                f"the masked inputs of {len(missing)} devices are neither in this process's running sum nor"
                " stored (the coordinator restarted during the masked-input stage)"
            )
        total = np.zeros(numel, dtype=np.uint64)
        for d in sorted(senders):
            total += codec.decode(self.ctx.blobs.get(stored[d]), expected_numel=numel, dtype="uint64")[
                1
            ]  # mod 2**64
        return total, 0.0

    def store_masked(self, s: Session, r: Round) -> str | None:
        """At the end of a secure round's masked-input stage, with one coordinator process: store the running
        sum (once, instead of every vector) and name its contributors in the round's SecAgg+ state, so that
        a coordinator restarted during the unmask stage still finishes the round.

        Returns why the round must be abandoned instead: this process restarted during the stage, so the
        inputs it had added before are lost (the devices do not send them twice).
        """
        senders = secure.SecureRound(s, r).sent("masked_input")
        if not senders:
            return None  # nothing to store; the round's own checks end it
        with self._acc_lock:
            acc = self._acc.get(r.id)
            if acc is None or acc.contributors != senders:
                kept = 0 if acc is None else len(acc.contributors & senders)
                return (
                    f"the coordinator restarted during the masked-input stage: {len(senders) - kept} of the "
                    f"{len(senders)} masked inputs were lost with its running sum"
                )
            body = codec.encode({"kind": "masked_sum", "round_id": r.id}, acc.total)
        name = self.spool(body)
        r.secagg = {**(r.secagg or {}), "masked_sum": {"blob": name, "contributors": sorted(senders)}}
        return None

    def discard(self, s: Session, r: Round) -> None:
        """Forget a round's running sum and delete its stored vectors: the round is over.

        A secure round's masked vectors and sum go by its prefix, named by a row or not (a vector whose
        message a killed process never committed); plain updates, by the rows that name them.
        """
        with self._acc_lock:
            self._acc.pop(r.id, None)
        if r.secagg is not None:  # set once configure ends: no masked vector is stored before that
            self.ctx.blobs.delete_prefix(self.prefix(r.id))
        stored_sum = (r.secagg or {}).get("masked_sum")
        if stored_sum:
            self.ctx.blobs.delete(stored_sum["blob"])  # gone already, unless stored before names had prefixes
        shas = s.scalars(
            select(RoundMessage.blob_sha256).where(
                RoundMessage.round_id == r.id, RoundMessage.blob_sha256.is_not(None)
            )
        )
        for sha in shas:
            if sha:
                self.ctx.blobs.delete(sha)
