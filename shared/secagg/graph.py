"""The random k-regular neighbour graph of a SecAgg+ round (Bell et al., CCS 2020, section 4).

Bell et al. build it as a Harary graph H(k, n) over a random labelling of the
devices: place the devices on a cycle in a random order and link each to the
k/2 nearest on either side (and, for odd k, to the opposite one). The order
comes from a Fisher-Yates shuffle driven by an AES-256-CTR keystream keyed
with the round's 32-byte public seed, so every party computes the same graph
and nobody can steer it without choosing the seed.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_GRAPH_NONCE = b"aicfl-graph-v1\x00\x00"  # 16 bytes; separates this keystream from any other use of a seed


class _KeyStream:
    """Uniform integers below a bound, from an AES-256-CTR keystream."""

    def __init__(self, seed: bytes) -> None:
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(_GRAPH_NONCE)).encryptor()

    def below(self, bound: int) -> int:
        # Rejection sampling on 64-bit words: no modulo bias.
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            word = int.from_bytes(self._enc.update(bytes(8)), "little")
            if word < limit:
                return word % bound


def seeded_order(ids: Sequence[str], seed: bytes) -> list[str]:
    """The ids (sorted first, so the caller's order does not matter) in a seed-determined random order."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"the graph seed must be {SEED_BYTES} bytes, got {len(seed)}")
    order = sorted(ids)
    stream = _KeyStream(seed)
    for i in range(len(order) - 1, 0, -1):
        j = stream.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbour_graph(ids: Sequence[str], k: int, seed: bytes) -> dict[str, list[str]]:
    """A random k-regular undirected graph over ``ids``, the same for everyone holding ``seed``.

    Each device's neighbours come back sorted. Symmetric, no self loops, every
    degree exactly k; ``k == n - 1`` gives the complete graph. Raises
    ValueError for duplicate ids, ``k`` outside ``[1, n - 1]`` or an odd
    ``n * k`` (no k-regular graph exists).
    """
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("device ids in a neighbour graph must be distinct")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be between 1 and n - 1 = {n - 1}, got k={k}")
    if (n * k) % 2:
        raise ValueError(f"no {k}-regular graph exists on {n} devices (n * k is odd)")
    order = seeded_order(ids, seed)
    offsets = list(range(1, k // 2 + 1)) + [n - d for d in range(1, k // 2 + 1)]
    if k % 2:
        offsets.append(n // 2)  # n is even here
    return {u: sorted(order[(i + d) % n] for d in offsets) for i, u in enumerate(order)}
