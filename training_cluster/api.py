"""The training cluster's view of the coordinator API: the only way it talks to the coordinator.

Pre-training uploads version 0, AutoML stores the job's baseline, audit
workers claim queued audits and return reports. Every call goes over HTTP with
an operator token (admin role for the writes); problem details come back as a
:class:`~shared.api_client.CliError` with one clear line.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from shared import codec
from shared.api_client import ApiClient, CliError


class ClusterApi:
    """A thin typed wrapper over the coordinator's operator endpoints that the cluster uses."""

    def __init__(self, client: ApiClient):
        self.client = client

    @classmethod
    def connect(cls, url: str, token: str | None, ca_cert: str | None = None) -> ClusterApi:
        return cls(ApiClient(url, token, verify=ca_cert if ca_cert else True))

    def close(self) -> None:
        self.client.close()

    # -- jobs ---------------------------------------------------------------

    def job(self, job_id: int) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it: ``spec``, ``preprocess``, ``baseline``, ``audit``..."""
        return dict(self.client.json("GET", f"/v1/jobs/{job_id}"))

    def wait_for_preprocess(self, job_id: int, timeout: float, poll: float = 1.0) -> dict[str, Any]:
        """The job once its setup is fixed: the preprocessing its statistics round found (and so the
        network's shape), or at once ``{}`` for an app without a statistics round."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("preprocess") is not None:
                return job
            if job["status"] not in ("running", "pending"):
                raise CliError(f"job {job_id} is {job['status']} before its statistics round finished")
            if time.monotonic() >= deadline:
                raise CliError(
                    f"job {job_id}'s statistics round did not finish within {timeout:.0f} s:"
                    " its preprocessing (and so the network's input size) is not known yet"
                )
            time.sleep(poll)

    def reference(self, job_id: int) -> bytes:
        """The job's reference data (the held-out rows the federation is tested on), as uploaded."""
        return bytes(self.client.request("GET", f"/v1/jobs/{job_id}/reference").content)

    def model(self, job_id: int, version: int) -> tuple[dict[str, Any], np.ndarray]:
        """A model version's header (``arch``: the zoo architecture or the app's ``describe``;
        ``preprocess``: the job's setup...) and its flat vector: float32 parameters, or for a gbdt
        job the uint8 bytes of its ensemble (docs/gbdt.md)."""
        data = self.client.request("GET", f"/v1/jobs/{job_id}/models/{version}/blob").content
        header, vec = codec.decode(data, dtype=codec.model_dtype(data))
        return header, np.array(vec)

    def models(self, job_id: int) -> list[dict[str, Any]]:
        return list(self.client.json("GET", f"/v1/jobs/{job_id}/models"))

    # -- pre-training ---------------------------------------------------------

    def upload_version0(
        self, job_id: int, arch: dict[str, Any], vector: np.ndarray, provenance: dict[str, Any]
    ) -> dict[str, Any]:
        """Register pre-trained weights as the job's version 0 (``PUT /v1/jobs/{id}/models/0``).

        ``provenance`` carries at least ``data_sha256``, ``world_size``, ``epochs``
        and ``metrics``; the coordinator adds ``source = "pretrain"``, checks ``arch`` against
        the job's (for an app: its ``describe(job)``) and the vector's size, and signs the version.
        """
        body = codec.encode({"kind": "pretrained", "arch": arch, "provenance": provenance}, vector)
        return dict(
            self.client.json(
                "PUT",
                f"/v1/jobs/{job_id}/models/0",
                content=body,
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    # -- AutoML baseline ------------------------------------------------------

    def put_baseline(self, job_id: int, baseline: dict[str, Any]) -> dict[str, Any]:
        """Store the job's AutoML baseline (``PUT /v1/jobs/{id}/baseline``).

        ``baseline``: ``leader`` (model id), ``metrics`` (the leader's, on the
        job's reference rows), ``leaderboard`` (list of rows), ``contributions``
        (``{"features": {name: mean |TreeSHAP|}, "rows": n}``) and ``provenance``.
        """
        return dict(self.client.json("PUT", f"/v1/jobs/{job_id}/baseline", json=baseline))

    def baseline(self, job_id: int) -> dict[str, Any] | None:
        """The job's baseline, or None when AutoML has not run for it."""
        job = self.job(job_id)
        if job.get("baseline") is None:
            return None
        return dict(self.client.json("GET", f"/v1/jobs/{job_id}/baseline"))

    # -- audits ---------------------------------------------------------------

    def claim_audit(self, worker: str, lease_seconds: float) -> dict[str, Any] | None:
        """Take the oldest queued audit (``POST /v1/audits/claim``), or None when the queue is empty.

        The answer: ``id``, ``job_id``, ``version``, ``attempt``, ``previous_version``
        (the version this one is compared with, or None). The claim is a lease: a
        worker that dies leaves the audit to be taken again once it expires.
        """
        resp = self.client.request(
            "POST", "/v1/audits/claim", json={"worker": worker, "lease_seconds": lease_seconds}
        )
        if resp.status_code == 204 or not resp.content:
            return None
        return dict(resp.json())

    def complete_audit(
        self,
        audit_id: int,
        worker: str,
        *,
        verdict: str,
        report: dict[str, Any],
        seconds: float,
        plots: dict[str, bytes],
    ) -> dict[str, Any]:
        """Return a finished audit (``PUT /v1/audits/{id}/report``): verdict ``ok`` or ``drift``."""
        body = {
            "worker": worker,
            "verdict": verdict,
            "report": report,
            "seconds": seconds,
            "plots": {name: base64.b64encode(png).decode() for name, png in plots.items()},
        }
        return dict(self.client.json("PUT", f"/v1/audits/{audit_id}/report", json=body))

    def fail_audit(self, audit_id: int, worker: str, error: str) -> dict[str, Any]:
        """Record a failed attempt (``POST /v1/audits/{id}/fail``); it is retried up to the job's limit."""
        return dict(
            self.client.json("POST", f"/v1/audits/{audit_id}/fail", json={"worker": worker, "error": error})
        )

    def audit(self, job_id: int, version: int) -> dict[str, Any] | None:
        """A version's audit (status, verdict, report), or None when it has none."""
        try:
            return dict(self.client.json("GET", f"/v1/jobs/{job_id}/audits/{version}"))
        except CliError as err:
            if "(HTTP 404)" in str(err):
                return None
            raise
