"""Two coordinator replicas serve one federation, and a replica killed with kill -9 mid-round loses nothing.

Two `server start` processes on one PostgreSQL database and one S3 bucket (a moto server), with one
signing key, both tickers running. Real agent processes and the operator reach them through an
alternating proxy (``tests.fixtures.alternating_proxy``): each HTTP request goes to the other replica
than the one before, so a device's check-in is held on one replica while the round it is woken for
was opened or moved on by the other, and its messages of one round land on both.

The in-process tests at the end pin the two fixes replicas needed: the ticker takes a running round's
row (``SKIP LOCKED``) before driving it, and a replica forgets its part of a round's running sum once
another replica has ended the round.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, select, text

from coordinator.engine import EngineSettings, Federation
from coordinator.keys import PUBLISHED_KEY
from coordinator.models import Event
from coordinator.store import make_engine, session_factory
from shared import codec
from shared.signing import load_public_key, save_private_key, verify_model
from tests.fixtures.alternating_proxy import AlternatingProxy
from tests.fixtures.s3 import AWS_ENV, new_bucket, s3_client
from tests.fixtures.toy_app import make_data

from . import harness
from .harness import Coordinator, wait_for
from .test_secure_engine import STAGE_TIMEOUT, Rig

APP = "tests.fixtures.toy_app:app"
AGENT_ENV = {"AICFL_AGENT_PRELOAD": APP}
DEVICES = 4
SECURE_STAGES = ["configure", "advertise_keys", "share_keys", "masked_input", "unmask"]
CLIP = 0.5  # secagg.clip's default: no coordinate of a round's mean change may exceed it
KILL_AFTER = 2  # replica 0 is killed once it has accepted two masked inputs of the round


def job_spec(name: str, rounds: int) -> dict[str, Any]:
    # A stage deadline (30 s) well under the agents' hold (55 s): a held check-in that a round opened
    # or moved on by the other replica failed to wake would miss the stage and be dropped.
    return {
        "name": name,
        "rounds": rounds,
        "seed": 4,
        "secure": True,
        "model": {"app": APP},
        "cohort": {"target": DEVICES, "minimum": 3, "stage_timeout": 30, "selection_timeout": 2},
        "training": {"epochs": 2, "learning_rate": 0.5},
        "evaluation": {"federated": False},
        "audit": {"enabled": False},
    }


def bare(path: str) -> str:
    """A request target without its query (``?wait=...``)."""
    return path.split("?", 1)[0]


def device_requests(url: str) -> dict[str, float]:
    """Requests this replica answered, by device route, from its own /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name != "aicfl_http_requests":
            continue
        for sample in family.samples:
            route = sample.labels.get("route", "")
            if sample.name.endswith("_total") and route.startswith("/v1/device/"):
                out[route] = out.get(route, 0.0) + sample.value
    return out


def events(db_url: str, action: str) -> list[str]:
    """The targets (job/round) of the event log's ``action`` entries."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [str(t) for (t,) in conn.execute(select(Event.target).where(Event.action == action))]
    finally:
        engine.dispose()


@pytest.fixture
def replicas(
    s3_endpoint: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[list[Coordinator], str]]:
    """Two replicas on one fresh database and bucket, with one signing key; and the bucket's name."""
    bucket = new_bucket(s3_endpoint)
    key_file = tmp_path / "secret" / "coordinator_key.pem"
    key_file.parent.mkdir(mode=0o700)
    save_private_key(Ed25519PrivateKey.generate(), str(key_file))  # a Secret mounted in every replica
    # harness.ENV was copied from the environment when it was imported: the processes get these too.
    for name, value in {
        **AWS_ENV,
        "AICFL_BLOB_STORE": f"s3://{bucket}/fl",
        "AICFL_S3_ENDPOINT_URL": s3_endpoint,
        "AICFL_SIGNING_KEY_FILE": str(key_file),
    }.items():
        monkeypatch.setitem(harness.ENV, name, value)
    pair = [Coordinator(tmp_path / "a", db=postgres_url), Coordinator(tmp_path / "b", db=postgres_url)]
    pair[0].bootstrap()
    pair[1].root.mkdir()
    pair[1].token = pair[0].token
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Coordinator.start, pair))
        yield pair, bucket
    finally:
        for c in pair:
            c.stop()


@pytest.mark.postgres
@pytest.mark.slow
def test_two_replicas_serve_one_federation_and_kill_9_of_one_mid_round_loses_nothing(
    replicas: tuple[list[Coordinator], str], s3_endpoint: str, postgres_url: str, tmp_path: Path
) -> None:
    pair, bucket = replicas
    armed = threading.Event()
    accepted_by_victim: list[int] = []  # masked inputs taken when it was killed
    killed: dict[str, float] = {}

    def steer(method: str, path: str) -> int | None:
        # Once armed, every masked input goes to replica 0 first: its running sum holds them when it dies.
        return 0 if armed.is_set() and bare(path).endswith("/masked_input") else None

    def kill_after_two(job_id: int) -> None:
        # Accepted is committed: the message's row is in. (Its answer is held until the device owes its
        # next message, the agent sending it with ?wait: the answers are no signal.) The others are on
        # their way in, or yet to come.
        db = create_engine(postgres_url)
        count = text(
            "SELECT count(*) FROM round_messages m JOIN rounds r ON r.id = m.round_id"
            " WHERE r.job_id = :job AND m.stage = 'masked_input'"
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with db.connect() as conn:
                    accepted = conn.execute(count, {"job": job_id}).scalar_one()
                if accepted >= KILL_AFTER:
                    accepted_by_victim.append(accepted)
                    assert pair[0].proc is not None
                    pair[0].proc.kill()
                    pair[0].proc.wait()
                    killed["at"] = time.time()
                    return
                time.sleep(0.005)
        finally:
            db.dispose()

    proxy = AlternatingProxy([c.port for c in pair], route=steer).start()
    front = Coordinator(tmp_path / "front", port=proxy.port)  # the federation's one address: the proxy
    front.root.mkdir()
    front.token = pair[0].token
    try:
        data = tmp_path / "data"
        data.mkdir()
        with ThreadPoolExecutor(DEVICES) as pool:
            homes = list(
                pool.map(
                    lambda i: front.enroll(make_data(data / f"d{i}.npz", 120, seed=i), f"d{i}"),
                    range(DEVICES),
                )
            )
        for home in homes:
            front.run_agent(home, AGENT_ENV)
        api = front.api()
        wait_for(
            lambda: sum(d["online"] for d in api.json("GET", "/v1/devices")) == DEVICES,
            90,
            "every agent online",
        )

        # -- both replicas up: a secure job of two rounds -------------------------------------------
        first = api.json("POST", "/v1/jobs", json=job_spec("replicas", 2))
        front.wait_job(first["id"], timeout=150)
        rounds = front.rounds(first["id"])
        assert [(r["kind"], r["status"]) for r in rounds] == [("train", "completed")] * 2, rounds
        for r in rounds:
            # Every device woken for every stage wherever its check-in was held: none dropped.
            assert (r["participants"], r["completed_by"], r["dropped"]) == (DEVICES, DEVICES, 0), r
            assert [st["stage"] for st in r["stages"]] == SECURE_STAGES, r["stages"]
        served = [device_requests(c.url) for c in pair]
        for i, counts in enumerate(served):
            assert counts.get("/v1/device/checkin", 0) > 0, (i, counts)
            assert sum(v for k, v in counts.items() if k.startswith("/v1/device/rounds/")) > 0, (i, counts)
        for i in (0, 1):  # requests held on each replica (check-ins, and round messages sent with ?wait)
            assert any(
                f.upstream == i
                and f.path.startswith("/v1/device/")
                and f.ended - f.started > 0.5
                and f.status == 200
                for f in proxy.forwarded
            )

        # -- kill -9 of replica 0 while the round's masked inputs arrive --------------------------------
        armed.set()
        second = api.json("POST", "/v1/jobs", json=job_spec("kill", 1))
        watcher = threading.Thread(target=kill_after_two, args=(second["id"],), daemon=True)
        watcher.start()
        wait_for(lambda: killed, 120, "replica 0 to accept two masked inputs")
        assert accepted_by_victim[0] < DEVICES, "every masked input was in before the kill"
        job = front.wait_job(second["id"], timeout=120)
        assert pair[0].proc is not None and pair[0].proc.returncode == -9
        (r,) = front.rounds(second["id"])
        assert r["status"] == "completed", r
        # Nothing lost: the two masked inputs replica 0 had added to its running sum (then lost with
        # it), the one it was reading when it died (sent again by its agent) and the last one are all in.
        assert (r["participants"], r["completed_by"], r["dropped"]) == (DEVICES, DEVICES, 0), r
        assert [st["stage"] for st in r["stages"]] == SECURE_STAGES, r["stages"]
        assert r["metrics"]["aggregation"]["from_store"] is True
        # The example counts travel inside the masked sum: all four devices' weights, once each.
        assert r["metrics"]["examples"] == rounds[0]["metrics"]["examples"]
        # Those in flight to replica 0 when it died were answered 502 and sent again to replica 1: the
        # ones it had taken and was holding for their next task too (their resends are taken as repeats).
        in_flight = sum(bare(f.path).endswith("/masked_input") and f.status == 502 for f in proxy.forwarded)
        assert KILL_AFTER <= in_flight <= DEVICES
        print(
            f"\nkill -9 after {KILL_AFTER}/{DEVICES} masked inputs ({in_flight} in flight):"
            " the survivor completed the round"
            f" {r['stages'][-1]['ended'] - killed['at']:.2f} s after the kill"
            f" (masked_input stage {r['stages'][3]['seconds']:.2f} s, unmask {r['stages'][4]['seconds']:.2f} s)"
        )

        # -- what every replica and the bucket hold -----------------------------------------------------
        key = load_public_key(httpx.get(pair[1].url + "/v1/coordinator/key").json()["public_key"])
        s3 = s3_client(s3_endpoint)
        for job_id, expected in ((first["id"], [0, 1, 2]), (job["id"], [0, 1])):
            versions = api.json("GET", f"/v1/jobs/{job_id}/models")
            assert [v["version"] for v in versions] == expected
            for v in versions:
                blob = s3.get_object(Bucket=bucket, Key=f"fl/{v['sha256'][:2]}/{v['sha256']}")["Body"].read()
                assert hashlib.sha256(blob).hexdigest() == v["sha256"]
                verify_model(key, job_id, v["version"], blob, v["sha256"], v["signature"])
            vectors = [
                codec.decode(api.request("GET", f"/v1/jobs/{job_id}/models/{v}/blob").content)[1]
                for v in expected
            ]
            for before, after in zip(vectors, vectors[1:], strict=False):
                # A sum missing a vector, or holding one twice, leaves masks in: no longer a mean change.
                assert np.abs(after - before).max() <= CLIP + 1e-3, (before, after)
        # A round's masked vectors are deleted with it, by its prefix: also one that replica 0 had stored
        # but not yet committed when it died, which no row names (docs/replicas.md). What stays: the
        # models and the public key the replicas published at start.
        kept = {
            f"fl/{v['sha256'][:2]}/{v['sha256']}"
            for job_id in (first["id"], job["id"])
            for v in api.json("GET", f"/v1/jobs/{job_id}/models")
        } | {f"fl/{PUBLISHED_KEY[:2]}/{PUBLISHED_KEY}"}
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="fl/").get("Contents", [])
        left = sorted(o["Key"] for o in listed if o["Key"] not in kept)
        assert left == [], left
        assert {o["Key"] for o in listed} == kept
        # Each round completed once, by one replica, and none was abandoned.
        completed = events(postgres_url, "round.complete")
        expected_rounds = [f"{first['id']}/{x['number']}" for x in rounds] + [f"{second['id']}/{r['number']}"]
        assert sorted(completed) == sorted(expected_rounds), completed
        assert events(postgres_url, "round.abandon") == []
    finally:
        front.stop_agents()
        proxy.stop()


# -- the proxy itself --------------------------------------------------------------------------------


class _Named(BaseHTTPRequestHandler):
    """Answers every request with the server's name and the size of the body it read."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        size = len(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        body = f"{self.server.name} {size}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_the_proxy_alternates_requests_on_one_connection_and_skips_a_dead_upstream() -> None:
    servers = []
    for name in ("a", "b"):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        srv.name = name  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    with (
        AlternatingProxy([s.server_address[1] for s in servers]) as proxy,
        httpx.Client(base_url=proxy.url) as client,
    ):
        answers = [client.post("/x", content=b"z" * n).text for n in (1, 2, 3, 4)]
        assert answers == ["a 1", "b 2", "a 3", "b 4"]  # one kept-alive connection, each request in turn
        servers[1].shutdown()
        servers[1].server_close()
        assert [client.post("/x", content=b"").text for _ in range(3)] == ["a 0"] * 3
        servers[0].shutdown()
        servers[0].server_close()
        down = client.post("/x")
        assert down.status_code == 502 and down.json()["title"] == "Bad gateway"
        assert [f.upstream for f in proxy.forwarded] == [0, 1, 0, 1, 0, 0, 0, None]


# -- the fixes, in-process on PostgreSQL ---------------------------------------------------------------


@pytest.fixture
def rig(postgres_url: str, tmp_path: Path) -> Iterator[Rig]:
    """A secure training round open on a fresh PostgreSQL database, its devices yet to answer."""
    made = Rig(postgres_url, tmp_path / "rig", 3)
    yield made
    made.close()


def replica_of(rig: Rig) -> tuple[Federation, Engine]:
    """A second replica of ``rig``'s coordinator: its own engine and process state, the same database."""
    engine = make_engine(rig.engine.url.render_as_string(hide_password=False))
    fed = Federation(
        session_factory(engine),
        rig.fed.blobs,
        rig.fed.key,
        EngineSettings(eligibility_window=3600),
        clock=rig.clock,
    )
    return fed, engine


@pytest.mark.postgres
def test_the_ticker_leaves_a_round_whose_row_a_device_message_holds(rig: Rig) -> None:
    """A device message drives its round under the round's row lock: another replica's ticker (or this
    one's) must neither drive the round from a stale read nor wait for the lock."""
    rig.clock.advance(STAGE_TIMEOUT + 1)  # nobody answered configure: the ticker would abandon the round
    with rig.engine.connect() as holder:
        holder.execute(text("SELECT id FROM rounds WHERE id = :id FOR UPDATE"), {"id": rig.round_id})
        ticker = threading.Thread(target=rig.fed.tick, daemon=True)
        ticker.start()
        ticker.join(timeout=10)
        assert not ticker.is_alive(), "the ticker waited for the round's row lock"
        assert rig.state() == ("running", "configure")
        holder.rollback()
    rig.fed.tick()
    assert rig.state() == ("abandoned", "configure")


@pytest.mark.postgres
def test_a_replica_forgets_its_part_of_a_round_another_replica_ended(rig: Rig) -> None:
    """Each replica adds the vectors it receives to its own running sum; the one that ends the round
    forgets its own, and the others forget theirs at their next tick."""
    other, engine = replica_of(rig)
    try:
        assert other.sums.add(rig.round_id, rig.devs[0].id, np.ones(4, dtype=np.uint64), 0)
        other.tick()
        assert other.sums.held() == {rig.round_id}  # the round runs: its partial sum is kept
        rig.clock.advance(STAGE_TIMEOUT + 1)
        rig.fed.tick()  # this replica ends the round
        assert rig.state()[0] == "abandoned"
        other.tick()
        assert other.sums.held() == set()
    finally:
        engine.dispose()
