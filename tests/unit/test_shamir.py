"""Shamir secret sharing over GF(2**256 + 297) (shared/secagg/primitives.py): the field, known answers, properties.

The implementation replaced pycryptodome's (docs/architecture.md, "SecAgg+ rules"; issue 3), so
these tests check it from outside: the prime by Miller-Rabin, shares of
polynomials written out by hand, and with hypothesis that any t shares
rebuild the secret in any order, that t - 1 shares are consistent with every
secret (the same coefficient draws could have produced them from another
secret), and that malformed input is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Iterator
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.secagg import decode_share, encode_share, primitives
from shared.secagg.primitives import SHARE_BYTES, SecAggError, shamir_combine, shamir_split

P = primitives._PRIME


def _is_probable_prime(n: int, rounds: int = 64) -> bool:
    """Miller-Rabin: False proves n composite; True after ``rounds`` bases errs with probability < 4**-rounds."""
    if n < 2:
        return False
    small = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(n)
    bases = small + [rng.randrange(2, n - 1) for _ in range(rounds)]
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = (out[i + j] + x * y) % P
    return out


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (constant first) of the polynomial of degree < len(points) through ``points``, mod P."""
    coefficients = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis, den = [1], 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = _poly_mul(basis, [-xj % P, 1])
                den = den * (xi - xj) % P
        scale = yi * pow(den, P - 2, P) % P  # Fermat inverse, not the implementation's pow(x, -1, p)
        for k, c in enumerate(basis):
            coefficients[k] = (coefficients[k] + scale * c) % P
    return coefficients


def _evaluate(coefficients: list[int], x: int) -> int:
    return sum(c * x**k for k, c in enumerate(coefficients)) % P


def _value(share: tuple[int, bytes]) -> int:
    return int.from_bytes(share[1], "big")


def _as_secret(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _draws(values: list[int]) -> mock._patch[mock.MagicMock]:
    """Makes the next calls to secrets.randbelow (the coefficient draws) return ``values``, in order."""
    it: Iterator[int] = iter(values)
    return mock.patch.object(primitives.secrets, "randbelow", side_effect=lambda bound: next(it))


# ---------------------------------------------------------------- the field


def test_the_field_is_the_smallest_prime_above_2_256() -> None:
    assert P == 2**256 + 297
    assert _is_probable_prime(P)
    # Miller-Rabin never calls a prime composite, so each False below is a proof.
    assert not any(_is_probable_prime(m) for m in range(2**256 + 1, P))
    assert SHARE_BYTES == 33 == (P.bit_length() + 7) // 8


def test_miller_rabin_helper_on_known_numbers() -> None:
    assert _is_probable_prime(2**127 - 1) and _is_probable_prime(2**521 - 1)
    assert not _is_probable_prime(2**128 + 1)  # the Fermat number F7, composite
    assert not _is_probable_prime(561) and not _is_probable_prime(
        3215031751
    )  # Carmichael, strong pseudoprime
    assert [m for m in range(50) if _is_probable_prime(m)] == [
        2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47,
    ]  # fmt: skip


# ---------------------------------------------------------------- known answers


def test_known_answer_small_polynomial() -> None:
    # f(x) = 1234 + 166 x + 94 x**2, by hand: f(1) = 1494, f(2) = 1942, f(3) = 2578, f(4) = 3402.
    by_hand = [(1, 1494), (2, 1942), (3, 2578), (4, 3402)]
    shares = [(x, y.to_bytes(SHARE_BYTES, "big")) for x, y in by_hand]
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(list(subset)) == _as_secret(1234)
    assert shamir_combine(shares) == _as_secret(1234)  # more than t shares: the same polynomial
    with _draws([166, 94]) as draw:
        assert shamir_split(_as_secret(1234), 3, 4) == shares
    assert [c.args for c in draw.call_args_list] == [(P,), (P,)]


def test_known_answer_that_wraps_around_the_prime() -> None:
    # f(x) = (2**256 - 1) + 300 x mod p: f(1) = 2**256 + 299 = p + 2 -> 2; f(2) = p + 302 -> 302.
    secret = b"\xff" * 32
    shares = [(1, (2).to_bytes(SHARE_BYTES, "big")), (2, (302).to_bytes(SHARE_BYTES, "big"))]
    assert shamir_combine(shares) == secret
    assert shamir_combine(shares[::-1]) == secret
    with _draws([300]):
        assert shamir_split(secret, 2, 2) == shares


def test_threshold_one_is_the_secret_itself() -> None:
    secret = os.urandom(32)
    shares = shamir_split(secret, 1, 3)
    assert all(s == bytes(1) + secret for _, s in shares)
    assert all(shamir_combine([share]) == secret for share in shares)


def test_a_result_that_is_no_32_byte_secret_is_refused() -> None:
    # a constant polynomial equal to 2**256 is a field element but no 32-byte secret
    with pytest.raises(SecAggError, match="32-byte secret"):
        shamir_combine([(5, (2**256).to_bytes(SHARE_BYTES, "big"))])


# ---------------------------------------------------------------- properties

thresholds = st.integers(1, 12).flatmap(lambda t: st.tuples(st.just(t), st.integers(t, 20)))


@settings(max_examples=80, deadline=None)
@given(thresholds, st.binary(min_size=32, max_size=32), st.randoms(use_true_random=False))
def test_any_t_shares_rebuild_the_secret_in_any_order(
    tn: tuple[int, int], secret: bytes, rnd: random.Random
) -> None:
    t, n = tn
    shares = shamir_split(secret, t, n)
    assert [i for i, _ in shares] == list(range(1, n + 1))
    assert all(isinstance(s, bytes) and len(s) == SHARE_BYTES and _value((i, s)) < P for i, s in shares)
    picked = rnd.sample(shares, t)
    assert shamir_combine(picked) == secret
    rnd.shuffle(picked)
    assert shamir_combine(picked) == secret
    extra = rnd.sample(shares, rnd.randint(t, n))  # any number of shares from t up
    assert shamir_combine(extra) == secret


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 10).flatmap(lambda t: st.tuples(st.just(t), st.integers(t, 16))),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=32, max_size=32),
    st.randoms(use_true_random=False),
)
def test_t_minus_one_shares_are_consistent_with_every_secret(
    tn: tuple[int, int], secret: bytes, other: bytes, rnd: random.Random
) -> None:
    """Perfect secrecy, shown constructively.

    For the t - 1 shares one holds and any other secret, there is exactly one
    set of t - 1 coefficient draws that makes shamir_split(other) give those
    very shares: so each view is produced by as many draws for one secret as
    for another, and the draws are uniform. Combining the t - 1 shares alone
    does not give the secret either.
    """
    t, n = tn
    shares = shamir_split(secret, t, n)
    held = sorted(rnd.sample(shares, t - 1))
    g = _interpolate([(0, int.from_bytes(other, "big"))] + [(i, _value((i, s))) for i, s in held])
    assert len(g) == t and all(0 <= c < P for c in g)
    assert g[0] == int.from_bytes(other, "big")
    assert all(_evaluate(g, i) == _value((i, s)) for i, s in held)
    with _draws(g[1:]) as draw:
        resplit = shamir_split(other, t, n)
    assert draw.call_count == t - 1
    assert [resplit[i - 1] for i, _ in held] == held
    if other != secret:
        assert resplit != shares  # the shares outside the view tell the two apart
    with contextlib.suppress(SecAggError):  # raised when the value at 0 falls in [2**256, p)
        assert shamir_combine(held) != secret


@settings(max_examples=40, deadline=None)
@given(thresholds, st.randoms(use_true_random=False), st.booleans())
def test_duplicate_indices_are_refused(tn: tuple[int, int], rnd: random.Random, same_value: bool) -> None:
    t, n = tn
    shares = shamir_split(os.urandom(32), t, n)
    picked = rnd.sample(shares, t)
    index, value = rnd.choice(picked)
    twin = value if same_value else (_value((index, value)) ^ 1).to_bytes(SHARE_BYTES, "big")
    with_twin = [*picked, (index, twin)]
    rnd.shuffle(with_twin)
    with pytest.raises(SecAggError, match="duplicate"):
        shamir_combine(with_twin)


def test_coefficients_come_from_secrets_and_differ_between_splits() -> None:
    secret = os.urandom(32)
    with mock.patch.object(primitives.secrets, "randbelow", wraps=primitives.secrets.randbelow) as draw:
        a = shamir_split(secret, 5, 9)
    assert draw.call_count == 4 and all(c.args == (P,) for c in draw.call_args_list)
    b = shamir_split(secret, 5, 9)
    assert a != b
    assert shamir_combine(a[:5]) == shamir_combine(b[4:]) == secret


def test_short_encodings_read_as_the_same_integer() -> None:
    shares = [(1, (2).to_bytes(SHARE_BYTES, "big")), (2, (302).to_bytes(SHARE_BYTES, "big"))]
    assert shamir_combine([(1, b"\x02"), (2, b"\x01\x2e")]) == shamir_combine(shares)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("secret", "t", "n"),
    [
        (bytes(31), 2, 3),
        (bytes(33), 2, 3),
        ("x" * 32, 2, 3),
        (bytes(32), 0, 3),
        (bytes(32), 4, 3),
        (bytes(32), -1, 3),
        (bytes(32), 2, 2**16),
        (bytes(32), True, 3),
        (bytes(32), 2.0, 3),
    ],
)
def test_split_refuses_bad_input(secret: object, t: object, n: object) -> None:
    with pytest.raises(ValueError):
        shamir_split(secret, t, n)  # type: ignore[arg-type]


def test_split_allows_the_largest_index() -> None:
    shares = shamir_split(bytes(32), 1, 2**16 - 1)
    assert shares[-1][0] == 2**16 - 1


GOOD = (2).to_bytes(SHARE_BYTES, "big")


@pytest.mark.parametrize(
    "shares",
    [
        [],
        [(0, GOOD)],
        [(-1, GOOD)],
        [(2**16, GOOD)],
        [(True, GOOD)],
        [("1", GOOD)],
        [(1, b"")],
        [(1, GOOD + b"\x00")],
        [(1, "2")],
        [(1, P.to_bytes(SHARE_BYTES, "big"))],
        [(1, (2**264 - 1).to_bytes(SHARE_BYTES, "big"))],
        [(1, GOOD, 3)],
    ],
)
def test_combine_refuses_malformed_shares(shares: list[tuple[int, bytes]]) -> None:
    with pytest.raises(SecAggError):
        shamir_combine(shares)


# ---------------------------------------------------------------- the protocol's share format


def test_shares_travel_in_the_protocol_format() -> None:
    secret = os.urandom(32)
    shares = shamir_split(secret, 3, 5)
    back = [decode_share(encode_share(i, s)) for i, s in shares]
    assert back == shares
    assert shamir_combine(back[2:]) == secret
    with pytest.raises(SecAggError):
        decode_share(encode_share(1, bytes(32)))  # the old 32-byte pycryptodome shares are refused
