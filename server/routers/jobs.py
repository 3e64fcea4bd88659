"""Jobs, rounds and model versions, for operators."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from coordinator import queries, registry
from coordinator.auth import Operator
from coordinator.engine import Federation
from coordinator.errors import Invalid
from server.params import JobId, RoundNumber, Version, request_body
from server.schemas import BaselineOut, JobOut, ModelVersionOut, RoundDetailOut, RoundOut, problems
from server.security import admin, federation, operator, read_body
from shared.export import export_model

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The problems each kind of operation can answer with (server.schemas.problems).
READ = problems(401, 404, 422)
# Every POST and PUT can be refused 413: server/limits.py bounds each kind of body before it is read.
WRITE = problems(401, 403, 404, 409, 413, 422)
# FastAPI answers 400 to a JSON body it cannot parse.
JSON_WRITE = problems(400, 401, 403, 404, 409, 413, 422)
BYTES = {"schema": {"type": "string", "format": "binary"}}

EXPORT_TYPES = {
    "state_dict": ("application/octet-stream", "pt"),
    "torchscript": ("application/octet-stream", "ts.pt"),
    "onnx": ("application/octet-stream", "onnx"),
    "xgboost": ("application/json", "json"),  # a gbdt job's ensemble (docs/gbdt.md)
}


@router.post("", response_model=JobOut, status_code=201, responses=problems(400, 401, 403, 413, 422))
def submit_job(spec: dict[str, Any], request: Request, op: Operator = Depends(admin)) -> JobOut:
    """Submit a job spec (the TOML file's tables, as JSON); it is validated field by field."""
    fed = federation(request)
    job = fed.jobs.submit(spec, op.name)
    with fed.read() as s:
        return JobOut.model_validate(queries.job_dict(s, queries.get_job(s, job.id)))


@router.get("", response_model=list[JobOut], responses=problems(401))
def list_jobs(request: Request, op: Operator = Depends(operator)) -> list[JobOut]:
    with federation(request).read() as s:
        return [JobOut.model_validate(j) for j in queries.list_jobs(s)]


@router.get("/{job_id}", response_model=JobOut, responses=READ)
def show_job(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> JobOut:
    fed = federation(request)
    with fed.read() as s:
        return JobOut.model_validate(queries.job_dict(s, queries.get_job(s, job_id)))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=WRITE)
def cancel_job(job_id: JobId, request: Request, op: Operator = Depends(admin)) -> JobOut:
    fed = federation(request)
    fed.jobs.cancel(job_id, op.name)
    with fed.read() as s:
        return JobOut.model_validate(queries.job_dict(s, queries.get_job(s, job_id)))


@router.put(
    "/{job_id}/reference",
    status_code=204,
    response_class=Response,
    responses=WRITE,
    openapi_extra=request_body(binary=True),
)
async def put_reference(job_id: JobId, request: Request, op: Operator = Depends(admin)) -> Response:
    """Reference data (CSV or Parquet) for central evaluation; checked against the job's schema."""
    from starlette.concurrency import run_in_threadpool

    body = await read_body(request)
    if not body:
        raise Invalid("reference data is empty")
    await run_in_threadpool(federation(request).jobs.set_reference, job_id, body, op.name)
    return Response(status_code=204)


@router.get(
    "/{job_id}/reference",
    response_class=Response,
    responses={
        200: {"description": "the reference file's bytes", "content": {"application/octet-stream": BYTES}},
        **READ,
    },
)
def get_reference(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> Response:
    """The job's reference data as uploaded: the held-out rows evaluation and baselines are measured on."""
    data = federation(request).cluster.reference_bytes(job_id)
    return Response(content=data, media_type="application/octet-stream")


@router.put(
    "/{job_id}/models/0",
    response_model=ModelVersionOut,
    responses=WRITE,
    openapi_extra=request_body(binary=True),
)
async def put_version0(job_id: JobId, request: Request, op: Operator = Depends(admin)) -> ModelVersionOut:
    """Pre-trained weights (aicfl tensor format, with provenance in the header) as the job's version 0."""
    from starlette.concurrency import run_in_threadpool

    body = await read_body(request)
    if not body:
        raise Invalid("version 0: the body is empty")
    row = await run_in_threadpool(federation(request).cluster.upload_version0, job_id, body, op.name)
    return ModelVersionOut.model_validate(row)


@router.put("/{job_id}/baseline", response_model=BaselineOut, responses=JSON_WRITE)
def put_baseline(
    job_id: JobId, baseline: dict[str, Any], request: Request, op: Operator = Depends(admin)
) -> BaselineOut:
    """Store the job's AutoML baseline: leaderboard, the leader's metrics on the reference rows, TreeSHAP summary."""
    row = federation(request).cluster.put_baseline(job_id, baseline, op.name)
    return BaselineOut.model_validate(queries.baseline_dict(row))


@router.get("/{job_id}/baseline", response_model=BaselineOut, responses=READ)
def get_baseline(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> BaselineOut:
    from sqlalchemy import select

    from coordinator.errors import NotFound
    from coordinator.models import Baseline

    fed = federation(request)
    with fed.read() as s:
        queries.get_job(s, job_id)
        row = s.scalar(select(Baseline).where(Baseline.job_id == job_id))
        if row is None:
            raise NotFound(f"job {job_id} has no baseline yet (run `aicfl cluster automl --job {job_id}`)")
        return BaselineOut.model_validate(queries.baseline_dict(row))


@router.put("/{job_id}/benchmarks/{name}", responses=JSON_WRITE)
def put_benchmark(
    job_id: JobId, name: str, body: dict[str, Any], request: Request, op: Operator = Depends(admin)
) -> dict[str, Any]:
    """Record a line the job's metric is read against (``{"metrics": {"auc": 0.94}, "description": ...}``),
    such as the demo's centrally trained ceiling; the dashboard and `aicfl rounds plot` draw it."""
    return federation(request).jobs.set_benchmark(job_id, name, body, op.name)


@router.get("/{job_id}/rounds", response_model=list[RoundOut], responses=READ)
def list_rounds(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> list[RoundOut]:
    with federation(request).read() as s:
        return [RoundOut.model_validate(r) for r in queries.rounds_of(s, job_id)]


@router.get("/{job_id}/rounds/{number}", response_model=RoundDetailOut, responses=READ)
def show_round(
    job_id: JobId, number: RoundNumber, request: Request, op: Operator = Depends(operator)
) -> RoundDetailOut:
    with federation(request).read() as s:
        return RoundDetailOut.model_validate(queries.round_detail(s, job_id, number))


@router.get("/{job_id}/models", response_model=list[ModelVersionOut], responses=READ)
def list_models(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> list[ModelVersionOut]:
    fed = federation(request)
    with fed.read() as s:
        queries.get_job(s, job_id)
        return [ModelVersionOut.model_validate(v) for v in registry.list_versions(s, job_id)]


@router.get(
    "/{job_id}/models/{version}/blob",
    response_class=Response,
    responses={
        200: {"description": "the signed blob", "content": {"application/octet-stream": BYTES}},
        **READ,
    },
)
def model_blob(
    job_id: JobId, version: Version, request: Request, op: Operator = Depends(operator)
) -> Response:
    """The signed model blob (aicfl tensor format), as agents receive it."""
    fed = federation(request)
    with fed.read() as s:
        sha = registry.get_version(s, job_id, version).sha256
    return Response(content=fed.blobs.get(sha), media_type="application/octet-stream")


@router.get(
    "/{job_id}/models/{version}/export",
    response_class=Response,
    responses={
        200: {
            "description": "the exported model, as an attachment",
            "content": {"application/octet-stream": BYTES},
            "headers": {
                "Content-Disposition": {"description": "its file name", "schema": {"type": "string"}}
            },
        },
        **READ,
    },
)
def export(
    job_id: JobId,
    version: Version,
    request: Request,
    format: str = Query(
        "state_dict", description="state_dict, torchscript or onnx; xgboost for a gbdt job's ensemble"
    ),
    op: Operator = Depends(operator),
) -> Response:
    """A model version in a standard format, with its preprocessing (state_dict)."""
    if format not in EXPORT_TYPES:
        raise Invalid(f"format must be one of {', '.join(EXPORT_TYPES)}; got {format!r}")
    data, media, filename = export_version(federation(request), job_id, version, format)
    return Response(
        content=data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


def export_version(fed: Federation, job_id: int, version: int, format: str) -> tuple[bytes, str, str]:
    """A version in one of ``EXPORT_TYPES``: its bytes, media type and file name."""
    with fed.read() as s:
        row = registry.get_version(s, job_id, version)
        header, vec = registry.load_vector(fed.blobs, row)
    try:
        data = export_model(header["arch"], vec, header.get("preprocess"), format)
    except ValueError as err:
        raise Invalid(f"format: {err}") from None
    media, ext = EXPORT_TYPES[format]
    return data, media, f"job{job_id}-v{version}.{ext}"
