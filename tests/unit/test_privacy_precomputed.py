"""The Skellam share drawn ahead of the update (``noise_share``): the same vector to the bit, refused when
it is not this round's, and drawn by the agent at share_keys then added at masked input."""

from __future__ import annotations

import base64
import math
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import client_agent.worker as worker_module
from client_agent.transport import SignedClient
from client_agent.worker import Worker
from shared import codec
from shared.privacy.skellam import NoiseShare, SkellamParams, noise_share, noised_input
from shared.secagg import derive_params
from shared.signing import b64e, public_key_bytes
from shared.wire import Stage, Task
from tests.unit.test_agent_worker import COORDINATOR, rows, signed_model, spec

PARAMS = SkellamParams(clip=1.0, bits=12, dim=3_000, noise_multiplier=1.1, min_contributors=4)
ADAPTIVE = replace(PARAMS, indicator_noise=2.0)


def _generator(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


@pytest.mark.parametrize("params", [PARAMS, ADAPTIVE], ids=["fixed-clip", "adaptive-clip"])
def test_a_share_drawn_ahead_gives_the_same_vector_as_drawing_it_inside(params: SkellamParams) -> None:
    update = _generator(1).normal(0, 0.1, params.dim)
    inside = noised_input(update, params, _generator(7))
    rng = _generator(7)
    share = noise_share(params, rng)
    ahead = noised_input(update, params, rng, noise=share)
    assert ahead.dtype == np.uint64 and ahead.shape == (params.coordinates,)
    np.testing.assert_array_equal(ahead, inside)
    # The share is added, not consumed: the caller's array is left as drawn.
    np.testing.assert_array_equal(share.values, noise_share(params, _generator(7)).values)


def test_a_share_is_skellam_of_the_local_variance_on_every_coordinate_but_the_count() -> None:
    params = replace(PARAMS, dim=200_000)
    share = noise_share(params, _generator(3))
    assert share.params == params and share.values.dtype == np.int64
    assert share.values.shape == (params.coordinates - 1,)
    n, var = share.values.size, params.local_variance
    assert abs(float(share.values.mean())) < 5 * math.sqrt(var / n)
    assert abs(float(share.values.var()) - var) < 5 * var * math.sqrt((2.0 + 1.0 / var) / n)
    # Independent of anything but the parameters: two generators, two different shares.
    assert not np.array_equal(share.values, noise_share(params, _generator(4)).values)


def test_a_share_for_other_parameters_is_refused() -> None:
    update = np.zeros(PARAMS.dim)
    for other in (replace(PARAMS, noise_multiplier=2.0), replace(PARAMS, min_contributors=5), ADAPTIVE):
        share = noise_share(other, _generator(2))
        with pytest.raises(ValueError, match="the noise share was drawn for .* this round's mechanism is"):
            noised_input(update, PARAMS, _generator(2), noise=share)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            np.zeros(PARAMS.coordinates - 2, dtype=np.int64),
            "3000 int64 values, got int64 of shape \\(2999,\\)",
        ),
        (np.zeros(PARAMS.coordinates, dtype=np.int64), "3000 int64 values, got int64 of shape \\(3001,\\)"),
        (np.zeros(PARAMS.coordinates - 1, dtype=np.float64), "3000 int64 values, got float64"),
        ([0] * (PARAMS.coordinates - 1), "3000 int64 values, got list"),
    ],
    ids=["short", "long", "float", "not-an-array"],
)
def test_a_share_of_the_wrong_length_or_type_is_refused(values: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        noised_input(np.zeros(PARAMS.dim), PARAMS, _generator(2), noise=NoiseShare(PARAMS, values))


def test_a_bare_array_is_refused_as_a_share() -> None:
    bare = noise_share(PARAMS, _generator(2)).values
    with pytest.raises(ValueError, match="must be a NoiseShare from noise_share\\(\\), got ndarray"):
        noised_input(np.zeros(PARAMS.dim), PARAMS, _generator(2), noise=bare)  # type: ignore[arg-type]


# -- the agent: drawn at share_keys, added at masked input -------------------------------------------


DEVICE_DP = {"level": "device", "target_epsilon": 8.0, "delta": 1e-5, "clip": 0.5}


def _dp_round(scripted_coordinator: Any, tmp_path: Path) -> Any:
    """Three real workers through advertise and share_keys of one device-level DP round."""
    raw = {**spec(), "secure": True, "privacy": DEVICE_DP, "evaluation": {"federated": False}}
    blob, ref = signed_model(1, 0, header_job=1, header_version=0, raw=raw)
    scripted_coordinator.reply("GET", "/v1/device/jobs/1/models/0", 200, raw=blob)
    dim = codec.decode(blob)[1].size
    dp = SkellamParams(clip=0.5, bits=12, dim=dim, noise_multiplier=1.0, min_contributors=2)
    ids = ["d0", "d1", "d2"]
    keys = {d: Ed25519PrivateKey.generate() for d in ids}
    data = tmp_path / "data.csv"
    rows(10).to_csv(data, index=False)
    workers = {
        d: Worker(
            SignedClient(scripted_coordinator.url, d, keys[d]),
            str(data),
            b64e(public_key_bytes(COORDINATOR)),
            d,
        )
        for d in ids
    }
    info = {
        "params": asdict(derive_params(len(ids))),
        "context": base64.b64encode(b"job/1/round/3").decode(),
        "privacy": asdict(dp),
    }

    def task(stage: Stage, **more: Any) -> Task:
        return Task(
            round_id=3, job_id=1, round=1, kind="train", stage=stage, deadline=0, seed=5, spec=raw,
            model=ref, secagg={**info, **more},
        )  # fmt: skip

    advertised = {d: w.advertise(task("advertise_keys")) for d, w in workers.items()}
    identity = {d: b64e(public_key_bytes(k.public_key())) for d, k in keys.items()}
    shared = {
        d: w.share_keys(
            task("share_keys", neighbours={v: advertised[v] for v in ids if v != d}, identity_keys=identity)
        )["ciphertexts"]
        for d, w in workers.items()
    }

    def masked(d: str) -> Task:
        return task("masked_input", ciphertexts={v: shared[v][d] for v in ids if v != d and d in shared[v]})

    return workers, masked, dp


def test_a_device_level_round_draws_its_share_at_share_keys_and_adds_it_at_masked_input(
    scripted_coordinator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[tuple[str, NoiseShare]] = []
    used: list[NoiseShare | None] = []
    real_share, real_input = worker_module.noise_share, worker_module.noised_input

    def spy_share(params: SkellamParams, rng: np.random.Generator) -> NoiseShare:
        share = real_share(params, rng)
        drawn.append((threading.current_thread().name, share))
        return share

    def spy_input(update: Any, params: SkellamParams, rng: Any, noise: NoiseShare | None = None) -> Any:
        used.append(noise)
        return real_input(update, params, rng, noise=noise)

    monkeypatch.setattr(worker_module, "noise_share", spy_share)
    monkeypatch.setattr(worker_module, "noised_input", spy_input)
    workers, masked, dp = _dp_round(scripted_coordinator, tmp_path)
    # Drawn once per device, in the background, before any masked input; not drawn again at masked input.
    for d, w in workers.items():
        header, vec = codec.decode(w.masked_input(masked(d)), dtype="uint64")
        assert header["kind"] == "masked_input" and vec.size == dp.coordinates
    assert [name for name, _ in drawn] == ["aicfl-noise-share"] * 3
    assert len(used) == 3 and all(u is not None for u in used)
    assert {id(u) for u in used} == {id(s) for _, s in drawn}  # each device's own share, each used once
    assert all(u is not None and u.params == dp for u in used)
    assert all(not w._noise for w in workers.values())  # taken: never added to a second vector


def test_a_device_without_a_share_drawn_ahead_draws_it_at_masked_input(
    scripted_coordinator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[NoiseShare | None] = []
    real_input = worker_module.noised_input

    def spy_input(update: Any, params: SkellamParams, rng: Any, noise: NoiseShare | None = None) -> Any:
        used.append(noise)
        return real_input(update, params, rng, noise=noise)

    monkeypatch.setattr(worker_module, "noised_input", spy_input)
    workers, masked, dp = _dp_round(scripted_coordinator, tmp_path)
    w = workers["d0"]
    w._noise.clear()  # as if the draw ahead had failed: the share is drawn with the update instead
    _, vec = codec.decode(w.masked_input(masked("d0")), dtype="uint64")
    assert used == [None] and vec.size == dp.coordinates
    # The next round's advertisement drops whatever the last one held.
    w._noise = workers["d1"]._noise
    w.advertise(
        Task(
            round_id=4, job_id=1, round=2, kind="train", stage="advertise_keys", deadline=0, seed=5,
            spec={}, model=None, secagg={"params": asdict(derive_params(3)), "context": "cm91bmQ0"},
        )
    )  # fmt: skip
    assert w._noise == {}
