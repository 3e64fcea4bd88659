"""Weak public keys are refused: Ed25519 identity keys at enrollment, X25519 keys at SecAgg+ advertise.

The small-order encodings are libsodium's blocklists (``crypto_sign_verify_detached``'s
``ge25519_has_small_order`` and ``crypto_scalarmult_curve25519``'s ``has_small_order``),
written out here independently of the code under test.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient

from coordinator import auth
from coordinator.errors import Invalid
from server.app import create_app
from server.settings import ServerSettings
from shared import signing
from shared.secagg.primitives import SecAggError, check_agreement_key, public_bytes
from shared.signing import SignatureError, b64e, check_public_key, load_public_key, public_key_bytes
from tests.integration.test_secure_engine import STAGES, Dev, Rig, _context, _resign, excluded_for

P = 2**255 - 19

# libsodium's Ed25519 small-order y-coordinates (little-endian; the sign bit is compared apart).
ED25519_SMALL_ORDER = [
    bytes(32),  # y = 0: order 4
    bytes([1]) + bytes(31),  # y = 1: the identity
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),  # order 8
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),  # order 8
    (P - 1).to_bytes(32, "little"),  # y = -1: order 2
    P.to_bytes(32, "little"),  # y = 0, non-canonical
    (P + 1).to_bytes(32, "little"),  # y = 1, non-canonical
]

# libsodium's X25519 small-order u-coordinates.
X25519_SMALL_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,  # order 8
    39382357235489614581723060781553021112529911719440698176882885853963445705823,  # order 8
    P - 1,
    P,  # 0, non-canonical
    P + 1,  # 1, non-canonical
]


def with_sign_bit(raw: bytes) -> bytes:
    return raw[:31] + bytes([raw[31] | 0x80])


def encode(point: tuple[int, int, int, int]) -> bytes:
    x, y, z, _ = point
    zi = pow(z, -1, P)
    x, y = x * zi % P, y * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def test_all_zero_ed25519_key_is_refused_as_small_order() -> None:
    with pytest.raises(SignatureError, match="small-order point"):
        check_public_key(bytes(32))


@pytest.mark.parametrize("index", range(len(ED25519_SMALL_ORDER)))
@pytest.mark.parametrize("sign", [False, True], ids=["sign0", "sign1"])
def test_every_small_order_ed25519_encoding_is_refused(index: int, sign: bool) -> None:
    raw = ED25519_SMALL_ORDER[index]
    with pytest.raises(SignatureError, match="small-order|not canonically encoded"):
        check_public_key(with_sign_bit(raw) if sign else raw)


def test_the_eight_torsion_points_are_exactly_the_small_order_ones() -> None:
    # The canonical encodings that decode, with either sign bit: 8 points, each refused as small-order.
    refused = set()
    for raw in ED25519_SMALL_ORDER[:5]:
        for candidate in (raw, with_sign_bit(raw)):
            try:
                check_public_key(candidate)
            except SignatureError as err:
                if "small-order point" in str(err):
                    refused.add(candidate)
    assert len(refused) == 8


def test_non_canonical_and_off_curve_ed25519_keys_are_refused() -> None:
    key = public_key_bytes(Ed25519PrivateKey.generate())
    y = int.from_bytes(key, "little") & ((1 << 255) - 1)
    if y < 19:  # pragma: no cover - y + p would fit in 255 bits: vanishingly rare
        pytest.skip("key too small to re-encode")
    for v in range(P, 2**255):  # every y at or above p
        with pytest.raises(SignatureError, match="not canonically encoded"):
            check_public_key(v.to_bytes(32, "little"))
    off_curve = 0
    for _ in range(40):
        try:
            check_public_key(os.urandom(32))
        except SignatureError as err:
            off_curve += "not a point on the curve" in str(err)
    assert off_curve > 5  # about half of random y-coordinates are on no point


def test_ed25519_key_with_a_small_order_component_is_refused() -> None:
    key = signing._decode_point(public_key_bytes(Ed25519PrivateKey.generate()))
    torsion = signing._decode_point(ED25519_SMALL_ORDER[2])
    with pytest.raises(SignatureError, match="prime-order subgroup"):
        check_public_key(encode(signing._add(key, torsion)))


def test_wrong_length_ed25519_key_is_refused() -> None:
    with pytest.raises(SignatureError, match="32 bytes, got 31"):
        check_public_key(bytes(31))
    with pytest.raises(SignatureError, match="small-order"):
        load_public_key(b64e(bytes(32)))


def test_generated_ed25519_keys_are_accepted() -> None:
    for _ in range(100):
        key = Ed25519PrivateKey.generate()
        check_public_key(public_key_bytes(key))
        load_public_key(b64e(public_key_bytes(key))).verify(key.sign(b"m"), b"m")


@pytest.mark.parametrize("u", X25519_SMALL_ORDER)
@pytest.mark.parametrize("top_bit", [False, True], ids=["top0", "top1"])
def test_small_order_x25519_keys_are_refused(u: int, top_bit: bool) -> None:
    raw = (u | (top_bit << 255)).to_bytes(32, "little")
    with pytest.raises(SecAggError, match="small-order"):
        check_agreement_key(raw)


def test_generated_x25519_keys_are_accepted_and_wrong_lengths_refused() -> None:
    for _ in range(50):
        check_agreement_key(public_bytes(X25519PrivateKey.generate()))
    with pytest.raises(SecAggError, match="32 bytes, got 33"):
        check_agreement_key(bytes(33))


def test_enrollment_with_the_all_zero_key_is_refused_with_422(tmp_path: Path) -> None:
    app = create_app(ServerSettings(data_dir=tmp_path), run_ticker=False)
    with app.state.federation.write() as s:
        token = auth.create_enrollment_tokens(s, 1, 600, "test")[0]
    with TestClient(app, raise_server_exceptions=False) as client:
        weak = client.post("/v1/enroll", json={"token": token, "public_key": b64e(bytes(32))})
        assert weak.status_code == 422 and weak.headers["content-type"].startswith("application/problem+json")
        assert weak.json()["detail"].startswith("public_key: Ed25519 public key is a small-order point")
        good = b64e(public_key_bytes(Ed25519PrivateKey.generate()))
        # The refusal did not spend the token.
        assert client.post("/v1/enroll", json={"token": token, "public_key": good}).status_code == 200


def test_enroll_device_refuses_every_small_order_key(tmp_path: Path) -> None:
    from coordinator.store import make_engine, migrate, session_factory

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    with session_factory(engine)() as s:
        for raw in ED25519_SMALL_ORDER:
            with pytest.raises(Invalid, match="public_key: Ed25519 public key"):
                auth.enroll_device(s, "aicfl_enr_x", b64e(raw), "d", "p")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[[int], Rig]]:
    """The secure-engine tests' rig, on SQLite only: the check is in the engine, not the database."""
    made: list[Rig] = []

    def make(n: int) -> Rig:
        made.append(Rig(f"sqlite:///{tmp_path / 'coordinator.db'}", tmp_path, n))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("which", ["c_pk", "s_pk"])
def test_advertised_small_order_x25519_key_excludes_the_sender(rig: Callable[[int], Rig], which: str) -> None:
    r = rig(6)
    bad = r.devs[3]
    small = (X25519_SMALL_ORDER[2]).to_bytes(32, "little")

    def weaken(d: Dev, tk: object, msg: dict[str, str]) -> dict[str, str]:
        c_pk, s_pk = base64.b64decode(msg["c_pk"]), base64.b64decode(msg["s_pk"])
        c_pk, s_pk = (small, s_pk) if which == "c_pk" else (c_pk, small)
        return _resign(d.key, _context(tk), d.id, c_pk, s_pk)  # type: ignore[arg-type]

    r.stage("configure")
    refused = r.stage("advertise_keys", tamper={bad.id: weaken})
    assert set(refused) == {bad.id}
    excluded_for(r, bad.id, rf"{which}: X25519 public key is a small-order point")
    for name in STAGES[2:]:
        r.stage(name)
    assert bad.id not in r.in_sum
    r.assert_exact()


def test_requests_of_a_device_already_stored_with_a_small_order_key_are_refused(tmp_path: Path) -> None:
    """A device enrolled before this check (its key in the database) cannot have check-ins forged."""
    from coordinator.errors import Unauthorized
    from coordinator.models import Device
    from coordinator.store import make_engine, migrate, session_factory

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    with session_factory(engine)() as s:
        s.add(Device(id="dev-weak", name="d", public_key=b64e(bytes(32)), platform="p"))
        s.flush()
        forged = signing.sign_request(
            Ed25519PrivateKey.generate(), "dev-weak", "POST", "/v1/device/checkin", b"{}"
        )
        with pytest.raises(Unauthorized, match="small-order point"):
            auth.authenticate_device(s, forged, "POST", "/v1/device/checkin", b"{}", window_seconds=300)
