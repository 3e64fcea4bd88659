"""Exported model versions give the same outputs as the model they came from."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from shared.export import EXPORT_FORMATS, export_model
from shared.jobspec import ModelSpec
from shared.zoo import architecture, build_model, flatten_parameters

ARCH = architecture(ModelSpec(hidden=[6, 4], dropout=0.2), 5, 3)
PREPROCESS = {"format": "test", "classes": ["a", "b", "c"], "target_mean": 0.0}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ARCH, seed=11).eval()


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)


def expected(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(features)).numpy()


def test_state_dict_export_loads_safely_and_rebuilds_the_model(model, features) -> None:
    blob = export_model(ARCH, flatten_parameters(model), PREPROCESS, "state_dict")
    saved = torch.load(io.BytesIO(blob), weights_only=True)
    assert saved["arch"] == ARCH and saved["preprocess"] == PREPROCESS
    rebuilt = build_model(saved["arch"]).eval()
    rebuilt.load_state_dict(saved["state_dict"])
    np.testing.assert_array_equal(expected(rebuilt, features), expected(model, features))


def test_torchscript_export_gives_the_model_outputs(model, features) -> None:
    blob = export_model(ARCH, flatten_parameters(model), PREPROCESS, "torchscript")
    extra = {"arch.json": "", "preprocess.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(io.BytesIO(blob), _extra_files=extra)
    with torch.no_grad():
        out = loaded(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(out, expected(model, features), rtol=1e-6, atol=1e-6)
    assert json.loads(extra["preprocess.json"]) == PREPROCESS
    assert json.loads(extra["arch.json"]) == ARCH


def test_onnx_export_is_valid_with_named_dynamic_io(model) -> None:
    proto = onnx.load_from_string(export_model(ARCH, flatten_parameters(model), PREPROCESS, "onnx"))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["output"]
    batch, width = proto.graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_param and not batch.dim_value  # symbolic batch axis
    assert width.dim_value == ARCH["input_dim"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["aicfl.preprocess"]) == PREPROCESS
    assert json.loads(meta["aicfl.arch"]) == ARCH


def test_onnx_export_gives_the_model_outputs(model, features) -> None:
    blob = export_model(ARCH, flatten_parameters(model), None, "onnx")
    try:
        import onnxruntime
    except ImportError:
        # onnx's reference evaluator runs the graph in numpy: slower, but it is the spec.
        from onnx.reference import ReferenceEvaluator

        out = ReferenceEvaluator(onnx.load_from_string(blob)).run(None, {"features": features})[0]
    else:
        session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
        out = session.run(None, {"features": features})[0]
    np.testing.assert_allclose(out, expected(model, features), rtol=1e-5, atol=1e-6)


def test_unknown_export_format_names_the_allowed_ones(model) -> None:
    with pytest.raises(ValueError, match="state_dict, torchscript, onnx"):
        export_model(ARCH, flatten_parameters(model), None, "pickle")
    assert EXPORT_FORMATS == ("state_dict", "torchscript", "onnx")


def test_export_refuses_parameters_that_do_not_fit(model) -> None:
    with pytest.raises(ValueError, match="parameter vector"):
        export_model(ARCH, np.zeros(3, dtype=np.float32), None, "state_dict")


def test_onnx_export_falls_back_to_the_torch_export_based_exporter(model, features, monkeypatch) -> None:
    # Newer torch may drop the TorchScript-based exporter; the dynamo path must give the same graph I/O.
    from onnx.reference import ReferenceEvaluator

    from shared import export

    def gone(*args: object) -> bytes:
        raise RuntimeError("legacy exporter removed")

    monkeypatch.setattr(export, "_onnx_legacy", gone)
    proto = onnx.load_from_string(export_model(ARCH, flatten_parameters(model), None, "onnx"))
    assert [i.name for i in proto.graph.input] == ["features"]
    assert [o.name for o in proto.graph.output] == ["output"]
    out = ReferenceEvaluator(proto).run(None, {"features": features})[0]
    np.testing.assert_allclose(out, expected(model, features), rtol=1e-5, atol=1e-6)
