"""The two sides of a SecAgg+ round, as state holders over messages (Bell et al., CCS 2020).

The stages follow Bonawitz et al. (CCS 2017, figure 4), restricted to the
neighbours of a random k-regular graph as in SecAgg+:

1. advertise: each device u makes two X25519 pairs, c (to encrypt shares)
   and s (to agree pairwise masks), and signs both public keys with its
   Ed25519 identity key over the round context.
2. share keys: u draws a self-mask seed b_u and sends to each neighbour v
   that advertised, encrypted under agree(c_sk_u, c_pk_v), its Shamir shares
   (threshold t) of b_u and of s_sk_u.
3. masked input: u sends y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2**64,
   over the neighbours v whose shares reached u (+ when u < v, - when u > v,
   ids compared as strings), where s_uv = agree(s_sk_u, s_pk_v).
4. unmask: for each neighbour, u reveals its share of b_v if v survived
   (sent y_v), or of s_sk_v if v dropped after sharing; never both.
5. the coordinator (:func:`unmask_total`) rebuilds each survivor's b and each
   needed dropped device's s_sk from t shares and strips their masks from the
   sum of the y's; :func:`finish` turns the sum into the weighted mean.

Share indexing: device u shares with the neighbours that advertised, taken in
sorted order; the neighbour at position i (from 0) holds share index i + 1.
The index travels inside the encrypted share and comes back with it in the
unmask stage (:func:`encode_share`), so the coordinator never has to guess it.

What the coordinator must do for the arithmetic to close: forward to each
device the advertise messages of its graph neighbours that advertised, and to
each device every ciphertext addressed to it by a device in ``shared``. A
device that then cannot decrypt one of them refuses the whole stage, so a
survivor's pairwise masks are exactly those with its graph neighbours in
``shared``.

Security model: the coordinator is honest-but-curious (docs/secagg.md, "Threat model"). Messages
carry strings and bytes only; numpy vectors stay with the caller's codec.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Collection, Mapping

import numpy as np
import numpy.typing as npt

from shared.robustness import AggregateRejected
from shared.secagg.params import SecAggParams
from shared.secagg.primitives import (
    KEY_BYTES,
    SHARE_BYTES,
    SecAggError,
    agree,
    apply_masks,
    decrypt,
    encrypt,
    frame,
    load_private,
    private_bytes,
    public_bytes,
    shamir_combine,
    shamir_split,
    x25519_keypair,
)
from shared.secagg.quantize import dequantize_weighted_mean, quantize

U64 = npt.NDArray[np.uint64]

_VERSION = b"aicfl-secagg-v1"
_ADVERTISE = b"advertise"
_SHARE = b"share"
_MASK = b"mask"
_INDEX_BYTES = 2


def _b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _b64d(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise SecAggError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise SecAggError(f"{what} is not valid base64") from None


def _unframe(data: bytes, count: int, what: str) -> list[bytes]:
    parts: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise SecAggError(f"{what} is truncated")
        size = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if pos + size > len(data):
            raise SecAggError(f"{what} is truncated")
        parts.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise SecAggError(f"{what} has trailing bytes")
    return parts


def _pair_info(purpose: bytes, context: bytes, u: str, v: str) -> bytes:
    # The same for both ends of the pair, different for every round, pair and purpose.
    a, b = sorted((u, v))
    return frame(_VERSION, purpose, context, a.encode(), b.encode())


def _share_aad(context: bytes, sender: str, receiver: str) -> bytes:
    return frame(_VERSION, _SHARE, context, sender.encode(), receiver.encode())


def advertise_message(context: bytes, device_id: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """The bytes a device signs (with its Ed25519 identity key) when it advertises its two keys."""
    return frame(_VERSION, _ADVERTISE, context, device_id.encode(), c_pk, s_pk)


def verify_advertisement(
    context: bytes,
    device_id: str,
    message: Mapping[str, object],
    verify: Callable[[str, bytes, bytes], bool],
) -> tuple[bytes, bytes]:
    """The (c_pk, s_pk) of a well-formed, correctly signed advertise message; SecAggError naming the device otherwise.

    ``verify(device_id, message, signature)`` checks the identity signature;
    an exception it raises counts as a failed signature.
    """
    try:
        c_pk = _b64d(message.get("c_pk"), "c_pk")
        s_pk = _b64d(message.get("s_pk"), "s_pk")
        signature = _b64d(message.get("signature"), "signature")
    except SecAggError as exc:
        raise SecAggError(f"advertise message of device {device_id!r}: {exc}") from None
    if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
        raise SecAggError(f"advertise message of device {device_id!r}: public keys must be {KEY_BYTES} bytes")
    if c_pk == s_pk:
        raise SecAggError(f"advertise message of device {device_id!r}: c_pk and s_pk must differ")
    try:
        ok = bool(verify(device_id, advertise_message(context, device_id, c_pk, s_pk), signature))
    except Exception:  # a verifier that raises has refused the signature
        ok = False
    if not ok:
        raise SecAggError(f"advertise message of device {device_id!r}: signature does not verify")
    return c_pk, s_pk


def check_distinct_keys(keys: Mapping[str, tuple[bytes, bytes]]) -> None:
    """SecAggError when one public key appears twice among the devices' advertised keys.

    A repeated key means a device replayed or copied another's: agreeing with
    it would let one party read shares or masks meant for another.
    """
    seen: dict[bytes, str] = {}
    for device, pair in sorted(keys.items()):
        for key in pair:
            if key in seen:
                other = seen[key]
                who = f"devices {other!r} and {device!r}" if other != device else f"device {device!r}"
                raise SecAggError(f"{who} advertised the same public key")
            seen[key] = device


def encode_share(index: int, share: bytes) -> str:
    """A share as sent in the unmask stage: base64 of its 2-byte index and its 32 bytes."""
    return _b64e(index.to_bytes(_INDEX_BYTES, "big") + share)


def decode_share(text: str) -> tuple[int, bytes]:
    """Inverse of :func:`encode_share`; SecAggError when malformed."""
    raw = _b64d(text, "share")
    if len(raw) != _INDEX_BYTES + SHARE_BYTES:
        raise SecAggError(f"a share is {_INDEX_BYTES + SHARE_BYTES} bytes, got {len(raw)}")
    index = int.from_bytes(raw[:_INDEX_BYTES], "big")
    if index < 1:
        raise SecAggError("share index must be at least 1")
    return index, raw[_INDEX_BYTES:]


def _check_vector(vec: object, what: str) -> U64:
    if not isinstance(vec, np.ndarray) or vec.dtype != np.uint64 or vec.ndim != 1 or vec.size < 1:
        raise SecAggError(f"{what} must be a non-empty one-dimensional uint64 array")
    return vec


class SecAggClient:
    """The device side of one SecAgg+ round; one instance per device and round.

    ``context`` binds the job and the round: it enters every signature, HKDF
    info and AES-GCM associated data, so nothing from one round is accepted
    in another. ``sign`` signs with the device's Ed25519 identity key.
    """

    def __init__(
        self, device_id: str, context: bytes, params: SecAggParams, sign: Callable[[bytes], bytes]
    ) -> None:
        self.device_id = device_id
        self.context = context
        self.params = params
        self._sign = sign
        self._c_sk, self.c_pk = x25519_keypair()
        self._s_sk, self.s_pk = x25519_keypair()
        self._b = secrets.token_bytes(KEY_BYTES)  # self-mask seed, fresh per round
        self._neighbours: dict[str, tuple[bytes, bytes]] | None = None
        self._held: dict[str, tuple[int, bytes, bytes]] | None = None  # sender -> (index, b share, sk share)
        self._revealed: dict[str, str] = {}  # neighbour -> "b" or "sk"

    def advertise(self) -> dict[str, str]:
        """Stage 1: the two public keys and the identity signature over context | id | c_pk | s_pk."""
        message = advertise_message(self.context, self.device_id, self.c_pk, self.s_pk)
        return {
            "c_pk": _b64e(self.c_pk),
            "s_pk": _b64e(self.s_pk),
            "signature": _b64e(self._sign(message)),
        }

    def share_keys(
        self, neighbours: Mapping[str, Mapping[str, object]], verify: Callable[[str, bytes, bytes], bool]
    ) -> dict[str, str]:
        """Stage 2: to each neighbour that advertised, base64 AES-GCM ciphertext of its shares of b_u and s_sk_u.

        Refuses (SecAggError) a neighbour whose signature fails, a public key
        seen twice, itself among its neighbours, more than k neighbours, or
        fewer than t (its secrets could then never be rebuilt).
        """
        if self._neighbours is not None:
            raise SecAggError(f"device {self.device_id!r} has already shared its keys in this round")
        if self.device_id in neighbours:
            raise SecAggError(f"device {self.device_id!r} was given itself as a neighbour")
        if len(neighbours) > self.params.k:
            raise SecAggError(
                f"device {self.device_id!r} was given {len(neighbours)} neighbours, more than k"
            )
        if len(neighbours) < self.params.t:
            raise SecAggError(
                f"device {self.device_id!r}: only {len(neighbours)} neighbours advertised, "
                f"fewer than the threshold t={self.params.t}"
            )
        keys = {v: verify_advertisement(self.context, v, msg, verify) for v, msg in neighbours.items()}
        check_distinct_keys({**keys, self.device_id: (self.c_pk, self.s_pk)})

        order = sorted(keys)
        b_shares = shamir_split(self._b, self.params.t, len(order))
        sk_shares = shamir_split(private_bytes(self._s_sk), self.params.t, len(order))
        out: dict[str, str] = {}
        for v, (i, b_share), (j, sk_share) in zip(order, b_shares, sk_shares, strict=True):
            assert i == j
            plaintext = frame(
                self.device_id.encode(), v.encode(), i.to_bytes(_INDEX_BYTES, "big"), b_share, sk_share
            )
            key = agree(self._c_sk, keys[v][0], _pair_info(_SHARE, self.context, self.device_id, v))
            out[v] = _b64e(encrypt(key, plaintext, _share_aad(self.context, self.device_id, v)))
        self._neighbours = keys
        return out

    def _open_share(self, sender: str, ciphertext: str) -> tuple[int, bytes, bytes]:
        assert self._neighbours is not None
        if sender not in self._neighbours:
            raise SecAggError(
                f"device {self.device_id!r} got shares from {sender!r}, not a neighbour that advertised"
            )
        raw = _b64d(ciphertext, f"share ciphertext from {sender!r}")
        key = agree(
            self._c_sk, self._neighbours[sender][0], _pair_info(_SHARE, self.context, sender, self.device_id)
        )
        try:
            plaintext = decrypt(key, raw, _share_aad(self.context, sender, self.device_id))
            src, dst, index, b_share, sk_share = _unframe(plaintext, 5, "share plaintext")
        except SecAggError as exc:
            raise SecAggError(f"share ciphertext from device {sender!r} refused: {exc}") from None
        if src != sender.encode() or dst != self.device_id.encode():
            raise SecAggError(f"share ciphertext from device {sender!r} names the wrong sender or receiver")
        idx = int.from_bytes(index, "big")
        if len(index) != _INDEX_BYTES or not 1 <= idx <= self.params.k:
            raise SecAggError(f"share ciphertext from device {sender!r} has an invalid share index")
        if len(b_share) != SHARE_BYTES or len(sk_share) != SHARE_BYTES:
            raise SecAggError(f"share ciphertext from device {sender!r} holds malformed shares")
        return idx, b_share, sk_share

    def masked_input(self, weighted: np.ndarray, received: Mapping[str, str], in_place: bool = False) -> U64:
        """Stage 3: y_u = x_u + PRG(b_u) + sum over senders v of ±PRG(agree(s_sk_u, s_pk_v)), mod 2**64.

        ``weighted`` is x_u (see :func:`weighted_input`); ``received`` maps each
        neighbour that shared with this device to its ciphertext. The shares
        are decrypted and kept for the unmask stage; one that does not decrypt
        is a SecAggError naming its sender, and fewer than t senders refuse
        the stage. With ``in_place`` the masks go into ``weighted`` itself,
        which is returned (no second vector of the update's size); the caller
        must not need x_u afterwards.
        """
        if self._neighbours is None:
            raise SecAggError(f"device {self.device_id!r} must share its keys before its masked input")
        if self._held is not None:
            raise SecAggError(f"device {self.device_id!r} has already sent its masked input in this round")
        x = _check_vector(weighted, "weighted input")
        held = {v: self._open_share(v, ct) for v, ct in sorted(received.items())}
        if len(held) < self.params.t:
            raise SecAggError(
                f"device {self.device_id!r}: only {len(held)} neighbours shared keys with it, "
                f"fewer than the threshold t={self.params.t}"
            )
        masks = [(self._b, 1)]
        for v in held:
            key = agree(
                self._s_sk, self._neighbours[v][1], _pair_info(_MASK, self.context, self.device_id, v)
            )
            masks.append((key, 1 if self.device_id < v else -1))
        y = x if in_place and x.flags.writeable and x.flags.c_contiguous else x.copy()
        apply_masks(y, masks)
        self._held = held
        return y

    def unmask(self, survivors: Collection[str], dropped: Collection[str]) -> dict[str, str]:
        """Stage 4: for each neighbour in ``survivors`` its share of b_v, for each in ``dropped`` its share of s_sk_v.

        Ids that are not neighbours which shared with this device are ignored.
        Refuses (SecAggError) a device named in both sets, this device itself,
        and any request that would reveal both shares of one neighbour, in
        this call or together with an earlier one.
        """
        if self._held is None:
            raise SecAggError(f"device {self.device_id!r} must send its masked input before unmasking")
        alive, gone = set(survivors), set(dropped)
        if self.device_id in alive or self.device_id in gone:
            raise SecAggError(f"device {self.device_id!r} was asked to unmask itself")
        both = sorted(alive & gone)
        if both:
            raise SecAggError(f"device {both[0]!r} is listed both as a survivor and as dropped")
        want = {v: "b" for v in alive if v in self._held} | {v: "sk" for v in gone if v in self._held}
        for v, kind in sorted(want.items()):
            if self._revealed.get(v, kind) != kind:
                raise SecAggError(
                    f"device {self.device_id!r} already revealed a share of {v!r} of the other kind; "
                    "revealing both would unmask its input"
                )
        out: dict[str, str] = {}
        for v, kind in sorted(want.items()):
            index, b_share, sk_share = self._held[v]
            out[v] = encode_share(index, b_share if kind == "b" else sk_share)
            self._revealed[v] = kind
        return out


def weighted_input(
    update: np.ndarray, n_examples: int, params: SecAggParams, rng: np.random.Generator
) -> U64:
    """x_u: the quantised update times the example count, with the count appended as the last coordinate.

    Summing these keeps FedAvg's weighting exact: the last coordinate of the
    sum is the total weight. ``n_examples`` must lie in ``[1, weight_cap]``.
    """
    if isinstance(n_examples, bool) or not isinstance(n_examples, int | np.integer):
        raise ValueError("n_examples must be an integer")
    if not 1 <= int(n_examples) <= params.weight_cap:
        raise ValueError(f"n_examples must be between 1 and weight_cap={params.weight_cap}, got {n_examples}")
    values = np.asarray(update).ravel()
    out = np.empty(values.size + 1, dtype=np.uint64)
    quantize(values, params.clip, params.bits, rng, out=out[:-1])
    np.multiply(out[:-1], np.uint64(n_examples), out=out[:-1])
    out[-1] = n_examples
    return out


def _rebuild(device: str, shares: list[tuple[int, bytes]] | None, t: int, what: str) -> bytes:
    distinct: dict[int, bytes] = {}
    for index, share in shares or []:
        if distinct.setdefault(index, share) != share:
            raise SecAggError(f"device {device!r}: two different shares with index {index} of its {what}")
    if len(distinct) < t:
        raise SecAggError(
            f"device {device!r}: only {len(distinct)} of the t={t} shares of its {what} arrived; "
            "the round cannot be unmasked"
        )
    return shamir_combine(sorted(distinct.items())[:t])


def unmask_total(
    masked_total: np.ndarray,
    *,
    context: bytes,
    params: SecAggParams,
    graph: Mapping[str, Collection[str]],
    shared: Collection[str],
    survivors: Collection[str],
    advertised: Mapping[str, Mapping[str, object]],
    b_shares: Mapping[str, list[tuple[int, bytes]]],
    sk_shares: Mapping[str, list[tuple[int, bytes]]],
    weighted: bool = False,
) -> U64:
    """Stage 5 (coordinator): the sum of the survivors' x_u, from the sum of their y_u (mod 2**64).

    Removes each survivor's self mask PRG(b_u), with b_u rebuilt from t of
    ``b_shares[u]``, and the pairwise masks between each device that dropped
    after sharing (in ``shared``, not in ``survivors``) and its surviving
    neighbours, with its s_sk rebuilt from t of ``sk_shares[v]`` and checked
    against its advertised s_pk. Masks between two survivors cancel in the sum;
    devices that never shared were never masked with. A missing
    reconstruction (fewer than t distinct shares) is a SecAggError naming the
    device: the round must be abandoned, never finished with a wrong sum.

    ``weighted``: the sum is of :func:`weighted_input` vectors (a training round), so it is checked
    against what the protocol's arithmetic allows (:func:`check_weighted_total`).
    """
    total = _check_vector(masked_total, "masked total").copy()
    shared_set, alive = set(shared), set(survivors)
    stray = sorted(alive - shared_set)
    if stray:
        raise SecAggError(f"device {stray[0]!r} sent a masked input without having shared its keys")
    unknown = sorted(d for d in shared_set if d not in advertised or d not in graph)
    if unknown:
        raise SecAggError(f"device {unknown[0]!r} shared keys but is not in the graph or did not advertise")
    if not alive:
        raise SecAggError("no device sent a masked input")

    def s_pk_of(device: str) -> bytes:
        key = _b64d(advertised[device].get("s_pk"), f"s_pk of device {device!r}")
        if len(key) != KEY_BYTES:
            raise SecAggError(f"s_pk of device {device!r} must be {KEY_BYTES} bytes")
        return key

    # Rebuild every secret first, so that a missing one fails before any mask is expanded.
    seeds = {u: _rebuild(u, b_shares.get(u), params.t, "self-mask seed") for u in sorted(alive)}
    keys = {}
    for v in sorted(shared_set - alive):
        if any(u in alive for u in graph[v]):
            sk = load_private(_rebuild(v, sk_shares.get(v), params.t, "mask key"))
            if public_bytes(sk) != s_pk_of(v):
                raise SecAggError(f"device {v!r}: the rebuilt mask key does not match its advertised s_pk")
            keys[v] = sk

    masks = [(seed, -1) for seed in seeds.values()]
    for v, sk in keys.items():
        for u in sorted(graph[v]):
            if u in alive:  # u added +PRG(s_uv) when u < v, -PRG(s_uv) otherwise
                masks.append((agree(sk, s_pk_of(u), _pair_info(_MASK, context, u, v)), -1 if u < v else 1))
    apply_masks(total, masks)
    if weighted:
        check_weighted_total(total, params, len(alive))
    return total


def check_weighted_total(total: np.ndarray, params: SecAggParams, contributors: int) -> None:
    """AggregateRejected unless the unmasked sum is one that devices following the protocol can make.

    Each device sends ``w * q`` with ``q`` in ``[0, levels]`` and its weight ``w`` in
    ``[1, weight_cap]`` as the last coordinate; so the total weight ``W`` lies in
    ``[contributors, contributors * weight_cap]`` and every other coordinate in ``[0, W * levels]``.
    A sum outside these bounds means some device deviated (or the modulus wrapped): its
    dequantised mean could leave ``[-clip, clip]``, so it is never applied.
    """
    vec = _check_vector(total, "unmasked total")
    weight = int(vec[-1])
    if not contributors <= weight <= contributors * params.weight_cap:
        raise AggregateRejected(
            f"the summed weight {weight} of {contributors} devices lies outside [{contributors},"
            f" {contributors * params.weight_cap}] (weight_cap = {params.weight_cap}): some device did not"
            " follow the protocol"
        )
    largest = int(vec[:-1].max()) if vec.size > 1 else 0
    if largest > weight * params.levels:
        raise AggregateRejected(
            f"a coordinate of the unmasked sum ({largest}) exceeds the summed weight times the quantisation"
            f" levels ({weight} * {params.levels}): some device did not follow the protocol"
        )


def finish(total_unmasked: np.ndarray, params: SecAggParams) -> tuple[npt.NDArray[np.float32], int]:
    """The example-weighted mean update (float32) and the total weight, from the unmasked sum."""
    total = _check_vector(total_unmasked, "unmasked total")
    if total.size < 2:
        raise SecAggError("unmasked total must hold at least one value and the weight")
    weight = int(total[-1])
    if weight < 1:
        raise SecAggError("unmasked total carries no weight: nothing to average")
    return dequantize_weighted_mean(total[:-1], weight, params.clip, params.bits), weight
