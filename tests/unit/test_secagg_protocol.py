"""SecAgg+ rounds between SecAggClient objects and unmask_total: exact sums through every dropout pattern.

The test plays the coordinator: it forwards messages along the neighbour graph
exactly as the round stages do, drops devices at each stage, and checks that
the unmasked sum is the plain sum of the survivors' weighted inputs (uint64
equality) whenever every reconstruction has t shares, and a SecAggError
otherwise.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    decode_share,
    derive_params,
    finish,
    neighbour_graph,
    quantisation_bound,
    unmask_total,
    weighted_input,
)
from shared.secagg.primitives import x25519_keypair


class Stop(IntEnum):
    """The last stage a device completes before it drops (DONE: it never drops)."""

    NOTHING = 0  # selected, never advertises
    ADVERTISE = 1  # advertises, then drops
    SHARE = 2  # shares keys, then drops
    MASKED = 3  # sends its masked input, then drops before unmasking
    DONE = 4


class Identities:
    """Ed25519 identity keys of the devices, as the coordinator's registry would hold them."""

    def __init__(self) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.public: dict[str, Ed25519PublicKey] = {}

    def add(self, device: str) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        self.keys[device] = key
        self.public[device] = key.public_key()
        return key

    def verify(self, device: str, message: bytes, signature: bytes) -> bool:
        try:
            self.public[device].verify(signature, message)
        except (InvalidSignature, KeyError):
            return False
        return True


@dataclass
class Round:
    params: SecAggParams
    context: bytes
    graph: dict[str, list[str]]
    clients: dict[str, SecAggClient]
    inputs: dict[str, np.ndarray]
    ids: Identities
    advertised: dict[str, dict[str, str]] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)
    ciphertexts: dict[str, dict[str, str]] = field(default_factory=dict)
    survivors: set[str] = field(default_factory=set)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    b_shares: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    sk_shares: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)


def make_round(
    device_ids: list[str], params: SecAggParams, length: int, seed: int = 0, context: bytes = b"job-1/round-3"
) -> Round:
    rng = np.random.default_rng(seed)
    ids = Identities()
    clients, inputs = {}, {}
    for d in device_ids:
        key = ids.add(d)
        clients[d] = SecAggClient(d, context, params, key.sign)
        update = rng.normal(0, 0.5, length).astype(np.float32)
        inputs[d] = weighted_input(update, int(rng.integers(1, 500)), params, rng)
    graph = neighbour_graph(device_ids, params.k, os.urandom(32))
    return Round(params, context, graph, clients, inputs, ids)


def stage_advertise(r: Round, who: set[str]) -> None:
    r.advertised = {u: r.clients[u].advertise() for u in sorted(who)}


def stage_share(r: Round, who: set[str]) -> None:
    for u in sorted(who & set(r.advertised)):
        neighbours = {v: r.advertised[v] for v in r.graph[u] if v in r.advertised}
        if len(neighbours) < r.params.t:
            with pytest.raises(SecAggError, match="threshold"):
                r.clients[u].share_keys(neighbours, r.ids.verify)
            continue
        r.ciphertexts[u] = r.clients[u].share_keys(neighbours, r.ids.verify)
        assert set(r.ciphertexts[u]) == set(neighbours)
        r.shared.add(u)


def stage_masked(r: Round, who: set[str]) -> None:
    for u in sorted(who & r.shared):
        received = {v: r.ciphertexts[v][u] for v in r.graph[u] if v in r.shared}
        if len(received) < r.params.t:
            with pytest.raises(SecAggError, match="threshold"):
                r.clients[u].masked_input(r.inputs[u], received)
            continue
        r.masked[u] = r.clients[u].masked_input(r.inputs[u], received)
        r.survivors.add(u)


def stage_unmask(r: Round, who: set[str]) -> None:
    dropped = r.shared - r.survivors
    for u in sorted(who & r.survivors):
        nbrs = set(r.graph[u])
        answer = r.clients[u].unmask((r.survivors - {u}) & nbrs, dropped & nbrs)
        for v, text in answer.items():
            target = r.b_shares if v in r.survivors else r.sk_shares
            target.setdefault(v, []).append(decode_share(text))


def masked_sum(r: Round) -> np.ndarray:
    total = np.zeros_like(next(iter(r.inputs.values())))
    for y in r.masked.values():
        total += y
    return total


def plain_sum(r: Round) -> np.ndarray:
    total = np.zeros_like(next(iter(r.inputs.values())))
    for u in r.survivors:
        total += r.inputs[u]
    return total


def reconstructible(r: Round) -> bool:
    if not r.survivors:
        return False
    t = r.params.t
    if any(len(r.b_shares.get(u, [])) < t for u in r.survivors):
        return False
    dropped = r.shared - r.survivors
    return all(len(r.sk_shares.get(v, [])) >= t for v in dropped if any(u in r.survivors for u in r.graph[v]))


def server_unmask(r: Round) -> np.ndarray:
    return unmask_total(
        masked_sum(r),
        context=r.context,
        params=r.params,
        graph=r.graph,
        shared=r.shared,
        survivors=r.survivors,
        advertised=r.advertised,
        b_shares=r.b_shares,
        sk_shares=r.sk_shares,
    )


def run(r: Round, stops: dict[str, Stop]) -> None:
    def reach(stage: Stop) -> set[str]:
        return {u for u, s in stops.items() if s >= stage}

    stage_advertise(r, reach(Stop.ADVERTISE))
    stage_share(r, reach(Stop.SHARE))
    stage_masked(r, reach(Stop.MASKED))
    stage_unmask(r, reach(Stop.DONE))


def check_outcome(r: Round) -> None:
    if reconstructible(r):
        event("exact sum")
        total = server_unmask(r)
        assert total.dtype == np.uint64
        assert np.array_equal(total, plain_sum(r))
    else:
        event("refused")
        with pytest.raises(SecAggError):
            server_unmask(r)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[list[str], SecAggParams, list[Stop]]:
    n = draw(st.integers(3, 20))
    k = draw(st.integers(1, n - 1).filter(lambda k: (n * k) % 2 == 0))
    t = draw(st.integers(1, k))
    # Mostly devices that stay, with every kind of dropout mixed in.
    stops = draw(
        st.lists(
            st.sampled_from(list(Stop)).flatmap(lambda s: st.sampled_from([s, Stop.DONE, Stop.DONE])),
            min_size=n,
            max_size=n,
        )
    )
    # Ids of different lengths and alphabets, so that string order is not numeric order.
    ids = draw(st.lists(st.text("ab9Z-", min_size=1, max_size=4), min_size=n, max_size=n, unique=True))
    return ids, SecAggParams(k=k, t=t, clip=1.0), stops


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_unmasked_sum_is_exact_or_refused_under_any_dropout(
    case: tuple[list[str], SecAggParams, list[Stop]],
) -> None:
    ids, params, stops = case
    r = make_round(ids, params, length=9)
    run(r, dict(zip(ids, stops, strict=True)))
    check_outcome(r)


@pytest.mark.parametrize("stop", [Stop.NOTHING, Stop.ADVERTISE, Stop.SHARE, Stop.MASKED])
def test_one_dropout_per_stage_keeps_the_sum_exact(stop: Stop) -> None:
    ids = [f"dev-{i:02d}" for i in range(12)]
    params = derive_params(len(ids))
    r = make_round(ids, params, length=257)
    stops = dict.fromkeys(ids, Stop.DONE)
    stops["dev-03"] = stop
    stops["dev-07"] = stop
    run(r, stops)
    assert reconstructible(r)
    total = server_unmask(r)
    assert np.array_equal(total, plain_sum(r))
    assert ("dev-03" in r.survivors) == (stop == Stop.MASKED)


def test_finish_gives_the_weighted_mean_within_one_step() -> None:
    ids = [f"d{i}" for i in range(10)]
    params = derive_params(10, clip=0.5)
    rng = np.random.default_rng(5)
    r = make_round(ids, params, length=3)  # replaced below with known updates
    updates = {d: rng.uniform(-0.7, 0.7, 1000).astype(np.float32) for d in ids}
    weights = {d: int(rng.integers(1, 10_000)) for d in ids}
    r.inputs = {d: weighted_input(updates[d], weights[d], params, rng) for d in ids}
    stops = dict.fromkeys(ids, Stop.DONE)
    stops["d4"] = Stop.SHARE
    run(r, stops)
    mean, weight = finish(server_unmask(r), params)
    alive = sorted(r.survivors)
    assert weight == sum(weights[d] for d in alive)
    plain = sum(weights[d] * np.clip(updates[d].astype(np.float64), -0.5, 0.5) for d in alive) / weight
    assert mean.dtype == np.float32 and mean.shape == (1000,)
    assert np.max(np.abs(mean - plain)) <= quantisation_bound(0.5, params.bits) + 1e-6


def test_too_few_shares_abandon_the_round_naming_the_device() -> None:
    ids = [f"d{i}" for i in range(6)]
    params = SecAggParams(k=4, t=3, clip=1.0)
    r = make_round(ids, params, length=5)
    stops = dict.fromkeys(ids, Stop.DONE)
    run(r, stops)
    victim = "d2"
    r.b_shares[victim] = r.b_shares[victim][: params.t - 1]
    with pytest.raises(SecAggError, match="'d2'.*only 2 of the t=3"):
        server_unmask(r)
    # duplicates of one share do not count twice
    r.b_shares[victim] = [r.b_shares[victim][0]] * 3
    with pytest.raises(SecAggError, match="'d2'"):
        server_unmask(r)


def test_wrong_mask_key_shares_are_caught_by_the_advertised_key() -> None:
    ids = [f"d{i}" for i in range(6)]
    params = SecAggParams(k=4, t=2, clip=1.0)
    r = make_round(ids, params, length=5)
    stops = dict.fromkeys(ids, Stop.DONE)
    stops["d1"] = Stop.SHARE
    run(r, stops)
    assert len(r.sk_shares["d1"]) >= 2
    r.sk_shares["d1"] = [(i, os.urandom(32)) for i, _ in r.sk_shares["d1"]]
    with pytest.raises(SecAggError, match="'d1'.*does not match"):
        server_unmask(r)


def test_no_survivors_is_refused() -> None:
    ids = [f"d{i}" for i in range(4)]
    r = make_round(ids, SecAggParams(k=3, t=2, clip=1.0), length=5)
    run(r, dict.fromkeys(ids, Stop.SHARE))
    with pytest.raises(SecAggError, match="no device"):
        unmask_total(
            np.zeros(6, dtype=np.uint64), context=r.context, params=r.params, graph=r.graph,
            shared=r.shared, survivors=set(), advertised=r.advertised, b_shares={}, sk_shares={},
        )  # fmt: skip


# ---------------------------------------------------------------- tampering


def _advertised_round(n: int = 6) -> Round:
    ids = [f"d{i}" for i in range(n)]
    r = make_round(ids, SecAggParams(k=n - 1, t=3, clip=1.0), length=5)
    stage_advertise(r, set(ids))
    return r


def _neighbours(r: Round, u: str) -> dict[str, dict[str, str]]:
    return {v: dict(r.advertised[v]) for v in r.graph[u]}


def test_bad_advertise_signature_is_refused_naming_the_device() -> None:
    r = _advertised_round()
    nbrs = _neighbours(r, "d0")
    sig = bytearray(base64.b64decode(nbrs["d3"]["signature"]))
    sig[0] ^= 1
    nbrs["d3"]["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SecAggError, match="'d3'.*signature"):
        r.clients["d0"].share_keys(nbrs, r.ids.verify)


def test_swapped_public_key_is_refused() -> None:
    r = _advertised_round()
    nbrs = _neighbours(r, "d0")
    _, attacker = x25519_keypair()
    nbrs["d2"]["c_pk"] = base64.b64encode(attacker).decode()
    with pytest.raises(SecAggError, match="'d2'.*signature"):
        r.clients["d0"].share_keys(nbrs, r.ids.verify)
    # keys signed for another round do not verify in this one
    other = SecAggClient("d2", b"job-1/round-4", r.params, r.ids.keys["d2"].sign).advertise()
    nbrs = _neighbours(r, "d0")
    nbrs["d2"] = other
    with pytest.raises(SecAggError, match="'d2'.*signature"):
        r.clients["d0"].share_keys(nbrs, r.ids.verify)


def test_repeated_public_key_across_devices_is_refused() -> None:
    r = _advertised_round()
    # d4 copies d2's keys and signs them properly with its own identity key
    copier = r.clients["d4"]
    copier.c_pk, copier.s_pk = r.clients["d2"].c_pk, r.clients["d2"].s_pk
    r.advertised["d4"] = copier.advertise()
    with pytest.raises(SecAggError, match="same public key"):
        r.clients["d0"].share_keys(_neighbours(r, "d0"), r.ids.verify)


def test_malformed_advertisement_is_refused() -> None:
    r = _advertised_round()
    nbrs = _neighbours(r, "d0")
    nbrs["d1"]["s_pk"] = "not base64!"
    with pytest.raises(SecAggError, match="'d1'"):
        r.clients["d0"].share_keys(nbrs, r.ids.verify)
    nbrs = _neighbours(r, "d0")
    nbrs["d1"]["s_pk"] = base64.b64encode(bytes(16)).decode()
    with pytest.raises(SecAggError, match="'d1'"):
        r.clients["d0"].share_keys(nbrs, r.ids.verify)
    with pytest.raises(SecAggError, match="itself"):
        r.clients["d0"].share_keys({**_neighbours(r, "d0"), "d0": r.advertised["d0"]}, r.ids.verify)


def _shared_round() -> Round:
    r = _advertised_round()
    stage_share(r, set(r.clients))
    return r


def test_corrupted_share_ciphertext_is_refused_naming_the_sender() -> None:
    r = _shared_round()
    received = {v: r.ciphertexts[v]["d0"] for v in r.graph["d0"]}
    raw = bytearray(base64.b64decode(received["d5"]))
    raw[20] ^= 0x80
    received["d5"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(SecAggError, match="'d5'"):
        r.clients["d0"].masked_input(r.inputs["d0"], received)


def test_share_ciphertext_for_another_device_or_round_is_refused() -> None:
    r = _shared_round()
    received = {v: r.ciphertexts[v]["d0"] for v in r.graph["d0"]}
    received["d3"] = r.ciphertexts["d3"]["d1"]  # addressed to d1, replayed to d0
    with pytest.raises(SecAggError, match="'d3'"):
        r.clients["d0"].masked_input(r.inputs["d0"], received)
    received = {v: r.ciphertexts[v]["d0"] for v in r.graph["d0"]}
    received["d3"] = r.ciphertexts["d4"]["d0"]  # d4's shares presented as d3's
    with pytest.raises(SecAggError, match="'d3'"):
        r.clients["d0"].masked_input(r.inputs["d0"], received)


def test_unmask_never_reveals_both_shares_of_a_neighbour() -> None:
    r = _shared_round()
    stage_masked(r, set(r.clients))
    client = r.clients["d0"]
    with pytest.raises(SecAggError, match="'d1'.*both"):
        client.unmask({"d1", "d2"}, {"d1"})
    with pytest.raises(SecAggError, match="itself"):
        client.unmask({"d0", "d2"}, set())
    first = client.unmask({"d1", "d2"}, {"d3"})
    assert set(first) == {"d1", "d2", "d3"}
    with pytest.raises(SecAggError, match="'d1'.*other kind"):
        client.unmask(set(), {"d1"})
    with pytest.raises(SecAggError, match="'d3'.*other kind"):
        client.unmask({"d3"}, set())
    # asking again for the same kinds is harmless: the same shares come back
    assert client.unmask({"d1"}, {"d3"}) == {v: first[v] for v in ("d1", "d3")}


def test_stages_run_in_order_and_once() -> None:
    r = _advertised_round()
    client = r.clients["d0"]
    with pytest.raises(SecAggError, match="share its keys"):
        client.masked_input(r.inputs["d0"], {})
    with pytest.raises(SecAggError, match="masked input"):
        client.unmask(set(), set())
    stage_share(r, set(r.clients))
    with pytest.raises(SecAggError, match="already"):
        client.share_keys(_neighbours(r, "d0"), r.ids.verify)
    with pytest.raises(SecAggError, match="uint64"):
        client.masked_input(
            r.inputs["d0"].astype(np.int64), {v: r.ciphertexts[v]["d0"] for v in r.graph["d0"]}
        )


def test_masked_input_alone_reveals_nothing_obvious() -> None:
    ids = [f"d{i}" for i in range(5)]
    r = make_round(ids, derive_params(5), length=5000)
    r.inputs["d0"] = np.zeros(5001, dtype=np.uint64)  # the most recognisable input there is
    run(r, dict.fromkeys(ids, Stop.DONE))
    y = r.masked["d0"]
    assert np.count_nonzero(y != r.inputs["d0"]) >= 4999
    assert np.count_nonzero(r.masked["d1"] != r.inputs["d1"]) >= 4999
    # and the masks look uniform over 64 bits: about half of the top bits are set
    assert 0.45 < np.mean(y >> np.uint64(63)) < 0.55
    assert np.array_equal(server_unmask(r), plain_sum(r))


def test_weighted_input_layout_and_bounds() -> None:
    params = SecAggParams(k=2, t=2, clip=1.0, bits=8, weight_cap=100)
    rng = np.random.default_rng(0)
    x = weighted_input(np.array([-1.0, 1.0, 0.0], dtype=np.float32), 7, params, rng)
    assert x.dtype == np.uint64 and x.shape == (4,)
    assert x[0] == 0 and x[1] == 7 * 255 and x[3] == 7
    with pytest.raises(ValueError):
        weighted_input(np.zeros(3, dtype=np.float32), 101, params, rng)
    with pytest.raises(ValueError):
        weighted_input(np.zeros(3, dtype=np.float32), 0, params, rng)
