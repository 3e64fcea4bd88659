"""Example-level DP: Opacus's DP-SGD clips per example and adds the calibrated noise; its steps are accounted
as dp-accounting accounts them, close to Opacus's own accountant, and calibration stays within the target."""

from __future__ import annotations

import logging
import math

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from torch import nn

from shared.privacy.accounting import calibrate_dpsgd, dpsgd_costs, epsilon
from shared.privacy.example import DpSgdReport, ExampleDpError, train_local_dp, unsupported_layers
from shared.training import train_local
from shared.zoo import build_model, flatten_parameters

DELTA = 1e-5
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting warns about fractional orders it skips
ARCH = {"zoo": "mlp", "input_dim": 6, "output_dim": 1, "hidden": [16], "dropout": 0.0}


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)


def _dp(model: nn.Module, x: np.ndarray, y: np.ndarray, **kw: object) -> DpSgdReport:
    settings: dict[str, object] = {
        "task": "binary",
        "epochs": 1,
        "batch_size": len(y),
        "learning_rate": 0.1,
        "optimizer": "sgd",
        "seed": 1,
        "noise_multiplier": 0.0,
        "clip": 1.0,
        "noise_seed": 11,
    }
    settings.update(kw)
    return train_local_dp(model, x, y, **settings)  # type: ignore[arg-type]


def test_one_huge_gradient_example_moves_the_model_at_most_clip_times_lr() -> None:
    # One example, one full-batch step without noise: the update is lr times its clipped gradient.
    x = np.full((1, 6), 50.0, dtype=np.float32)
    y = np.array([1e6], dtype=np.float32)
    lr, clip = 0.1, 0.5
    model = build_model(ARCH, seed=3)
    start = flatten_parameters(model)
    report = _dp(model, x, y, task="regression", learning_rate=lr, clip=clip, batch_size=1)
    moved = float(np.linalg.norm(flatten_parameters(model) - start))
    assert report.steps == 1 and report.sampling_rate == 1.0
    assert lr * clip * 0.999 <= moved <= lr * clip * (1 + 1e-5)
    plain = build_model(ARCH, seed=3)
    train_local(
        plain, x, y, task="regression", epochs=1, batch_size=1, learning_rate=lr, optimizer="sgd", seed=1
    )
    assert np.linalg.norm(flatten_parameters(plain) - start) > 100 * lr * clip


def test_clipping_is_per_example_not_per_batch() -> None:
    # Two data sets that differ in one example: in one its gradient is zero (its target is the model's
    # prediction), in the other huge. One full-batch step without noise puts them exactly lr * clip / n
    # apart (its clipped gradient, averaged over n), whatever the other examples contribute.
    n, lr, clip = 64, 0.1, 1.0
    x, _ = _data(n)
    start = build_model(ARCH, seed=3)
    with torch.no_grad():
        y = start(torch.from_numpy(x)).reshape(-1).numpy().copy()
    y[1:] += np.random.default_rng(1).normal(size=n - 1).astype(np.float32)
    y_huge = y.copy()
    y_huge[0] = 1e6
    a, b = build_model(ARCH, seed=3), build_model(ARCH, seed=3)
    _dp(a, x, y, task="regression", learning_rate=lr, clip=clip)
    _dp(b, x, y_huge, task="regression", learning_rate=lr, clip=clip)
    apart = float(np.linalg.norm(flatten_parameters(a) - flatten_parameters(b)))
    assert apart == pytest.approx(lr * clip / n, rel=1e-3)
    moved = float(np.linalg.norm(flatten_parameters(a) - flatten_parameters(start)))
    assert moved > 2 * lr * clip / n  # the others' gradients were not clipped away with the huge one


def test_without_noise_and_with_a_loose_clip_dp_sgd_is_plain_full_batch_training() -> None:
    x, y = _data(40)
    for optimizer in ("sgd", "adam"):
        dp, plain = build_model(ARCH, seed=5), build_model(ARCH, seed=5)
        _dp(dp, x, y, epochs=3, optimizer=optimizer, learning_rate=0.05, clip=1e6)
        train_local(
            plain,
            x,
            y,
            task="binary",
            epochs=3,
            batch_size=40,
            learning_rate=0.05,
            optimizer=optimizer,
            seed=1,
        )
        np.testing.assert_allclose(flatten_parameters(dp), flatten_parameters(plain), atol=1e-5)


def test_noise_is_gaussian_with_std_z_clip_over_batch_and_follows_its_seed() -> None:
    n, lr, clip, z = 50, 1.0, 0.5, 2.0
    x, y = _data(n)
    clean = build_model(ARCH, seed=3)
    _dp(clean, x, y, learning_rate=lr, clip=clip)
    runs: dict[int, list[np.ndarray]] = {}
    for seed in (21, 21, 22):
        model = build_model(ARCH, seed=3)
        _dp(model, x, y, learning_rate=lr, clip=clip, noise_multiplier=z, noise_seed=seed)
        runs.setdefault(seed, []).append(flatten_parameters(model))
    np.testing.assert_array_equal(runs[21][0], runs[21][1])
    assert not np.array_equal(runs[21][0], runs[22][0])
    noise = runs[21][0] - flatten_parameters(clean)  # one step: lr * N(0, (z clip)^2) / n per coordinate
    expected = lr * z * clip / n
    assert abs(float(noise.std()) / expected - 1) < 0.15
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.size)


def test_report_gives_opacus_rate_and_steps_and_a_public_rate_hides_the_count() -> None:
    x, y = _data(300)
    model = build_model(ARCH, seed=3)
    report = _dp(model, x, y, epochs=2, batch_size=32, noise_multiplier=1.0)
    assert (report.sampling_rate, report.steps, report.examples) == (0.1, 20, 300)
    public = _dp(
        build_model(ARCH, seed=3),
        x[:250],
        y[:250],
        epochs=2,
        batch_size=32,
        noise_multiplier=1.0,
        steps_per_epoch=25,
    )
    assert public.wire() == {"noise_multiplier": 1.0, "sampling_rate": 0.04, "steps": 50}
    other = _dp(
        build_model(ARCH, seed=3), x, y, epochs=2, batch_size=32, noise_multiplier=1.0, steps_per_epoch=25
    )
    assert other.wire() == public.wire()


def test_callers_model_is_left_without_opacus_hooks_or_per_example_gradients() -> None:
    x, y = _data(64)
    model = build_model({**ARCH, "dropout": 0.2}, seed=3)
    keys = list(model.state_dict())
    _dp(model, x, y, batch_size=16, noise_multiplier=1.0)
    assert list(model.state_dict()) == keys
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())


def test_epsilon_equals_dp_accounting_composed_directly() -> None:
    z, q, steps = 1.1, 1 / 17, 340
    ours = epsilon(dpsgd_costs(z, q, steps), DELTA)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert ours == acc.get_epsilon(DELTA)
    ours_pld = epsilon(dpsgd_costs(z, q, steps), DELTA, "pld")
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    assert ours_pld == pld.get_epsilon(DELTA)
    # Rounds compose: two rounds of 170 steps are the 340 steps.
    assert epsilon(dpsgd_costs(z, q, 170) + dpsgd_costs(z, q, 170), DELTA) == ours


@pytest.mark.parametrize(
    ("z", "q", "steps"), [(1.0, 0.1, 20), (1.1, 1 / 17, 340), (0.8, 0.01, 2000), (2.0, 0.5, 40)]
)
def test_epsilon_is_close_to_opacus_rdp_accountant(z: float, q: float, steps: int) -> None:
    ours = epsilon(dpsgd_costs(z, q, steps), DELTA)
    theirs = RDPAccountant()
    theirs.history = [(z, q, steps)]
    assert ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-2)
    # At integer orders the two libraries' RDP curves are the same formula: equal to rounding.
    orders = list(range(2, 64))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    np.testing.assert_allclose(
        acc._rdp, opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders), rtol=1e-9
    )


def test_opacus_training_and_our_accounting_agree_on_the_run() -> None:
    x, y = _data(200)
    report = _dp(build_model(ARCH, seed=3), x, y, epochs=3, batch_size=20, noise_multiplier=1.2)
    ours = epsilon(dpsgd_costs(report.noise_multiplier, report.sampling_rate, report.steps), DELTA)
    theirs = RDPAccountant()
    theirs.history = [(1.2, 0.1, 30)]
    assert report.steps == 30 and ours == pytest.approx(theirs.get_epsilon(DELTA), rel=1e-2)


def test_calibration_reaches_the_target_and_not_far_below() -> None:
    q, steps_per_round, rounds, target = 1 / 22, 44, 10, 3.0
    z = calibrate_dpsgd(target, DELTA, q, steps_per_round, rounds)
    spent = epsilon(dpsgd_costs(z, q, steps_per_round * rounds), DELTA)
    assert spent <= target
    assert epsilon(dpsgd_costs(z * (1 - 3e-3), q, steps_per_round * rounds), DELTA) > target


def test_batch_norm_is_refused_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    assert unsupported_layers(build_model(ARCH, seed=1)) == []
    x, y = _data(32)
    with pytest.raises(ExampleDpError, match=r"1 \(BatchNorm1d\)"):
        _dp(model, x, y, noise_multiplier=1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clip": 0.0}, "clip"),
        ({"clip": math.nan}, "clip"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"proximal_mu": 0.01}, "FedProx"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(change: dict[str, object], message: str) -> None:
    x, y = _data(16)
    with pytest.raises(ExampleDpError, match=message):
        _dp(build_model(ARCH, seed=1), x, y, **change)


def test_dpsgd_costs_refuse_negative_steps_and_calibration_needs_a_step() -> None:
    with pytest.raises(ValueError, match="steps"):
        dpsgd_costs(1.0, 0.1, -1)
    with pytest.raises(ValueError, match="steps_per_round"):
        calibrate_dpsgd(3.0, DELTA, 0.1, 0, 10)


def test_empty_poisson_batches_still_step_and_leave_the_model_finite() -> None:
    # q = 1/200 on 10 examples: most steps draw nobody and add the noise alone; each is a step accounted.
    x, y = _data(10)
    model = build_model(ARCH, seed=3)
    start = flatten_parameters(model)
    report = _dp(model, x, y, batch_size=4, noise_multiplier=1.0, steps_per_epoch=200)
    assert report.steps == 200 and report.sampling_rate == 1 / 200
    after = flatten_parameters(model)
    assert np.isfinite(after).all() and not np.array_equal(after, start)
