"""The model zoo: small PyTorch models for tabular data, and their flat parameter vectors.

A model is fully described by a JSON-serialisable *architecture* dict
(:func:`architecture`), so that the coordinator, the agents and the export
path all build the same module from the same description. Updates travel as
one float32 vector per model in canonical order (:func:`flatten_parameters`):
the ``state_dict`` order of the floating-point tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shared.jobspec import ModelSpec

ZOO_NAMES = ("mlp", "logreg")


def architecture(spec: ModelSpec, input_dim: int, output_dim: int) -> dict[str, Any]:
    """The JSON-serialisable description of the model ``spec`` asks for, sized for the data.

    ``{"zoo": "mlp" | "logreg", "input_dim", "output_dim", "hidden": [...], "dropout"}``;
    a logistic/linear model has no hidden layers and no dropout.
    """
    if input_dim < 1 or output_dim < 1:
        raise ValueError(f"input_dim and output_dim must be at least 1, got {input_dim} and {output_dim}")
    if spec.zoo == "logreg":
        hidden: list[int] = []
        dropout = 0.0
    else:
        hidden, dropout = [int(h) for h in spec.hidden], float(spec.dropout)
    return {
        "zoo": spec.zoo,
        "input_dim": int(input_dim),
        "output_dim": int(output_dim),
        "hidden": hidden,
        "dropout": dropout,
    }


def _checked(arch: dict[str, Any]) -> tuple[str, int, int, list[int], float]:
    try:
        zoo = arch["zoo"]
        input_dim = int(arch["input_dim"])
        output_dim = int(arch["output_dim"])
        hidden = [int(h) for h in arch.get("hidden", [])]
        dropout = float(arch.get("dropout", 0.0))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not a model architecture: {err!r}") from None
    if zoo not in ZOO_NAMES:
        raise ValueError(f"unknown zoo model {zoo!r}; known: {', '.join(ZOO_NAMES)}")
    if input_dim < 1 or output_dim < 1 or any(h < 1 for h in hidden):
        raise ValueError(f"layer sizes must be at least 1: {arch!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if zoo == "logreg":
        hidden, dropout = [], 0.0
    return zoo, input_dim, output_dim, hidden, dropout


def _layer_sizes(arch: dict[str, Any]) -> list[int]:
    _, input_dim, output_dim, hidden, _ = _checked(arch)
    return [input_dim, *hidden, output_dim]


def build_model(arch: dict[str, Any], seed: int | None = None) -> nn.Module:
    """Build the module ``arch`` describes; with ``seed``, its initial weights depend on the seed only.

    The global torch random state is left as it was. ``mlp`` is
    Linear-ReLU(-Dropout) blocks then a Linear output; ``logreg`` is a single
    Linear layer. Outputs are logits (classification) or standardised values.
    """
    _, _, _, _, dropout = _checked(arch)
    sizes = _layer_sizes(arch)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        model = nn.Sequential(*layers)
    return model


def parameter_count(arch: dict[str, Any]) -> int:
    """Length of the model's flat parameter vector, computed from the sizes without building it."""
    sizes = _layer_sizes(arch)
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))


def _float_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # state_dict rather than parameters(): it fixes the order and also covers
    # float buffers (e.g. batch-norm statistics) that must travel with a model.
    return [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]


def flatten_parameters(model: nn.Module) -> np.ndarray:
    """All floating-point tensors of ``model`` as one float32 vector, in ``state_dict`` order."""
    tensors = [t.detach().reshape(-1).to(torch.float32).cpu() for _, t in _float_tensors(model)]
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(tensors).numpy().astype(np.float32, copy=True)


def load_flat_parameters(model: nn.Module, vec: np.ndarray) -> None:
    """Copy a vector made by :func:`flatten_parameters` back into ``model`` (in place).

    Raises ``ValueError`` when the vector is not 1-D, has the wrong length or
    holds a NaN or infinity.
    """
    flat = np.asarray(vec)
    tensors = _float_tensors(model)
    expected = sum(t.numel() for _, t in tensors)
    if flat.ndim != 1:
        raise ValueError(f"expected a 1-D parameter vector, got shape {flat.shape}")
    if flat.size != expected:
        raise ValueError(f"parameter vector has {flat.size} values, the model has {expected}")
    if not np.issubdtype(flat.dtype, np.number) or not np.isfinite(flat).all():
        raise ValueError("parameter vector holds non-finite or non-numeric values")
    source = torch.from_numpy(flat.astype(np.float32, copy=True))
    offset = 0
    with torch.no_grad():
        for _, tensor in tensors:
            n = tensor.numel()
            tensor.copy_(source[offset : offset + n].view_as(tensor).to(tensor.dtype))
            offset += n
