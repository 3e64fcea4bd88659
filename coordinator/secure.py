"""The coordinator's side of SecAgg+ rounds: setup, what each device is told, what it may send, the unmasking.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, over Bonawitz et al., CCS 2017. The coordinator routes
encrypted shares it cannot read, adds masked vectors as they arrive, and in
the last stage rebuilds only the secrets needed to remove the masks: the
self-mask seeds of devices whose input is in the sum, the mask keys of devices
that dropped after sharing. It never sees one device's update.

Sets, as in the papers: U1 advertised keys, U2 shared keys, U3 sent a masked
input (its vector is in the sum), U4 answered the unmask stage.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator.models import Device, Participant, Round, RoundMessage
from shared.jobspec import SecAggSpec
from shared.secagg import statistics as secagg_statistics
from shared.secagg.graph import neighbour_graph
from shared.secagg.params import SecAggParams, derive_params
from shared.secagg.primitives import SecAggError
from shared.secagg.protocol import check_distinct_keys, decode_share, verify_advertisement
from shared.signing import SignatureError, b64d, identity_verifier

SECURE_STAGES = ("configure", "advertise_keys", "share_keys", "masked_input", "unmask")
JSON_STAGES = ("advertise_keys", "share_keys", "unmask")
MAX_CIPHERTEXT_B64 = 1024


class Refused(Exception):
    """A device's secure-aggregation message that cannot be used: the device is excluded."""


def setup(cohort: list[str], spec: SecAggSpec, job_id: int, number: int) -> dict[str, Any]:
    """Parameters, graph seed and context of a new secure round (raises ValueError if infeasible)."""
    params = derive_params(
        len(cohort),
        dropout=spec.dropout,
        corruption=spec.corruption,
        k=spec.k,
        t=spec.t,
        clip=spec.clip,
        bits=spec.bits,
        weight_cap=spec.weight_cap,
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


_GRAPHS: dict[tuple[int, str], dict[str, list[str]]] = {}


def _graph(round_id: int, info: dict[str, Any], k: int) -> dict[str, list[str]]:
    """The round's neighbour graph, computed once per process (it depends only on the round's rows)."""
    key = (round_id, info["seed"])
    graph = _GRAPHS.get(key)
    if graph is None:
        if len(_GRAPHS) > 256:
            _GRAPHS.clear()
        graph = _GRAPHS[key] = neighbour_graph(info["cohort"], k, base64.b64decode(info["seed"]))
    return graph


class SecureRound:
    """A view of one secure round's state; it reads only the rows each question needs."""

    def __init__(self, s: Session, r: Round):
        self.s = s
        self.r = r
        info = r.secagg or {}
        self.params = SecAggParams(**info["params"])
        self.context = base64.b64decode(info["context"])
        self.cohort: list[str] = info["cohort"]
        self.graph = _graph(r.id, info, self.params.k)
        self._sent: dict[str, set[str]] = {}
        self._all: dict[str, dict[str, RoundMessage]] = {}
        self.vocabulary: dict[str, list[str]] = info.get("vocabulary") or {}

    def layout(self) -> list[tuple[str, str, str]]:
        """A statistics round's vector layout (from the job's schema and the merged vocabulary)."""
        from coordinator.models import Job
        from shared.jobspec import JobSpec

        job = self.s.get(Job, self.r.job_id)
        assert job is not None
        return secagg_statistics.layout(JobSpec.model_validate(job.spec).data, self.vocabulary)

    def sent(self, stage: str) -> set[str]:
        """Devices whose message for ``stage`` was accepted."""
        if stage not in self._sent:
            self._sent[stage] = set(
                self.s.scalars(
                    select(RoundMessage.device_id).where(
                        RoundMessage.round_id == self.r.id, RoundMessage.stage == stage
                    )
                )
            )
        return self._sent[stage]

    def payloads(self, stage: str, devices: Any = None) -> dict[str, dict[str, Any]]:
        """The messages of ``stage``, of ``devices`` only when given."""
        q = select(RoundMessage.device_id, RoundMessage.payload).where(
            RoundMessage.round_id == self.r.id, RoundMessage.stage == stage
        )
        if devices is not None:
            q = q.where(RoundMessage.device_id.in_(list(devices)))
        rows: list[Any] = list(self.s.execute(q).all())
        return {str(d): dict(p) for d, p in rows}

    @property
    def messages(self) -> dict[str, dict[str, RoundMessage]]:
        """Every message of the round, by stage (for the final unmasking)."""
        if not self._all:
            for m in self.s.scalars(select(RoundMessage).where(RoundMessage.round_id == self.r.id)):
                self._all.setdefault(m.stage, {})[m.device_id] = m
        return self._all

    def task(self, s: Session, device: str) -> dict[str, Any]:
        """What ``device`` needs for the round's current stage."""
        out: dict[str, Any] = {"params": asdict(self.params), "context": self.r.secagg["context"]}  # type: ignore[index]
        if self.r.kind == "stats":
            out["vocabulary"] = self.vocabulary
        stage = self.r.stage
        mine = self.graph.get(device, [])
        if stage == "share_keys":
            out["neighbours"] = self.payloads("advertise_keys", mine)
            peers = list(out["neighbours"])
            out["identity_keys"] = dict(
                s.execute(select(Device.id, Device.public_key).where(Device.id.in_(peers))).all()
            )
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

    def check_advertise(self, s: Session, device: str, body: dict[str, Any]) -> dict[str, Any]:
        identity = s.get(Device, device)
        verify = identity_verifier({device: identity.public_key} if identity is not None else {})
        try:
            keys = verify_advertisement(self.context, device, body, verify)
            others = {
                d: (b64d(p["c_pk"]), b64d(p["s_pk"])) for d, p in self.payloads("advertise_keys").items()
            }
            check_distinct_keys({**others, device: keys})
        except (SecAggError, SignatureError) as err:
            raise Refused(str(err)) from None
        return {"c_pk": body["c_pk"], "s_pk": body["s_pk"], "signature": body["signature"]}

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

    def can_unmask(self) -> bool:
        """Whether every secret the unmasking needs already has t shares (no need to wait for the rest)."""
        u2, u3 = self.sent("share_keys"), self.sent("masked_input")
        counts: dict[str, int] = {}
        for payload in self.payloads("unmask").values():
            for v in payload.get("shares", {}):
                counts[v] = counts.get(v, 0) + 1
        t = self.params.t
        if any(counts.get(u, 0) < t for u in u3):
            return False
        dropped = (v for v in u2 - u3 if any(n in u3 for n in self.graph.get(v, [])))
        return all(counts.get(v, 0) >= t for v in dropped)

    def reconstruction_inputs(self) -> dict[str, Any]:
        """The arguments of ``unmask_total`` other than the masked sum."""
        u2, u3 = self.sent("share_keys"), self.sent("masked_input")
        b_shares: dict[str, list[tuple[int, bytes]]] = {}
        sk_shares: dict[str, list[tuple[int, bytes]]] = {}
        for _responder, msg in sorted(self.messages.get("unmask", {}).items()):
            for v, text in msg.payload["shares"].items():
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
            "advertised": {d: m.payload for d, m in self.messages.get("advertise_keys", {}).items()},
            "b_shares": b_shares,
            "sk_shares": sk_shares,
        }


def survivors_in_order(parts: list[Participant], sr: SecureRound) -> list[str]:
    return sorted(p.device_id for p in parts if p.device_id in sr.sent("masked_input"))
