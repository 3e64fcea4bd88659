"""The deployment manifests parse, and both kustomizations render with kubectl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_yaml_with_kinds(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no object"
    for d in docs:
        assert "kind" in d and "apiVersion" in d, f"{path}: an object without kind/apiVersion"


@pytest.mark.parametrize("folder", ["", "training-cluster"])
def test_kustomization_renders(folder: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S / folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(
        o["metadata"].get("namespace", "aicfl") == "aicfl" for o in objects if o["kind"] != "Namespace"
    )
    if folder == "training-cluster":
        kinds = {o["kind"] for o in objects}
        assert {"Deployment", "StatefulSet", "ScaledObject"} <= kinds
