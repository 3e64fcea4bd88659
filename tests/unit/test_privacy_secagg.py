"""The noised integer vectors go through the real SecAgg+ code path and come out as exactly the survivors' sum.

The test plays the coordinator over SecAggClient objects in memory, as the
SecAgg+ protocol tests do, with devices dropping at every stage: the unmasked
total equals, as uint64, the sum of the survivors' noised vectors, and reads
back as their signed sum (the clipped updates plus the noise nobody saw
without it).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.privacy import SkellamParams, check_no_wrap, decode_total, noised_input
from shared.secagg import (
    SecAggClient,
    SecAggParams,
    decode_share,
    derive_params,
    neighbour_graph,
    unmask_total,
)

CONTEXT = b"job-dp/round-1"


def _run_round(
    vectors: dict[str, np.ndarray], params: SecAggParams, stops: dict[str, int]
) -> tuple[np.ndarray, set[str]]:
    """One SecAgg+ round; ``stops[d]`` is the last stage device d completes (1 advertise .. 4 unmask)."""
    keys = {d: Ed25519PrivateKey.generate() for d in vectors}

    def verify(device: str, message: bytes, signature: bytes) -> bool:
        try:
            keys[device].public_key().verify(signature, message)
        except InvalidSignature:
            return False
        return True

    clients = {d: SecAggClient(d, CONTEXT, params, keys[d].sign) for d in vectors}
    graph = neighbour_graph(sorted(vectors), params.k, os.urandom(32))
    advertised = {d: c.advertise() for d, c in clients.items() if stops[d] >= 1}
    ciphertexts = {}
    for u in sorted(d for d in advertised if stops[d] >= 2):
        ciphertexts[u] = clients[u].share_keys(
            {v: advertised[v] for v in graph[u] if v in advertised}, verify
        )
    shared = set(ciphertexts)
    masked, survivors = {}, set()
    for u in sorted(d for d in shared if stops[d] >= 3):
        received = {v: ciphertexts[v][u] for v in graph[u] if v in shared}
        masked[u] = clients[u].masked_input(vectors[u], received)
        survivors.add(u)
    b_shares: dict[str, list[tuple[int, bytes]]] = {}
    sk_shares: dict[str, list[tuple[int, bytes]]] = {}
    dropped = shared - survivors
    for u in sorted(d for d in survivors if stops[d] >= 4):
        nbrs = set(graph[u])
        for v, text in clients[u].unmask((survivors - {u}) & nbrs, dropped & nbrs).items():
            (b_shares if v in survivors else sk_shares).setdefault(v, []).append(decode_share(text))
    total = np.zeros_like(next(iter(vectors.values())))
    for y in masked.values():
        total += y
    unmasked = unmask_total(
        total,
        context=CONTEXT,
        params=params,
        graph=graph,
        shared=shared,
        survivors=survivors,
        advertised=advertised,
        b_shares=b_shares,
        sk_shares=sk_shares,
    )
    return unmasked, survivors


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_noised_sum_reconstructs_exactly_through_secagg_with_dropouts(adaptive: bool) -> None:
    ids = [f"dev-{i:02d}" for i in range(14)]
    secagg = derive_params(len(ids), dropout=0.2)
    dp = SkellamParams(
        clip=1.0,
        bits=16,
        dim=300,
        noise_multiplier=1.0,
        min_contributors=9,
        indicator_noise=2.0 if adaptive else None,
    )
    check_no_wrap(dp, devices=len(ids))
    rng = np.random.default_rng(21)
    updates = {d: rng.normal(0, 0.2, dp.dim) * (3.0 if i % 4 == 0 else 1.0) for i, d in enumerate(ids)}
    vectors = {d: noised_input(updates[d], dp, rng) for d in ids}
    # One device drops before sharing, one after sharing (its masks are rebuilt), one after its masked input.
    stops = dict.fromkeys(ids, 4)
    stops["dev-02"], stops["dev-05"], stops["dev-09"] = 1, 2, 3
    unmasked, survivors = _run_round(vectors, secagg, stops)

    assert survivors == set(ids) - {"dev-02", "dev-05"}
    expected = np.zeros(dp.coordinates, dtype=np.uint64)
    for d in survivors:
        expected += vectors[d]
    assert np.array_equal(unmasked, expected)  # exact, modulo 2**64

    # Read back signed: the survivors' signed vectors, summed without wrapping.
    signed = [sum(int(vectors[d].view(np.int64)[i]) for d in survivors) for i in range(dp.coordinates)]
    assert [int(x) for x in unmasked.view(np.int64)] == signed
    decoded = decode_total(unmasked, dp)
    assert decoded.contributors == len(survivors)
    clipped = np.sum(
        [updates[d] * min(1.0, 1.0 / float(np.linalg.norm(updates[d]))) for d in survivors], axis=0
    )
    noise_std = np.sqrt(dp.local_variance * len(survivors)) / dp.scale
    assert np.abs(decoded.total - clipped).max() < 6 * noise_std + len(survivors) / dp.scale
    assert (decoded.fraction_under is not None) == adaptive
