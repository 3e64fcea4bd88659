"""SecAgg+ building blocks: known answers for each primitive, quantisation, the neighbour graph, parameters."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os

import numpy as np
import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.secagg.graph import neighbour_graph
from shared.secagg.params import (
    DEFAULT_FAIL_PROB,
    SecAggParams,
    derive_params,
    modulus_ok,
    neighbourhood_shortfall,
)
from shared.secagg.primitives import (
    SHARE_BYTES,
    SecAggError,
    agree,
    decrypt,
    encrypt,
    expand_mask,
    private_bytes,
    public_bytes,
    shamir_combine,
    shamir_split,
    x25519_keypair,
)
from shared.secagg.quantize import dequantize_weighted_mean, quantisation_bound, quantize

# RFC 7748, section 6.1.
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
RFC7748_SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def _hkdf_sha256_reference(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 written out with hmac: no salt (a zero key), 32 bytes of output."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


# ---------------------------------------------------------------- masks


def test_expand_mask_equals_pycryptodome_aes256_ctr_keystream() -> None:
    key = bytes(range(32))
    length = 1000
    stream = AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=bytes(16)).encrypt(bytes(8 * length))
    mask = expand_mask(key, length)
    assert mask.dtype == np.uint64 and mask.shape == (length,)
    assert np.array_equal(mask, np.frombuffer(stream, dtype="<u8"))


def test_expand_mask_first_block_is_aes_of_the_zero_counter() -> None:
    key = hashlib.sha256(b"known answer").digest()
    block0 = AES.new(key, AES.MODE_ECB).encrypt(bytes(16))
    block1 = AES.new(key, AES.MODE_ECB).encrypt((1).to_bytes(16, "big"))
    assert np.array_equal(expand_mask(key, 4), np.frombuffer(block0 + block1, dtype="<u8"))


def test_expand_mask_uses_the_whole_key() -> None:
    key = bytes(range(32))
    other = key[:31] + bytes([key[31] ^ 1])  # differs in the last byte only
    assert not np.array_equal(expand_mask(key, 8), expand_mask(other, 8))
    assert expand_mask(key, 0).shape == (0,)
    with pytest.raises(SecAggError):
        expand_mask(key[:16], 8)


# ---------------------------------------------------------------- agreement


def test_x25519_matches_rfc7748_vector() -> None:
    alice = X25519PrivateKey.from_private_bytes(ALICE_SK)
    bob = X25519PrivateKey.from_private_bytes(BOB_SK)
    assert public_bytes(alice) == ALICE_PK and public_bytes(bob) == BOB_PK
    assert private_bytes(alice) == ALICE_SK
    info = b"round context"
    expected = _hkdf_sha256_reference(RFC7748_SHARED, info)
    assert agree(alice, BOB_PK, info) == expected
    assert agree(bob, ALICE_PK, info) == expected


def test_agreement_is_symmetric_and_bound_to_info() -> None:
    a_sk, a_pk = x25519_keypair()
    b_sk, b_pk = x25519_keypair()
    assert len(a_pk) == 32
    assert agree(a_sk, b_pk, b"x") == agree(b_sk, a_pk, b"x")
    assert agree(a_sk, b_pk, b"x") != agree(a_sk, b_pk, b"y")
    assert len(agree(a_sk, b_pk, b"x")) == 32


def test_agreement_refuses_malformed_and_low_order_keys() -> None:
    sk, _ = x25519_keypair()
    with pytest.raises(SecAggError):
        agree(sk, bytes(31), b"x")
    with pytest.raises(SecAggError):
        agree(sk, bytes(32), b"x")  # the zero point: all-zero shared secret


# ---------------------------------------------------------------- AES-GCM


def test_gcm_round_trip_and_independent_decryption() -> None:
    key = os.urandom(32)
    ct = encrypt(key, b"shares", b"aad")
    assert decrypt(key, ct, b"aad") == b"shares"
    nonce, body, tag = ct[:12], ct[12:-16], ct[-16:]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(b"aad")
    assert cipher.decrypt_and_verify(body, tag) == b"shares"
    assert encrypt(key, b"shares", b"aad") != ct  # fresh nonce each time


def test_gcm_refuses_wrong_key_wrong_aad_and_every_flipped_bit() -> None:
    key = os.urandom(32)
    ct = encrypt(key, b"0123456789", b"aad")
    with pytest.raises(SecAggError):
        decrypt(os.urandom(32), ct, b"aad")
    with pytest.raises(SecAggError):
        decrypt(key, ct, b"other")
    with pytest.raises(SecAggError):
        decrypt(key, ct[:20], b"aad")
    for pos in range(len(ct)):
        bad = bytearray(ct)
        bad[pos] ^= 0x01
        with pytest.raises(SecAggError):
            decrypt(key, bytes(bad), b"aad")


# ---------------------------------------------------------------- Shamir (more in test_shamir.py)


def test_shamir_any_t_of_n_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir_split(secret, 3, 5)
    assert [i for i, _ in shares] == [1, 2, 3, 4, 5]
    assert all(len(s) == SHARE_BYTES for _, s in shares)
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(list(subset)) == secret


def test_shamir_t_minus_one_shares_do_not_give_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir_split(secret, 4, 6)
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(list(subset)) != secret


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8).flatmap(lambda t: st.tuples(st.just(t), st.integers(t, 10))), st.randoms())
def test_shamir_property_threshold(tn: tuple[int, int], rnd: object) -> None:
    t, n = tn
    secret = os.urandom(32)
    shares = shamir_split(secret, t, n)
    picked = rnd.sample(shares, t)  # type: ignore[attr-defined]
    assert shamir_combine(picked) == secret
    if t > 1:
        assert shamir_combine(picked[:-1]) != secret


def test_shamir_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        shamir_split(os.urandom(16), 2, 3)
    with pytest.raises(ValueError):
        shamir_split(os.urandom(32), 4, 3)
    shares = shamir_split(os.urandom(32), 2, 3)
    with pytest.raises(SecAggError):
        shamir_combine([shares[0], shares[0]])
    with pytest.raises(SecAggError):
        shamir_combine([])


# ---------------------------------------------------------------- quantisation


def test_quantize_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    values = np.array([-0.73, -0.1, 0.0, 0.3141, 0.999], dtype=np.float32)
    bits, clip, trials = 4, 1.0, 20000
    step = quantisation_bound(clip, bits)
    q = quantize(np.tile(values, trials), clip, bits, rng).reshape(trials, -1)
    mean = q.astype(np.float64).mean(axis=0) * step - clip
    # the standard error of the mean is below step / (2 sqrt(trials)); allow 5 of them
    assert np.all(np.abs(mean - values) < 5 * step / (2 * math.sqrt(trials)))


def test_quantize_error_within_one_step_and_clipped() -> None:
    rng = np.random.default_rng(2)
    clip, bits = 0.5, 8
    values = rng.uniform(-2, 2, 10000).astype(np.float32)
    q = quantize(values, clip, bits, rng)
    assert q.dtype == np.uint64
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    back = q.astype(np.float64) * quantisation_bound(clip, bits) - clip
    clipped = np.clip(values.astype(np.float64), -clip, clip)
    assert np.all(np.abs(back - clipped) < quantisation_bound(clip, bits) + 1e-12)
    assert np.all(q[values >= clip] == 2**bits - 1)
    assert np.all(q[values <= -clip] == 0)


def test_quantize_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        quantize(np.array([0.0, np.nan], dtype=np.float32), 1.0, 16, np.random.default_rng())
    with pytest.raises(ValueError):
        quantize(np.array([np.inf], dtype=np.float32), 1.0, 16, np.random.default_rng())


def test_dequantize_weighted_mean_within_one_step() -> None:
    rng = np.random.default_rng(3)
    clip, bits = 1.0, 16
    updates = [rng.uniform(-1, 1, 500).astype(np.float32) for _ in range(7)]
    weights = [int(w) for w in rng.integers(1, 1000, 7)]
    total = np.zeros(500, dtype=np.uint64)
    for u, w in zip(updates, weights, strict=True):
        total += np.uint64(w) * quantize(u, clip, bits, rng)
    mean = dequantize_weighted_mean(total, sum(weights), clip, bits)
    plain = sum(w * u.astype(np.float64) for u, w in zip(updates, weights, strict=True)) / sum(weights)
    assert mean.dtype == np.float32
    assert np.max(np.abs(mean - plain)) <= quantisation_bound(clip, bits) + 1e-6


# ---------------------------------------------------------------- graph


def _check_graph(g: dict[str, list[str]], ids: list[str], k: int) -> None:
    assert set(g) == set(ids)
    for u, nbrs in g.items():
        assert len(nbrs) == k == len(set(nbrs))
        assert u not in nbrs
        for v in nbrs:
            assert u in g[v]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))),
    st.binary(min_size=32, max_size=32),
)
def test_graph_is_symmetric_and_k_regular(nk: tuple[int, int], seed: bytes) -> None:
    n, k = nk
    ids = [f"dev-{i}" for i in range(n)]
    if (n * k) % 2:
        with pytest.raises(ValueError):
            neighbour_graph(ids, k, seed)
        return
    g = neighbour_graph(ids, k, seed)
    _check_graph(g, ids, k)
    assert neighbour_graph(list(reversed(ids)), k, seed) == g  # the same for every party


def test_graph_reproducible_and_seed_dependent() -> None:
    ids = [f"d{i}" for i in range(30)]
    seed = bytes(32)
    assert neighbour_graph(ids, 6, seed) == neighbour_graph(ids, 6, bytes(seed))
    graphs = {str(sorted(neighbour_graph(ids, 6, os.urandom(32)).items())) for _ in range(5)}
    assert len(graphs) == 5


def test_graph_complete_at_n_minus_one() -> None:
    for n in (5, 6):
        ids = [str(i) for i in range(n)]
        g = neighbour_graph(ids, n - 1, os.urandom(32))
        assert all(set(g[u]) == set(ids) - {u} for u in ids)


def test_graph_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        neighbour_graph(["a", "b", "c"], 2, bytes(16))
    with pytest.raises(ValueError):
        neighbour_graph(["a", "a", "c"], 2, bytes(32))
    with pytest.raises(ValueError):
        neighbour_graph(["a", "b", "c"], 3, bytes(32))


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 11, 20, 50, 51, 100, 1000, 10001])
def test_derived_params_are_consistent(n: int) -> None:
    p = derive_params(n)
    assert 1 <= p.t <= p.k <= n - 1
    assert (n * p.k) % 2 == 0
    assert p.k - math.floor(0.2 * p.k) >= p.t
    if n >= 3:
        assert p.t > p.k / 2 and p.t > 0.1 * p.k
    if n <= 10:
        assert p.k == n - 1  # small cohorts: complete graph
    # Every neighbourhood keeps t survivors at the default dropout 0.1 but with probability DEFAULT_FAIL_PROB (union bound), or
    # the cohort is too small for that and gets the complete graph.
    assert n * neighbourhood_shortfall(p.k, p.t, 0.1) <= DEFAULT_FAIL_PROB or p.k == n - 1
    assert p.k >= min(n - 1, max(4, math.ceil(3 * math.log2(n))))


def test_derived_params_grow_logarithmically() -> None:
    assert (
        derive_params(50, dropout=0).k
        < derive_params(1000, dropout=0).k
        < derive_params(100000, dropout=0).k
        <= 60
    )
    # Dropout 0.2 costs neighbours, still logarithmically: 100 times more devices, 20 more.
    assert derive_params(1000).k < derive_params(100000).k <= derive_params(1000).k + 20


def test_explicit_k_and_t_are_validated() -> None:
    assert derive_params(10, k=4, t=3) == SecAggParams(k=4, t=3, clip=1.0)
    # A spec's k beyond a smaller turnout is capped at the complete graph; k = 0 is refused.
    assert derive_params(10, k=10) == SecAggParams(k=9, t=5, clip=1.0)
    with pytest.raises(ValueError, match="k must be"):
        derive_params(10, k=0)
    with pytest.raises(ValueError, match="t must be"):
        derive_params(10, k=4, t=5)
    with pytest.raises(ValueError, match="t must be"):
        derive_params(10, k=4, t=0)
    with pytest.raises(ValueError, match="odd"):
        derive_params(9, k=3)
    with pytest.raises(ValueError, match="at least 2"):
        derive_params(1)
    with pytest.raises(ValueError, match="dropout"):
        derive_params(40, dropout=0.6)


def test_modulus_cannot_wrap() -> None:
    assert modulus_ok(1000, 16, 2**20)
    assert not modulus_ok(2**29, 16, 2**20)
    with pytest.raises(ValueError, match="wrap"):
        derive_params(2**29)
    with pytest.raises(ValueError, match="wrap"):
        derive_params(100, bits=32, weight_cap=2**30)
