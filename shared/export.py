"""Export a model version as a file another program can load.

Formats:

- ``state_dict``: ``torch.save`` of ``{"arch", "state_dict", "preprocess"}``;
  loads with ``torch.load(..., weights_only=True)`` and
  :func:`shared.zoo.build_model`.
- ``torchscript``: a scripted module (``torch.jit.load``); the architecture
  and preprocessing travel as extra files ``arch.json`` and
  ``preprocess.json``.
- ``onnx``: an ONNX graph with input ``features`` (float32, ``(batch,
  input_dim)``) and output ``output``, batch axis dynamic; the architecture
  and preprocessing travel as metadata properties ``aicfl.arch`` and
  ``aicfl.preprocess`` (JSON).

- ``xgboost``: a ``[model] zoo = "gbdt"`` ensemble as an XGBoost JSON model
  (``xgboost.Booster(model_file=...)``; ``shared/gbdt/model.py``), its only
  format; the others are the networks'.

Every format exports the raw model: logits for classification, standardised
values for regression. The preprocessing description says how to get from a
table to ``features`` and from ``output`` back to labels or units.
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.zoo import build_model, load_flat_parameters

EXPORT_FORMATS = ("state_dict", "torchscript", "onnx")  # a network's
TREES_FORMAT = "xgboost"  # a zoo = "gbdt" ensemble's only format
ONNX_INPUT = "features"
ONNX_OUTPUT = "output"


def _model(arch: dict[str, Any], flat_params: np.ndarray) -> nn.Module:
    model = build_model(arch, seed=0)
    load_flat_parameters(model, flat_params)
    return model.eval()


def _torchscript(model: nn.Module, arch: dict[str, Any], preprocess: dict[str, Any] | None) -> bytes:
    extra = {"arch.json": json.dumps(arch), "preprocess.json": json.dumps(preprocess)}
    buffer = io.BytesIO()
    # TorchScript is deprecated upstream but remains the format C++/mobile
    # consumers load; the warning is about that, not about this model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
        torch.jit.save(scripted, buffer, _extra_files=extra)
    return buffer.getvalue()


def _onnx_legacy(model: nn.Module, example: torch.Tensor) -> bytes:
    # torch.onnx.export documents a path as its target, not a file object.
    with tempfile.TemporaryDirectory(prefix="aicfl-onnx-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        path = Path(folder) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            dynamo=False,
        )
        return path.read_bytes()


def _onnx_dynamo(model: nn.Module, example: torch.Tensor) -> bytes:
    program = torch.onnx.export(
        model,
        (example,),
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,  # else it prints progress to stdout, where a CLI writes its output
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto.SerializeToString()


def _onnx(model: nn.Module, arch: dict[str, Any], preprocess: dict[str, Any] | None) -> bytes:
    import onnx

    # Batch 2 rather than 1: a size-1 example may be specialised as a constant.
    example = torch.zeros(2, int(arch["input_dim"]), dtype=torch.float32)
    try:
        # The TorchScript-based exporter takes a fraction of a second; the
        # torch.export-based one takes seconds. Newer torch may drop the former.
        raw = _onnx_legacy(model, example)
    except (TypeError, RuntimeError, NotImplementedError, AttributeError, ImportError):
        raw = _onnx_dynamo(model, example)
    proto = onnx.load_from_string(raw)
    for key, value in (("aicfl.arch", arch), ("aicfl.preprocess", preprocess)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_model(
    arch: dict[str, Any], flat_params: np.ndarray, preprocess: dict[str, Any] | None, fmt: str
) -> bytes:
    """Serialise the model ``arch`` with parameters ``flat_params`` in format ``fmt``.

    ``fmt`` is one of ``state_dict``, ``torchscript``, ``onnx`` (see the module
    docstring); ``preprocess`` is a :meth:`shared.tabular.Preprocessor.to_dict`
    result or ``None``, embedded as it is. Raises ``ValueError`` for an unknown
    format or parameters that do not fit the architecture.
    """
    if fmt not in (*EXPORT_FORMATS, TREES_FORMAT):
        raise ValueError(
            f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)} ({TREES_FORMAT} for trees)"
        )
    if (arch.get("zoo") == "gbdt") != (fmt == TREES_FORMAT):
        raise ValueError(f"a zoo = 'gbdt' ensemble exports as {TREES_FORMAT}, and only it does")
    if fmt == TREES_FORMAT:
        from shared.gbdt.model import to_xgboost

        return to_xgboost(flat_params)
    model = _model(arch, flat_params)
    if fmt == "state_dict":
        buffer = io.BytesIO()
        torch.save({"arch": arch, "state_dict": model.state_dict(), "preprocess": preprocess}, buffer)
        return buffer.getvalue()
    if fmt == "torchscript":
        return _torchscript(model, arch, preprocess)
    return _onnx(model, arch, preprocess)
