"""The device's optimiser: torch.optim's updates, bit for bit, without loading torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.training import LocalOptimizer

ROOT = Path(__file__).resolve().parents[2]


def _run(make_opt, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    # A frozen layer has no gradient: it must be left alone, as torch.optim leaves it.
    model[2].bias.requires_grad_(False)
    opt = make_opt([p for p in model.parameters()])
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "reference"),
    [("sgd", lambda ps: torch.optim.SGD(ps, lr=0.05)), ("adam", lambda ps: torch.optim.Adam(ps, lr=0.05))],
)
def test_updates_equal_torch_optim_exactly(name: str, reference) -> None:
    ours = _run(lambda ps: LocalOptimizer(name, ps, 0.05))
    theirs = _run(reference)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _run(lambda ps: LocalOptimizer(name, ps, 0.05), steps=0)[0])


def test_an_unknown_optimizer_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; expected sgd or adam"):
        LocalOptimizer("rmsprop", [], 0.1)


def test_local_training_does_not_load_torch_dynamo() -> None:
    probe = (
        "import sys, numpy as np; from shared.training import train_local; from shared.zoo import build_model;"
        "m = build_model({'zoo': 'mlp', 'input_dim': 3, 'output_dim': 1, 'hidden': [4]});"
        "x = np.random.default_rng(0).normal(size=(20, 3)); y = (x[:, 0] > 0).astype(float);"
        "[train_local(m, x, y, task='binary', epochs=1, batch_size=8, learning_rate=0.1, optimizer=o, seed=0)"
        " for o in ('sgd', 'adam')];"
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
