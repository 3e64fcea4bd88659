"""The SHAP audit queue for workers, and audit reports and plots for operators."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from coordinator import audits, queries
from coordinator.auth import Operator
from coordinator.errors import Invalid, NotFound
from server.params import AuditId, JobId, Version
from server.schemas import AuditClaimOut, AuditOut, problems
from server.security import admin, federation, operator

router = APIRouter(tags=["audits"])

READ = problems(401, 404, 422)
# FastAPI answers 400 to a JSON body it cannot parse.
WORKER = problems(400, 401, 403, 404, 409, 413, 422)


@router.post(
    "/v1/audits/claim",
    response_model=None,
    responses={
        200: {"model": AuditClaimOut, "description": "the audit taken"},
        204: {"description": "the queue is empty"},
        **problems(400, 401, 403, 413, 422),
    },
)
def claim(body: dict[str, Any], request: Request, op: Operator = Depends(admin)) -> Any:
    """Take the oldest queued audit under a lease; 204 when the queue is empty."""
    lease = body.get("lease_seconds", 600.0)
    if not isinstance(lease, int | float) or isinstance(lease, bool):
        raise Invalid("lease_seconds must be a number")
    taken = federation(request).audits.claim(str(body.get("worker", "")), float(lease))
    if taken is None:
        return Response(status_code=204)
    return taken


@router.put("/v1/audits/{audit_id}/report", response_model=AuditOut, responses=WORKER)
def report(
    audit_id: AuditId, body: dict[str, Any], request: Request, op: Operator = Depends(admin)
) -> AuditOut:
    """A worker's finished audit: verdict, report and PNG plots (base64)."""
    row = federation(request).audits.complete(audit_id, body)
    return AuditOut.model_validate(audits.audit_dict(row))


@router.post("/v1/audits/{audit_id}/fail", response_model=AuditOut, responses=WORKER)
def fail(
    audit_id: AuditId, body: dict[str, Any], request: Request, op: Operator = Depends(admin)
) -> AuditOut:
    """A failed attempt: the audit goes back to the queue until the job's max_attempts."""
    row = federation(request).audits.fail(audit_id, body)
    return AuditOut.model_validate(audits.audit_dict(row, with_report=False))


@router.get("/v1/jobs/{job_id}/audits", response_model=list[AuditOut], responses=READ)
def list_audits(job_id: JobId, request: Request, op: Operator = Depends(operator)) -> list[AuditOut]:
    fed = federation(request)
    with fed.read() as s:
        queries.get_job(s, job_id)
        return [
            AuditOut.model_validate(audits.audit_dict(a, with_report=False))
            for a in audits.list_audits(s, job_id)
        ]


@router.get("/v1/jobs/{job_id}/audits/{version}", response_model=AuditOut, responses=READ)
def show_audit(
    job_id: JobId, version: Version, request: Request, op: Operator = Depends(operator)
) -> AuditOut:
    with federation(request).read() as s:
        return AuditOut.model_validate(audits.audit_dict(audits.get_audit(s, job_id, version)))


@router.get(
    "/v1/jobs/{job_id}/audits/{version}/plots/{name}",
    response_class=Response,
    responses={
        200: {
            "description": "the plot",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **READ,
    },
)
def plot(
    job_id: JobId, version: Version, name: str, request: Request, op: Operator = Depends(operator)
) -> Response:
    """One of an audit's PNG plots (importance.png, beeswarm.png)."""
    fed = federation(request)
    with fed.read() as s:
        row = audits.get_audit(s, job_id, version)
        sha = (row.plots or {}).get(name)
    if sha is None:
        raise NotFound(f"audit of job {job_id} version {version} has no plot {name!r}")
    return Response(content=fed.blobs.get(sha), media_type="image/png")
