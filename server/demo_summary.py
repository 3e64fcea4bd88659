"""The demo's summary: per round, the final model beside its ceiling, the cluster's steps and
the audits, read back from the coordinator once the job is done."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from server.demo_data import DIGITS
from server.demo_metrics import ceiling_metrics, digits_ceiling, final_metrics, headline
from shared import codec
from shared.api_client import ApiClient
from shared.jobspec import JobSpec


def _audit_summary(api: ApiClient, job_id: int, all_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per version: verdict, top features, drift; and how audit time compares with round time."""
    from datetime import datetime

    audits = api.json("GET", f"/v1/jobs/{job_id}/audits")
    rows = [
        {
            "version": a["version"],
            "verdict": a["verdict"] if a["status"] == "done" else a["status"],
            "top_features": a["top_features"],
            "rank_correlation_to_previous": a["rank_correlation_to_previous"],
            "seconds": a["seconds"],
        }
        for a in audits
    ]
    train = [r for r in all_rounds if r["kind"] == "train" and r["status"] == "completed"]

    def ts(v: str) -> float:
        return datetime.fromisoformat(v).timestamp()

    round_seconds = [ts(r["ended_at"]) - ts(r["started_at"]) for r in train]
    audit_seconds = [a["seconds"] for a in audits if a["seconds"] is not None]
    # An audit keeps up when the version a round made is audited before the next round ends.
    made_by = {r["model_version_out"]: i for i, r in enumerate(train)}
    on_time = total = 0
    for a in audits:
        i = made_by.get(a["version"])
        if i is None or i + 1 >= len(train) or a["status"] != "done":
            continue
        total += 1
        on_time += ts(a["updated_at"]) <= ts(train[i + 1]["ended_at"])
    mean_audit = sum(audit_seconds) / len(audit_seconds) if audit_seconds else None
    mean_round = sum(round_seconds) / len(round_seconds) if round_seconds else None
    timing = {
        "mean_audit_seconds": mean_audit,
        "mean_round_seconds": mean_round,
        "audit_to_round_ratio": mean_audit / mean_round if mean_audit and mean_round else None,
        "audited_before_next_round_ended": f"{on_time}/{total}",
    }
    return {"audits": rows, "audit_timing": timing}


def round_rows(rounds: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """summary.json's ``rounds``: one entry per training round, as the API lists them."""
    return [
        {
            "round": r["number"],
            "status": r["status"],
            "participants": r["participants"],
            "dropped": r["dropped"],
            "aggregation_seconds": r["aggregation_seconds"],
            "secure": bool((r["metrics"] or {}).get("secure")),
            "central": (r["metrics"] or {}).get("central", {}),
            "federated": (r["metrics"] or {}).get("federated", {}),
        }
        for r in rounds
    ]


def summarize(
    api: ApiClient,
    job_id: int,
    spec: JobSpec,
    dataset: str,
    devices: int,
    data: dict[str, Any],
    rounds: int,
    reference: bytes,
) -> dict[str, Any]:
    """What ``aicfl demo`` prints and writes to ``summary.json``: the same fields for every dataset."""
    all_rounds = api.json("GET", f"/v1/jobs/{job_id}/rounds")
    versions = api.json("GET", f"/v1/jobs/{job_id}/models")
    last = versions[-1]
    blob = api.request("GET", f"/v1/jobs/{job_id}/models/{last['version']}/blob").content
    header, vec = codec.decode(blob, dtype=codec.model_dtype(blob))
    final = final_metrics(spec, header, vec, reference)
    # As many passes over the pooled rows as each device makes over its own in the whole job.
    epochs = max(10, rounds * spec.training.epochs)
    if dataset == DIGITS:
        ceiling = digits_ceiling(spec, data["split"], reference, epochs)
    else:
        ceiling = ceiling_metrics(spec, data["train"], data["test"], epochs=epochs)
    rss = [d["peak_rss_mb"] for d in api.json("GET", "/v1/devices") if d["peak_rss_mb"]]
    job = api.json("GET", f"/v1/jobs/{job_id}")
    pretrain = None
    if job.get("pretrain"):
        p = job["pretrain"]
        pretrain = {"world_size": p["world_size"], "epochs": p["epochs"], "metrics": p["metrics"]}
    baseline = None
    if job.get("baseline"):
        b = job["baseline"]
        baseline = {
            "leader": b["leader"],
            "algorithm": b["algorithm"],
            "metrics": b["metrics"],
            "federated_final": final,  # the same reference rows
        }
    return {
        "devices": devices,
        "dataset": dataset,
        "headline": headline(spec),
        "job_id": job_id,
        "secure": spec.secure,
        "rounds": round_rows(r for r in all_rounds if r["kind"] == "train"),
        "final": final,
        "ceiling": ceiling,
        "final_version": last["version"],
        "agent_peak_rss_mb": {"max": max(rss) if rss else None, "mean": sum(rss) / len(rss) if rss else None},
        "pretrain": pretrain,
        "baseline": baseline,
        **_audit_summary(api, job_id, all_rounds),
    }
