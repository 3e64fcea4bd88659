"""Example-level differential privacy: local DP-SGD with Opacus, one device, one round.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
every step draws a Poisson sample of the device's examples (each one with
probability ``q``), clips each example's gradient to L2 norm ``clip``, sums
them, adds ``N(0, (z * clip)^2)`` to every coordinate and divides by the
expected batch ``q * n``. Opacus's ``PrivacyEngine.make_private`` does the
per-example gradients, the clipping, the noise and the sampling; this module
runs it with the same optimizer, epochs, batch size and loss as
:func:`shared.training.train_local`, so that a DP run compares with a plain one.

Each step is a Poisson-sampled Gaussian mechanism with multiplier ``z`` and
rate ``q``; the device reports ``(z, q, steps)`` (:class:`DpSgdReport`) and
the coordinator accounts them (``shared.privacy.accounting.dpsgd_costs``).
This module does not need ``dp-accounting``: a device only trains.

Randomness: the Poisson draws and the noise come from a generator seeded by
the operating system's CSPRNG unless ``noise_seed`` is given (tests only).
A seed the coordinator knows (the task's seed) would let it regenerate the
noise and subtract it, and knowing which examples were drawn voids the
amplification by sampling. Dropout masks follow the task's ``seed``, as in
:func:`shared.training.train_local`.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.jobspec import Task
from shared.training import Optimizer, as_tensors, task_loss


class ExampleDpError(ValueError):
    """Example-level DP cannot train this model or with these settings; the message says why."""


@dataclass(frozen=True)
class DpSgdReport:
    """What one device's DP-SGD round cost, as the coordinator accounts it, plus the training loss.

    ``noise_multiplier``: z, the noise's standard deviation over ``clip``.
    ``sampling_rate``: q, each example's probability of being in a step's
    batch. ``steps``: the noised steps taken. ``loss``: mean task loss over
    the last epoch's sampled examples (noise-free, for the device's log).
    ``examples``: the device's training examples (not for the wire under DP:
    the count is a function of the data).
    """

    noise_multiplier: float
    sampling_rate: float
    steps: int
    loss: float
    examples: int

    def wire(self) -> dict[str, float | int]:
        """The fields the device sends in the clear for accounting: z, q and the step count."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
        }


def unsupported_layers(model: nn.Module) -> list[str]:
    """The layers Opacus refuses for per-example DP-SGD, as ``"name (Type): why"``; empty when it can train.

    Batch normalisation is the usual one: its statistics mix the examples of
    a batch, so one example's gradient is not its own. Opacus's
    ``ModuleValidator.fix`` would swap it for GroupNorm, but that changes the
    model's parameters and buffers, which must match the global model's
    vector, so the model is refused instead.
    """
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is None:
            continue
        for err in validator(module):
            reason = str(err).split(".")[0].strip()
            problems.append(f"{name or 'the model'} ({type(module).__name__}): {reason}")
    return problems


def _check(
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    clip: float,
    steps_per_epoch: int | None,
    proximal_mu: float,
) -> None:
    problems = []
    if epochs < 1 or batch_size < 1:
        problems.append(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        problems.append(f"learning_rate must be positive, got {learning_rate}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        problems.append(f"noise_multiplier must be a non-negative finite number, got {noise_multiplier}")
    if not (math.isfinite(clip) and clip > 0):
        problems.append(f"clip (max_grad_norm) must be a positive finite number, got {clip}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        problems.append(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    if proximal_mu != 0:
        # Opacus steps on the clipped per-example gradients only; a FedProx term would be silently dropped.
        problems.append(
            "example-level DP does not support FedProx (proximal_mu > 0); use fedavg or another strategy"
        )
    if problems:
        raise ExampleDpError("; ".join(problems))


class _Batches(torch.utils.data.Sampler[list[int]]):
    """A batch sampler of ``count`` batches: only its length matters, Opacus replaces it by Poisson sampling."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Any:
        return iter([[0]] * self.count)


def train_local_dp(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    task: Task,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: Optimizer,
    seed: int,
    noise_multiplier: float,
    clip: float,
    steps_per_epoch: int | None = None,
    noise_seed: int | None = None,
    proximal_mu: float = 0.0,
    threads: int = 1,
) -> DpSgdReport:
    """Train ``model`` in place on ``(X, y)`` with DP-SGD (Opacus) and return what the round cost.

    Same semantics as :func:`shared.training.train_local` (``torch.optim``'s
    SGD or Adam with their defaults, the federation's task loss, ``epochs``
    passes) except each step's batch: a Poisson sample at rate ``q``, every
    example's gradient clipped to ``clip`` and Gaussian noise with standard
    deviation ``noise_multiplier * clip`` added to their sum (Opacus's flat
    clipping, ``make_private``).

    ``steps_per_epoch``: None takes Opacus's own choice, ``ceil(n /
    batch_size)`` steps at ``q = 1 / ceil(n / batch_size)`` (expected batch
    about ``batch_size``); both then depend on the device's example count.
    A value from the job (public) fixes ``q = 1 / steps_per_epoch``, so the
    report reveals nothing about ``n``; the expected batch is then ``q * n``.
    Opacus takes ``int(1 / q)`` steps per epoch, one fewer than
    ``1 / q`` for some values (93, 99, ...); the report counts the steps
    really taken.

    Raises :class:`ExampleDpError` (a ValueError) for settings or layers
    DP-SGD cannot train, naming the problem.
    """
    _check(epochs, batch_size, learning_rate, noise_multiplier, clip, steps_per_epoch, proximal_mu)
    if optimizer not in ("sgd", "adam"):
        raise ExampleDpError(f"unknown optimizer {optimizer!r}; expected sgd or adam")
    layers = unsupported_layers(model)
    if layers:
        raise ExampleDpError("example-level DP cannot train this model: " + "; ".join(layers))
    inputs, targets = as_tensors(X, y, task)
    n = int(inputs.shape[0])
    if n == 0:
        raise ExampleDpError("no training examples")

    from opacus import PrivacyEngine

    dataset = torch.utils.data.TensorDataset(inputs, targets)
    secret = noise_seed if noise_seed is not None else secrets.randbits(62)
    sampling = torch.Generator().manual_seed(secret)
    noise = torch.Generator().manual_seed(secret ^ 0x5DEECE66D)
    if steps_per_epoch is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, generator=sampling)
    else:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Batches(steps_per_epoch), generator=sampling
        )

    previous_threads = torch.get_num_threads()
    was_training = model.training
    torch.set_num_threads(max(1, threads))
    private: Any = None
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Optimal order is the")
            # Opacus's hooks on the first layer, whose inputs need no gradient: harmless, said on every step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(seed)  # dropout masks, as train_local
            params = [p for p in model.parameters() if p.requires_grad]
            base = (
                torch.optim.SGD(params, lr=learning_rate)
                if optimizer == "sgd"
                else torch.optim.Adam(params, lr=learning_rate)
            )
            engine = PrivacyEngine(accountant="rdp")
            try:
                private, dp_optimizer, dp_loader = engine.make_private(
                    module=model,
                    optimizer=base,
                    data_loader=loader,
                    noise_multiplier=noise_multiplier,
                    max_grad_norm=clip,
                    poisson_sampling=True,
                    noise_generator=noise,
                )
            except (NotImplementedError, ValueError) as err:
                raise ExampleDpError(f"example-level DP cannot train this model: {err}") from None
            # Opacus divides the noised sum by int(n * q), 0 (a division by zero) when n * q < 1; the mean
            # estimator DP-SGD analyses divides by the expected batch n * q itself.
            dp_optimizer.expected_batch_size = n * dp_loader.sample_rate
            private.train()
            steps = 0
            epoch_loss, epoch_examples = 0.0, 0
            for _ in range(epochs):
                epoch_loss, epoch_examples = 0.0, 0
                for batch_x, batch_y in dp_loader:
                    dp_optimizer.zero_grad()
                    # An empty batch still steps (noise alone): it is part of the mechanism accounted. Its
                    # mean loss is NaN, but its per-example gradients are an empty tensor: nothing is summed.
                    loss = task_loss(private(batch_x), batch_y, task)
                    loss.backward()
                    dp_optimizer.step()
                    if batch_x.shape[0] > 0:
                        epoch_loss += float(loss.detach()) * batch_x.shape[0]
                        epoch_examples += int(batch_x.shape[0])
                    steps += 1
            history = engine.accountant.history
    finally:
        if private is not None:
            private._close()  # removes the hooks and the per-example gradients from the caller's model
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    # Opacus's accountant records (z, q, steps) as its optimizer steps: report exactly what it accounts.
    rates = {float(h[1]) for h in history}
    recorded = sum(int(h[2]) for h in history)
    if len(rates) != 1 or recorded != steps:
        raise RuntimeError(f"Opacus accounted {history}, the loop took {steps} steps")
    (rate,) = rates
    return DpSgdReport(
        noise_multiplier=float(noise_multiplier),
        sampling_rate=rate,
        steps=steps,
        loss=epoch_loss / epoch_examples if epoch_examples else float("nan"),
        examples=n,
    )
