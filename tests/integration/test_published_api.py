"""The published API tells the truth about the coordinator, in process: the operator token is a declared
security scheme on every operator operation, the device operations name the headers that sign them,
every error is documented as the problem document it is, timestamps carry their offset, ids beyond
64 bits are refused as invalid (never a 500), and a 405 says which methods the path allows.
tests/integration/test_schemathesis.py fuzzes the same promises against a real coordinator."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from coordinator import auth
from server.app import create_app
from server.schemas import Problem
from server.settings import ServerSettings
from shared.signing import DEVICE_HEADERS, b64e, public_key_bytes, sign_request
from tests.fixtures.fuzzing import SPEC, seed_database

PROBLEM = "application/problem+json"
BEYOND = 2**63  # one past the largest signed 64-bit integer
PUBLIC = {"/v1/health", "/v1/coordinator/key", "/v1/enroll"}


class Api:
    """An in-process coordinator with a seeded history, its admin token and an enrolled device."""

    def __init__(self, client: TestClient, token: str, device_id: str, key: Ed25519PrivateKey):
        self.client, self.token, self.device_id, self.key = client, token, device_id, key

    def signed(self, method: str, path: str, body: bytes = b"") -> Any:
        headers = sign_request(self.key, self.device_id, method, path, body)
        return self.client.request(method, path, content=body, headers=headers)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = Path(tmp_path_factory.mktemp("published"))
    settings = ServerSettings(data_dir=root)
    seed_database(settings)
    app = create_app(settings, run_ticker=False)
    with app.state.federation.write() as s:
        token = auth.bootstrap_admin(s)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        assert client.post("/v1/jobs", json=SPEC).status_code == 201
        enrollment = client.post("/v1/enrollment-tokens", json={"count": 1}).json()["tokens"][0]
        key = Ed25519PrivateKey.generate()
        enrolled = client.post(
            "/v1/enroll",
            json={"token": enrollment, "public_key": b64e(public_key_bytes(key)), "name": "published"},
        )
        assert enrolled.status_code == 200, enrolled.text
        yield Api(client, token, enrolled.json()["device_id"], key)


@pytest.fixture(scope="module")
def openapi(api: Api) -> dict[str, Any]:
    return api.client.get("/openapi.json").json()  # type: ignore[no-any-return]


def operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_operator_token_is_a_bearer_scheme_on_every_operator_operation(openapi: dict[str, Any]) -> None:
    scheme = openapi["components"]["securitySchemes"]["OperatorToken"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for method, path, op in operations(openapi):
        operator = path not in PUBLIC and not path.startswith("/v1/device/")
        assert (op.get("security") == [{"OperatorToken": []}]) == operator, f"{method} {path}"


def test_device_operations_document_their_signing_headers(openapi: dict[str, Any]) -> None:
    device_ops = [(m, p, op) for m, p, op in operations(openapi) if p.startswith("/v1/device/")]
    assert len(device_ops) == 6
    for method, path, op in device_ops:
        headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
        assert list(headers) == list(DEVICE_HEADERS), f"{method} {path}"
        assert all(h["required"] and h["description"] for h in headers.values())
        assert "401" in op["responses"]


def test_every_error_is_documented_as_a_problem_document(openapi: dict[str, Any]) -> None:
    problem_fields = set(Problem.model_fields)
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    for method, path, op in operations(openapi):
        if path in {"/v1/health", "/v1/coordinator/key"}:
            continue  # no parameters, no body, no credentials: nothing to refuse
        responses = op["responses"]
        # 422 wherever there is something to refuse (GET /v1/jobs and /v1/devices take nothing).
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in responses, f"{method} {path}"
        errors = {code: r for code, r in responses.items() if code.startswith("4")}
        for code, response in errors.items():
            assert list(response["content"]) == [PROBLEM], f"{method} {path} {code}"
            schema = response["content"][PROBLEM]["schema"]
            assert set(schema["properties"]) == problem_fields, f"{method} {path} {code}"
        if path not in PUBLIC:
            assert "401" in errors, f"{method} {path}"


def test_bodies_a_route_reads_itself_are_documented(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    assert "EnrollRequest" in str(paths["/v1/enroll"]["post"]["requestBody"])
    assert set(paths["/v1/device/rounds/{round_id}/input"]["post"]["requestBody"]["content"]) == {
        "application/json",
        "application/octet-stream",
    }
    blob = paths["/v1/jobs/{job_id}/models/{version}/blob"]["get"]["responses"]["200"]["content"]
    assert list(blob) == ["application/octet-stream"]


def _timestamps(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _timestamps(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _timestamps(v, key)
    elif key.endswith("_at") and value is not None:
        yield key, value


def test_every_timestamp_carries_its_utc_offset(api: Api, openapi: dict[str, Any]) -> None:
    for name in ("JobOut", "RoundOut", "DeviceOut", "ModelVersionOut", "AuditOut", "BaselineOut"):
        for field, schema in openapi["components"]["schemas"][name]["properties"].items():
            if field.endswith("_at"):
                formats = [s.get("format") for s in schema.get("anyOf", [schema])]
                assert "date-time" in formats, f"{name}.{field}"
    seen = []
    for path in (
        "/v1/jobs",
        "/v1/jobs/1",
        "/v1/jobs/1/rounds",
        "/v1/jobs/1/rounds/3",
        "/v1/jobs/1/models",
        "/v1/jobs/1/audits",
        "/v1/jobs/1/audits/5",
        "/v1/devices",
    ):
        answer = api.client.get(path)
        assert answer.status_code == 200, f"{path}: {answer.text}"
        for key, value in _timestamps(answer.json()):
            parsed = datetime.fromisoformat(value)
            assert parsed.utcoffset() == timedelta(0), f"{path} {key}={value}"
            seen.append(key)
    assert {"created_at", "updated_at", "started_at", "ended_at", "enrolled_at"} <= set(seen)


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/jobs/{BEYOND}",
        f"/v1/jobs/1/rounds/{BEYOND}",
        f"/v1/jobs/{BEYOND}/rounds",
        f"/v1/jobs/1/models/{BEYOND}/blob",
        f"/v1/jobs/1/models/{BEYOND}/export",
        f"/v1/jobs/1/audits/{BEYOND}",
        "/v1/jobs/-1",
    ],
)
def test_ids_outside_64_bits_are_invalid_not_a_server_error(api: Api, path: str) -> None:
    answer = api.client.get(path)
    assert answer.status_code == 422 and answer.headers["content-type"].startswith(PROBLEM), answer.text


def test_the_largest_64_bit_id_is_simply_not_found(api: Api) -> None:
    assert api.client.get(f"/v1/jobs/{2**63 - 1}").status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"/v1/device/rounds/{BEYOND}/configure"),
        ("POST", f"/v1/device/rounds/{BEYOND}/input"),
        ("POST", f"/v1/device/rounds/{BEYOND}/withdraw"),
        ("POST", f"/v1/device/rounds/{BEYOND}/advertise_keys"),
        ("GET", f"/v1/device/jobs/{BEYOND}/models/0"),
        ("GET", f"/v1/device/jobs/1/models/{BEYOND}"),
    ],
)
def test_signed_device_routes_refuse_ids_outside_64_bits(api: Api, method: str, path: str) -> None:
    body = b"{}" if method == "POST" else b""
    assert api.signed(method, path, body).status_code == 422
    unsigned = api.client.request(method, path, content=body, headers={"Authorization": ""})
    assert unsigned.status_code == 401  # the signature is checked first: no hint to an unsigned caller


def test_405_names_every_method_the_path_allows(api: Api) -> None:
    answer = api.client.delete("/v1/jobs")
    assert answer.status_code == 405 and answer.headers["content-type"].startswith(PROBLEM)
    assert answer.headers["allow"] == "GET, POST"
    assert api.client.get("/v1/jobs/1/reference").status_code != 405
    assert api.client.post("/v1/jobs/1/reference").headers["allow"] == "GET, PUT"


def test_operator_token_problems_are_unchanged(api: Api) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
        missing = api.client.get("/v1/jobs", headers=headers)
        assert missing.status_code == 401 and missing.headers["content-type"].startswith(PROBLEM)
        assert missing.json()["detail"] == "missing operator token: send 'Authorization: Bearer <token>'"
    unknown = api.client.get("/v1/jobs", headers={"Authorization": "Bearer aicfl_op_nope"})
    assert unknown.status_code == 401 and unknown.json()["detail"] == "operator token is not valid"
    viewer = api.client.post("/v1/operators", json={"name": "v", "role": "viewer"}).json()["token"]
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    assert api.client.get("/v1/jobs", headers=as_viewer).status_code == 200
    refused = api.client.post("/v1/enrollment-tokens", json={"count": 1}, headers=as_viewer)
    assert refused.status_code == 403 and refused.headers["content-type"].startswith(PROBLEM)
    assert "needs the admin role" in refused.json()["detail"]
