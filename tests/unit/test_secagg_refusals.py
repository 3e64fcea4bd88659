"""SecAgg+ refuses malformed or out-of-protocol messages, naming the device; it never computes a wrong sum.

The tampering cases that need a whole round played along the graph are in
test_secagg_protocol.py; these are the checks of one message, one stage or
one building block.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    decode_share,
    encode_share,
    finish,
    unmask_total,
    verify_advertisement,
    weighted_input,
)
from shared.secagg.primitives import SHARE_BYTES, apply_masks, expand_mask, load_private

CONTEXT = b"job-1/round-2"
PARAMS = SecAggParams(k=3, t=2, clip=1.0)
DEVICES = ["d0", "d1", "d2", "d3"]
GRAPH = {u: [v for v in DEVICES if v != u] for u in DEVICES}  # complete: k = n - 1


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Round:
    """Four devices on the complete graph, played up to the stage a test needs."""

    def __init__(self) -> None:
        self.keys = {d: Ed25519PrivateKey.generate() for d in DEVICES}
        self.clients = {d: SecAggClient(d, CONTEXT, PARAMS, self.keys[d].sign) for d in DEVICES}
        self.advertised = {d: c.advertise() for d, c in self.clients.items()}
        self.inputs = {
            d: weighted_input(np.full(3, 0.25, dtype=np.float32), 2, PARAMS, np.random.default_rng(i))
            for i, d in enumerate(DEVICES)
        }
        self.ciphertexts: dict[str, dict[str, str]] = {}
        self.masked: dict[str, np.ndarray] = {}

    def verify(self, device: str, message: bytes, signature: bytes) -> bool:
        self.keys[device].public_key().verify(signature, message)  # raises when it does not verify
        return True

    def neighbours(self, u: str) -> dict[str, dict[str, str]]:
        return {v: self.advertised[v] for v in GRAPH[u]}

    def share(self, who: list[str] = DEVICES) -> None:
        for u in who:
            self.ciphertexts[u] = self.clients[u].share_keys(self.neighbours(u), self.verify)

    def received(self, u: str) -> dict[str, str]:
        return {v: self.ciphertexts[v][u] for v in GRAPH[u] if v in self.ciphertexts}

    def mask(self, who: list[str] = DEVICES) -> None:
        for u in who:
            self.masked[u] = self.clients[u].masked_input(self.inputs[u].copy(), self.received(u))

    def unmask_kwargs(self, **override: Any) -> dict[str, Any]:
        survivors = set(self.masked)
        b_shares: dict[str, list[tuple[int, bytes]]] = {}
        sk_shares: dict[str, list[tuple[int, bytes]]] = {}
        dropped = set(self.ciphertexts) - survivors
        for u in sorted(survivors):
            nbrs = set(GRAPH[u])
            for v, text in self.clients[u].unmask((survivors - {u}) & nbrs, dropped & nbrs).items():
                (b_shares if v in survivors else sk_shares).setdefault(v, []).append(decode_share(text))
        total = np.zeros(4, dtype=np.uint64)
        for y in self.masked.values():
            total += y
        kwargs: dict[str, Any] = {
            "context": CONTEXT,
            "params": PARAMS,
            "graph": GRAPH,
            "shared": set(self.ciphertexts),
            "survivors": survivors,
            "advertised": self.advertised,
            "b_shares": b_shares,
            "sk_shares": sk_shares,
        }
        return {"masked_total": total, **kwargs, **override}


def test_the_round_played_here_unmasks_to_the_plain_sum() -> None:
    # The baseline the refusals below depart from.
    r = Round()
    r.share()
    r.mask(["d0", "d1", "d2"])  # d3 drops after sharing its keys
    total = unmask_total(**r.unmask_kwargs())
    assert np.array_equal(total, r.inputs["d0"] + r.inputs["d1"] + r.inputs["d2"])
    mean, weight = finish(total, PARAMS)
    assert weight == 6 and mean == pytest.approx(np.full(3, 0.25), abs=2 / PARAMS.levels)


# --------------------------------------------------------------------------- one advertisement


def test_an_advertisement_with_the_same_key_twice_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    client = SecAggClient("d1", CONTEXT, PARAMS, key.sign)
    client.s_pk = client.c_pk
    message = client.advertise()  # properly signed, but one key for both purposes
    with pytest.raises(SecAggError, match="^advertise message of device 'd1': c_pk and s_pk must differ$"):
        verify_advertisement(CONTEXT, "d1", message, lambda *_: True)


def test_an_advertisement_field_that_is_not_text_is_refused() -> None:
    message: dict[str, object] = {"c_pk": 12345, "s_pk": b64(bytes(32)), "signature": b64(bytes(64))}
    with pytest.raises(SecAggError, match="^advertise message of device 'd1': c_pk must be a base64 string$"):
        verify_advertisement(CONTEXT, "d1", message, lambda *_: True)


def test_a_verifier_that_raises_counts_as_a_signature_that_does_not_verify() -> None:
    r = Round()

    def broken(device: str, message: bytes, signature: bytes) -> bool:
        raise KeyError(device)  # e.g. a device the registry does not know

    with pytest.raises(SecAggError, match="^advertise message of device 'd1': signature does not verify$"):
        verify_advertisement(CONTEXT, "d1", r.advertised["d1"], broken)


# --------------------------------------------------------------------------- one device's stages


def test_more_neighbours_than_k_are_refused() -> None:
    r = Round()
    extra = SecAggClient("d9", CONTEXT, PARAMS, Ed25519PrivateKey.generate().sign).advertise()
    with pytest.raises(SecAggError, match="^device 'd0' was given 4 neighbours, more than k$"):
        r.clients["d0"].share_keys({**r.neighbours("d0"), "d9": extra}, r.verify)


def test_shares_from_a_device_that_is_not_a_neighbour_are_refused() -> None:
    r = Round()
    r.share()
    received = r.received("d0")
    received["d7"] = received.pop("d1")
    with pytest.raises(
        SecAggError, match="^device 'd0' got shares from 'd7', not a neighbour that advertised$"
    ):
        r.clients["d0"].masked_input(r.inputs["d0"], received)


def test_a_device_sends_one_masked_input_per_round() -> None:
    r = Round()
    r.share()
    r.mask(["d0"])
    with pytest.raises(SecAggError, match="^device 'd0' has already sent its masked input in this round$"):
        r.clients["d0"].masked_input(r.inputs["d0"], r.received("d0"))


@pytest.mark.parametrize("n", [2.0, True, "2"])
def test_an_example_count_that_is_not_an_integer_is_refused(n: object) -> None:
    with pytest.raises(ValueError, match="^n_examples must be an integer$"):
        weighted_input(np.zeros(3, dtype=np.float32), n, PARAMS, np.random.default_rng(0))  # type: ignore[arg-type]


def test_a_share_with_index_zero_is_refused() -> None:
    # Index 0 would be the secret itself, not a share of it.
    with pytest.raises(SecAggError, match="^share index must be at least 1$"):
        decode_share(encode_share(0, bytes(SHARE_BYTES)))


# --------------------------------------------------------------------------- the coordinator's unmasking


def test_a_survivor_that_never_shared_its_keys_is_refused() -> None:
    r = Round()
    r.share(["d0", "d1", "d2"])
    r.mask(["d0", "d1", "d2"])
    kwargs = r.unmask_kwargs(survivors={"d0", "d1", "d2", "d3"})
    with pytest.raises(SecAggError, match="^device 'd3' sent a masked input without having shared its keys$"):
        unmask_total(**kwargs)


def test_a_device_that_shared_without_advertising_is_refused() -> None:
    r = Round()
    r.share()
    r.mask()
    advertised = {d: m for d, m in r.advertised.items() if d != "d2"}
    with pytest.raises(
        SecAggError, match="^device 'd2' shared keys but is not in the graph or did not advertise$"
    ):
        unmask_total(**r.unmask_kwargs(advertised=advertised))


def test_two_different_shares_with_one_index_are_refused() -> None:
    r = Round()
    r.share()
    r.mask()
    kwargs = r.unmask_kwargs()
    index, share = kwargs["b_shares"]["d1"][0]
    kwargs["b_shares"]["d1"].append((index, bytes(len(share))))
    with pytest.raises(SecAggError, match=f"^device 'd1': two different shares with index {index} of its"):
        unmask_total(**kwargs)


def test_a_dropped_device_whose_advertised_key_is_malformed_is_refused() -> None:
    r = Round()
    r.share()
    r.mask(["d0", "d1", "d2"])
    advertised = {**r.advertised, "d3": {**r.advertised["d3"], "s_pk": b64(bytes(16))}}
    with pytest.raises(SecAggError, match="^s_pk of device 'd3' must be 32 bytes$"):
        unmask_total(**r.unmask_kwargs(advertised=advertised))


@pytest.mark.parametrize(
    ("total", "message"),
    [
        (np.array([7], dtype=np.uint64), "unmasked total must hold at least one value and the weight"),
        (np.array([7, 0], dtype=np.uint64), "unmasked total carries no weight: nothing to average"),
    ],
)
def test_an_unmasked_total_without_a_weight_is_not_averaged(total: np.ndarray, message: str) -> None:
    with pytest.raises(SecAggError, match=f"^{message}$"):
        finish(total, PARAMS)


# --------------------------------------------------------------------------- masks


def test_masks_refuse_keys_signs_and_arrays_they_cannot_use() -> None:
    key = bytes(range(32))
    with pytest.raises(SecAggError, match="^an X25519 private key is 32 bytes, got 31$"):
        load_private(bytes(31))
    with pytest.raises(ValueError, match="^mask length must be non-negative$"):
        expand_mask(key, -1)
    with pytest.raises(SecAggError, match="^masks apply to a one-dimensional uint64 array$"):
        apply_masks(np.zeros(4, dtype=np.int64), [(key, 1)])
    frozen = np.zeros(4, dtype=np.uint64)
    frozen.flags.writeable = False
    with pytest.raises(
        SecAggError, match="^masks apply in place: the array must be writable and contiguous$"
    ):
        apply_masks(frozen, [(key, 1)])
    with pytest.raises(SecAggError, match="^a mask key is 32 bytes, got 16$"):
        apply_masks(np.zeros(4, dtype=np.uint64), [(key[:16], 1)])
    with pytest.raises(ValueError, match="^a mask's sign is \\+1 or -1, got 0$"):
        apply_masks(np.zeros(4, dtype=np.uint64), [(key, 0)])


def test_no_masks_or_an_empty_array_leave_the_array_as_it_is() -> None:
    vec = np.arange(4, dtype=np.uint64)
    apply_masks(vec, [])
    assert vec.tolist() == [0, 1, 2, 3]
    empty = np.zeros(0, dtype=np.uint64)
    apply_masks(empty, [(bytes(32), 1)])
    assert empty.size == 0
    # and a mask added then removed leaves nothing behind
    apply_masks(vec, [(bytes(32), 1)])
    assert vec.tolist() != [0, 1, 2, 3]
    apply_masks(vec, [(bytes(32), -1)])
    assert vec.tolist() == [0, 1, 2, 3]
