"""The coordinator's side of SecAgg+ rounds: setup, what each device is told, what it may send, the unmasking.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, over Bonawitz et al., CCS 2017. The coordinator routes
encrypted shares it cannot read, adds masked vectors as they arrive, and in
the last stage rebuilds only the secrets needed to remove the masks: the
self-mask seeds of devices whose input is in the sum, the mask keys of devices
that dropped after sharing. It never sees one device's update.

Sets, as in the papers: U1 advertised keys, U2 shared keys, U3 sent a masked
input (its vector is in the sum), U4 answered the unmask stage.

Every device message costs a few prebuilt SQL statements, not a scan of the
round: a message is accepted only in its own stage, under the round's row
lock, so once the round has moved past a stage that stage's messages can no
longer change, and what is derived from them (who advertised, the keys and
ciphertexts each device is sent, who is asked to unmask what) is read once
per process and kept (``_FROZEN``), keyed by round, seed and stage. What the
current stage has received so far is always read from the database, so
several API replicas may share a round.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import asdict
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Executable, Result, bindparam, or_, select
from sqlalchemy.orm import Session

from coordinator.models import Device, Participant, Round, RoundMessage
from shared.jobspec import SecAggSpec
from shared.secagg import statistics as secagg_statistics
from shared.secagg.graph import neighbour_graph
from shared.secagg.params import SecAggParams, derive_params
from shared.secagg.primitives import SecAggError, check_agreement_key
from shared.secagg.protocol import decode_share, verify_advertisement
from shared.signing import SignatureError, identity_verifier

SECURE_STAGES = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")
JSON_STAGES = ("advertise_keys", "share_keys", "unmask")
MAX_CIPHERTEXT_B64 = 1024


class Refused(Exception):
    """A device's secure-aggregation message that cannot be used: the device is excluded."""


def setup(
    cohort: list[str], spec: SecAggSpec, job_id: int, number: int, max_weight: int | None = None
) -> dict[str, Any]:
    """Parameters, graph seed and context of a new secure round (raises ValueError if infeasible).

    ``max_weight`` (``robustness.max_weight``, for training rounds) lowers the weight cap every device
    multiplies its clipped update by: the protocol's own bound on one device's pull (docs/robustness.md).
    """
    params = derive_params(
        len(cohort),
        dropout=spec.dropout,
        corruption=spec.corruption,
        k=spec.k,
        t=spec.t,
        clip=spec.clip,
        bits=spec.bits,
        weight_cap=spec.weight_cap if max_weight is None else min(spec.weight_cap, max_weight),
    )
    seed = secrets.token_bytes(32)
    context = f"aicfl/v1/job/{job_id}/round/{number}/{seed.hex()[:16]}".encode()
    return {
        "params": asdict(params),
        "seed": base64.b64encode(seed).decode(),
        "context": base64.b64encode(context).decode(),
        "cohort": sorted(cohort),
    }


def merged_vocabulary(s: Session, r: Round, accepted: list[str]) -> dict[str, list[str]]:
    """A statistics round's vocabulary: the union of the value sets the accepting devices named."""
    rows = s.execute(
        select(RoundMessage.payload).where(
            RoundMessage.round_id == r.id,
            RoundMessage.stage == "configure",
            RoundMessage.device_id.in_(accepted),
        )
    ).all()
    try:
        payloads: list[Any] = [p for (p,) in rows]
        return secagg_statistics.merge_vocabularies([p.get("vocabulary") or {} for p in payloads])
    except secagg_statistics.StatisticsEncodingError as err:
        raise ValueError(str(err)) from None


class RoundInfo(Protocol):
    """What a secure round's view reads of its round: an ORM ``Round`` or the engine's snapshot of one."""

    @property
    def id(self) -> int: ...
    @property
    def job_id(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def secagg(self) -> dict[str, Any] | None: ...


_T = TypeVar("_T")
# Per process, each cleared whole when full (a miss only costs a read): few rounds run at once, and what a
# round keeps in _FROZEN is its small messages (a few hundred kB for 100 devices), never a vector.
_GRAPHS: dict[tuple[int, str], tuple[SecAggParams, dict[str, Any], dict[str, list[str]]]] = {}
# (round id, seed, what, stage) -> what was read of a stage that is over
_FROZEN: dict[tuple[int, str, str, str], Any] = {}
_IDENTITY: dict[str, str] = {}  # device id -> its Ed25519 identity key (base64); enrolment fixes it for good
_LIMITS = {id(_GRAPHS): 256, id(_FROZEN): 64, id(_IDENTITY): 100_000}

_SENT = select(RoundMessage.device_id).where(
    RoundMessage.round_id == bindparam("round"), RoundMessage.stage == bindparam("stage")
)
_PAYLOADS = select(RoundMessage.device_id, RoundMessage.payload).where(
    RoundMessage.round_id == bindparam("round"), RoundMessage.stage == bindparam("stage")
)
_PAYLOADS_OF = _PAYLOADS.where(RoundMessage.device_id.in_(bindparam("devices", expanding=True)))
_BLOBS = select(RoundMessage.device_id, RoundMessage.blob_sha256).where(
    RoundMessage.round_id == bindparam("round"), RoundMessage.stage == "masked_input"
)
# Another device of the round that advertised one of these public keys (the database reads the JSON).
_KEY_CLASH = (
    select(RoundMessage.device_id)
    .where(
        RoundMessage.round_id == bindparam("round"),
        RoundMessage.stage == "advertise_keys",
        RoundMessage.device_id != bindparam("device"),
        or_(
            RoundMessage.payload["c_pk"].as_string().in_([bindparam("c_pk"), bindparam("s_pk")]),
            RoundMessage.payload["s_pk"].as_string().in_([bindparam("c_pk"), bindparam("s_pk")]),
        ),
    )
    .limit(1)
)
_IDENTITY_KEYS = select(Device.id, Device.public_key).where(
    Device.id.in_(bindparam("devices", expanding=True))
)


class Db:
    """One transaction of a device-message path: prebuilt Core statements on a connection, and an ORM
    session on that same connection only once something asks for one (a stage ends, a device is excluded,
    a cache misses). Most check-ins and messages never need one: a session costs about as much as the
    statements themselves."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(bind=self.conn, expire_on_commit=False)
        return self._session

    def flush(self) -> None:
        if self._session is not None:
            self._session.flush()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()  # leaves the connection's transaction to its owner


def orm(s: Session | Db) -> Session:
    """The ORM session of a transaction."""
    return s.session if isinstance(s, Db) else s


def run(s: Session | Db, stmt: Executable, **params: Any) -> Result[*tuple[Any, ...]]:
    """Run a prebuilt Core statement in the transaction, after flushing its session's pending changes.

    On the connection, not through ``Session.execute``: that skips the ORM's
    per-statement work; the flush keeps what it reads consistent with changes
    made through the ORM earlier in the transaction.
    """
    if isinstance(s, Db):
        s.flush()
        return s.conn.execute(stmt, params)
    s.flush()
    return s.connection().execute(stmt, params)


def _bounded(cache: dict[Any, Any]) -> None:
    if len(cache) >= _LIMITS[id(cache)]:
        cache.clear()


def _graph(round_id: int, info: dict[str, Any]) -> tuple[SecAggParams, dict[str, Any], dict[str, list[str]]]:
    """The round's parameters (also as sent to devices) and neighbour graph, computed once per process
    (fixed when configure ends)."""
    key = (round_id, info["seed"])
    hit = _GRAPHS.get(key)
    if hit is None:
        _bounded(_GRAPHS)
        params = SecAggParams(**info["params"])
        graph = neighbour_graph(info["cohort"], params.k, base64.b64decode(info["seed"]))
        hit = _GRAPHS[key] = (params, asdict(params), graph)
    return hit


def identity_keys(s: Session | Db, devices: Iterable[str]) -> dict[str, str]:
    """The enrolled Ed25519 keys of ``devices`` (those that exist), read once per process."""
    wanted = list(devices)
    missing = [d for d in wanted if d not in _IDENTITY]
    if missing:
        _bounded(_IDENTITY)
        _IDENTITY.update((str(d), str(k)) for d, k in run(s, _IDENTITY_KEYS, devices=missing))
    return {d: _IDENTITY[d] for d in wanted if d in _IDENTITY}


class SecureRound:
    """A view of one secure round's state; it reads only the rows each question needs."""

    def __init__(self, s: Session | Db, r: RoundInfo):
        self.s = s
        self.r = r
        info = r.secagg or {}
        self.seed: str = info["seed"]
        self.params, self._params_sent, self.graph = _graph(r.id, info)
        self.context = base64.b64decode(info["context"])
        self.cohort: list[str] = info["cohort"]
        self._sent: dict[str, AbstractSet[str]] = {}
        self.vocabulary: dict[str, list[str]] = info.get("vocabulary") or {}

    def _over(self, stage: str) -> bool:
        """Whether the round has moved past ``stage``: its messages can no longer change."""
        stages = SECURE_STAGES
        return stage in stages and self.r.stage in stages and stages.index(stage) < stages.index(self.r.stage)

    def _frozen(self, what: str, stage: str, build: Callable[[], _T]) -> _T:
        """``build()``, kept for the round once ``stage`` is over (read afresh while it is not)."""
        if not self._over(stage):
            return build()
        key = (self.r.id, self.seed, what, stage)
        if key not in _FROZEN:
            _bounded(_FROZEN)
            _FROZEN[key] = build()
        return _FROZEN[key]  # type: ignore[no-any-return]

    def layout(self) -> list[Any]:
        """A statistics round's vector layout (from the job's schema and the merged vocabulary)."""
        from coordinator.models import Job
        from shared.jobspec import JobSpec

        def build() -> list[Any]:
            from coordinator.apps import app_for, context

            job = orm(self.s).get(Job, self.r.job_id)
            assert job is not None
            spec = JobSpec.model_validate(job.spec)
            statistics = app_for(spec).statistics
            assert statistics is not None, "a statistics round is opened only for an app that has one"
            return list(statistics.layout(self.vocabulary, context(spec, None)))

        # Fixed once configure is over, as the vocabulary is.
        return self._frozen("layout", "configure", build)

    def sent(self, stage: str) -> AbstractSet[str]:
        """Devices whose message for ``stage`` was accepted."""
        if stage not in self._sent:
            self._sent[stage] = self._frozen(
                "sent",
                stage,
                lambda: frozenset(str(d) for (d,) in run(self.s, _SENT, round=self.r.id, stage=stage)),
            )
        return self._sent[stage]

    def payloads(self, stage: str, devices: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """The messages of ``stage``, of ``devices`` only when given (shared: read them, do not change them)."""
        if self._over(stage):
            every: dict[str, dict[str, Any]] = self._frozen("payloads", stage, lambda: self._read(stage))
            if devices is None:
                return dict(every)
            return {d: every[d] for d in devices if d in every}
        return self._read(stage, devices)

    def _read(self, stage: str, devices: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        if devices is None:
            found = run(self.s, _PAYLOADS, round=self.r.id, stage=stage)
        else:
            found = run(self.s, _PAYLOADS_OF, round=self.r.id, stage=stage, devices=list(devices))
        return {str(d): p for d, p in found}

    def blobs(self) -> dict[str, str]:
        """Where each masked input is stored, by sender."""
        return {str(d): str(b) for d, b in run(self.s, _BLOBS, round=self.r.id) if b}

    def task(self, s: Session | Db, device: str) -> dict[str, Any]:
        """What ``device`` needs for the round's current stage."""
        out: dict[str, Any] = {"params": dict(self._params_sent), "context": (self.r.secagg or {})["context"]}
        if self.r.kind == "stats":
            out["vocabulary"] = self.vocabulary
        noise = (self.r.secagg or {}).get("privacy")
        if noise:
            out["privacy"] = noise  # the round's Skellam parameters (coordinator/privacy.py)
        stage = self.r.stage
        mine = self.graph.get(device, [])
        if stage == "share_keys":
            out["neighbours"] = self.payloads("advertise_keys", mine)
            out["identity_keys"] = identity_keys(s, out["neighbours"])
        elif stage == "masked_input":
            out["ciphertexts"] = {
                v: p["ciphertexts"][device]
                for v, p in self.payloads("share_keys", mine).items()
                if device in p["ciphertexts"]
            }
        elif stage == "unmask":
            u2, u3 = self.sent("share_keys"), self.sent("masked_input")
            out["survivors"] = sorted(v for v in mine if v in u3)
            out["dropped"] = sorted(v for v in mine if v in u2 and v not in u3)
        return out

    # -- checks of incoming messages (a failure excludes the sender) ----------

    def check_advertise(self, s: Session | Db, device: str, body: dict[str, Any]) -> dict[str, Any]:
        verify = identity_verifier(identity_keys(s, [device]))
        try:
            c_pk, s_pk = verify_advertisement(self.context, device, body, verify)
            for name, key in (("c_pk", c_pk), ("s_pk", s_pk)):
                try:
                    check_agreement_key(key)
                except SecAggError as err:
                    raise SecAggError(f"advertise message of device {device!r}: {name}: {err}") from None
        except (SecAggError, SignatureError) as err:
            raise Refused(str(err)) from None
        # A key another device already advertised was replayed or copied: agreeing with it would let one
        # party read shares or masks meant for another. Compared as the canonical base64 of the raw keys.
        ours = {"c_pk": base64.b64encode(c_pk).decode(), "s_pk": base64.b64encode(s_pk).decode()}
        other = run(s, _KEY_CLASH, round=self.r.id, device=device, **ours).scalar()
        if other is not None:
            first, second = sorted((str(other), device))
            raise Refused(f"devices {first!r} and {second!r} advertised the same public key")
        return {**ours, "signature": body["signature"]}

    def check_share_keys(self, device: str, body: dict[str, Any]) -> dict[str, Any]:
        cts = body.get("ciphertexts")
        if not isinstance(cts, dict):
            raise Refused("share_keys message needs a 'ciphertexts' table")
        expected = {v for v in self.graph.get(device, []) if v in self.sent("advertise_keys")}
        if set(cts) != expected:
            raise Refused(
                f"share_keys message must address exactly its {len(expected)} advertised neighbours; "
                f"got {len(cts)} recipients"
            )
        for v, ct in cts.items():
            if not isinstance(ct, str) or len(ct) > MAX_CIPHERTEXT_B64:
                raise Refused(
                    f"ciphertext for {v!r} is not a base64 string of at most {MAX_CIPHERTEXT_B64} characters"
                )
            try:
                base64.b64decode(ct.encode(), validate=True)
            except ValueError:
                raise Refused(f"ciphertext for {v!r} is not valid base64") from None
        return {"ciphertexts": cts}

    def check_unmask(self, device: str, body: dict[str, Any]) -> dict[str, Any]:
        shares = body.get("shares")
        if not isinstance(shares, dict):
            raise Refused("unmask message needs a 'shares' table")
        asked = self.task_sets(device)
        extra = sorted(set(shares) - asked)
        if extra:
            raise Refused(f"unmask message holds a share for {extra[0]!r}, which was not asked for")
        for v, text in shares.items():
            try:
                decode_share(text)
            except SecAggError as err:
                raise Refused(f"share for {v!r}: {err}") from None
        return {"shares": shares}

    def task_sets(self, device: str) -> set[str]:
        u2 = self.sent("share_keys")
        return {v for v in self.graph.get(device, []) if v in u2}

    # -- the last stage ------------------------------------------------------

    def _needed(self) -> list[str]:
        """The devices whose secret the unmasking rebuilds: every survivor's self-mask seed, and the mask key
        of every device that dropped after sharing and has a surviving neighbour."""
        u2, u3 = self.sent("share_keys"), self.sent("masked_input")
        dropped = [v for v in u2 - u3 if any(n in u3 for n in self.graph.get(v, []))]
        return sorted(u3) + sorted(dropped)

    def can_unmask(self) -> bool:
        """Whether every secret the unmasking needs already has t shares (no need to wait for the rest)."""
        needed, t = self._needed(), self.params.t
        # Only a device's neighbours hold its shares: while one lacks t answering neighbours, the answers'
        # contents need not be read.
        answered = self.sent("unmask")
        if any(sum(n in answered for n in self.graph.get(v, [])) < t for v in needed):
            return False
        counts: dict[str, int] = {}
        for payload in self.payloads("unmask").values():
            for v in payload.get("shares", {}):
                counts[v] = counts.get(v, 0) + 1
        return all(counts.get(v, 0) >= t for v in needed)

    def reconstruction_inputs(self) -> dict[str, Any]:
        """The arguments of ``unmask_total`` other than the masked sum."""
        u2, u3 = self.sent("share_keys"), self.sent("masked_input")
        b_shares: dict[str, list[tuple[int, bytes]]] = {}
        sk_shares: dict[str, list[tuple[int, bytes]]] = {}
        for _responder, payload in sorted(self.payloads("unmask").items()):
            for v, text in payload["shares"].items():
                share = decode_share(text)
                if v in u3:
                    b_shares.setdefault(v, []).append(share)
                elif v in u2:
                    sk_shares.setdefault(v, []).append(share)
        return {
            "context": self.context,
            "params": self.params,
            "graph": self.graph,
            "shared": u2,
            "survivors": u3,
            "advertised": self.payloads("advertise_keys"),
            "b_shares": b_shares,
            "sk_shares": sk_shares,
            # A training round's sum carries weights: its bounds are checked once unmasked. A noised
            # round's (differential privacy) is signed, weight 1 each: coordinator/finish.py checks it.
            "weighted": self.r.kind == "train" and not (self.r.secagg or {}).get("privacy"),
        }


def survivors_in_order(parts: list[Participant], sr: SecureRound) -> list[str]:
    return sorted(p.device_id for p in parts if p.device_id in sr.sent("masked_input"))
