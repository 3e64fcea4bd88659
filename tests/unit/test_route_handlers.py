"""The API's routes serve from handlers built once, not rebuilt per request (``server.app.add_routes``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from server.app import add_routes, create_app
from server.settings import ServerSettings


def test_requests_to_the_api_build_no_request_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(ServerSettings(data_dir=tmp_path), run_ticker=False)
    built: list[Any] = []
    real = fastapi.routing.get_request_handler

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs.get("dependant"))
        return real(*args, **kwargs)

    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(fastapi.routing, "get_request_handler", counting)
        answers = [
            client.get("/v1/health").status_code,
            client.get("/v1/jobs").status_code,  # an operator route: 401 from its dependency
            client.post("/v1/device/checkin", content=b"{}").status_code,  # a device route: unsigned, 401
            client.post("/v1/device/rounds/1/masked_input", content=b"x").status_code,
        ]
    assert answers == [200, 401, 401, 401]
    assert built == [], f"{len(built)} request handlers built while serving {len(answers)} requests"


def test_a_router_with_its_own_dependencies_is_refused() -> None:
    app = fastapi.FastAPI()
    with pytest.raises(ValueError, match="needs include_router"):
        add_routes(app, APIRouter(dependencies=[Depends(lambda: None)]))
