"""The demo's summary: per round, the final model beside its ceiling, the cluster's steps and
the audits, read back from the coordinator once the job is done.

A gbdt job (``aicfl demo --model gbdt``, docs/gbdt.md) has no training rounds: a boosting round
is a few level rounds, the last of which registers its version. The summary's ``rounds`` are
those last level rounds (as ``aicfl simulate`` writes them), each with its ``boosting_round``,
and a round's time for the audits' timing runs from the boosting round's first level round to
its last.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from server.demo_data import DIGITS, GBDT
from server.demo_metrics import ceiling_metrics, digits_ceiling, final_metrics, headline
from server.plots import LOWER_IS_BETTER
from shared import codec
from shared.api_client import ApiClient
from shared.jobspec import JobSpec


def _ts(v: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(v).timestamp()


def model_rounds(all_rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that each made a version from the devices' work, by number: the training rounds,
    or a gbdt job's level rounds that completed a boosting round."""
    made = [
        r
        for r in all_rounds
        if r["kind"] == "train" or (r["kind"] == "level" and r["model_version_out"] is not None)
    ]
    return sorted(made, key=lambda r: int(r["number"]))


def _spans(train: list[dict[str, Any]], all_rounds: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Each completed round's start and end; a boosting round starts with its first level round
    (the first after the level round that completed the boosting round before it)."""
    spans = []
    previous = None
    for r in train:
        start = _ts(r["started_at"])
        if r["kind"] == "level":
            start = min(
                _ts(x["started_at"])
                for x in all_rounds
                if x["kind"] == "level"
                and x["started_at"]
                and (previous is None or x["number"] > previous)
                and x["number"] <= r["number"]
            )
        previous = r["number"]
        spans.append((start, _ts(r["ended_at"])))
    return spans


def _audit_summary(api: ApiClient, job_id: int, all_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per version: verdict, top features, drift; and how audit time compares with round time."""
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
    train = [r for r in model_rounds(all_rounds) if r["status"] == "completed"]
    spans = _spans(train, all_rounds)
    round_seconds = [end - start for start, end in spans]
    audit_seconds = [a["seconds"] for a in audits if a["seconds"] is not None]
    # An audit keeps up when the version a round made is audited before the next round ends.
    made_by = {r["model_version_out"]: i for i, r in enumerate(train)}
    on_time = total = 0
    for a in audits:
        i = made_by.get(a["version"])
        if i is None or i + 1 >= len(train) or a["status"] != "done":
            continue
        total += 1
        on_time += _ts(a["updated_at"]) <= spans[i + 1][1]
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
            "privacy": privacy_fields(r.get("privacy")),
        }
        for r in rounds
    ]


PRIVACY_FIELDS = ("level", "epsilon", "delta", "noise_multiplier", "clip", "trusts_coordinator")


def privacy_fields(p: dict[str, Any] | None) -> dict[str, Any] | None:
    """summary.json's ``privacy`` of a round (epsilon after it) or of the job (epsilon spent, and its
    target): None without differential privacy (docs/privacy.md)."""
    if not p:
        return None
    extra = ("target_epsilon", "rounds_spent") if "rounds_spent" in p else ()
    return {k: p.get(k) for k in (*PRIVACY_FIELDS, *extra)}


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
    """What ``aicfl demo`` prints and writes to ``summary.json``: the same fields for every dataset
    and model; a gbdt job adds ``model`` (``"gbdt"``), ``gbdt`` (its settings and the final
    ensemble's trees) and ``tree_rounds`` (its rounds by kind and outcome).

    The ceiling of a gbdt job is XGBoost's own ``hist`` with the same settings and rounds, trained on
    every device's rows pooled (``server.demo_metrics.xgboost_ceiling``).
    """
    trees = spec.model.zoo == GBDT
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
    elif trees:
        import pandas as pd

        ceiling = ceiling_metrics(spec, pd.concat(data["parts"]), data["test"], epochs=epochs)
    else:
        ceiling = ceiling_metrics(spec, data["train"], data["test"], epochs=epochs)
    rss = [d["peak_rss_mb"] for d in api.pages("/v1/devices") if d["peak_rss_mb"]]
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
            **_against_leader(headline(spec), final, b["metrics"]),
        }
    train = model_rounds(all_rounds)
    rows = round_rows(train)
    for row, r in zip(rows, train, strict=True):
        if r["kind"] == "level":
            row["boosting_round"] = r["metrics"]["boosting_round"]
    return {
        "devices": devices,
        "dataset": dataset,
        **({"model": GBDT} if trees else {}),
        "headline": headline(spec),
        "job_id": job_id,
        "secure": spec.secure,
        "privacy": privacy_fields(job.get("privacy")),
        "rounds": rows,
        "final": final,
        "ceiling": ceiling,
        "final_version": last["version"],
        "agent_peak_rss_mb": {"max": max(rss) if rss else None, "mean": sum(rss) / len(rss) if rss else None},
        "pretrain": pretrain,
        "baseline": baseline,
        **_audit_summary(api, job_id, all_rounds),
        **(_trees(spec, vec, all_rounds) if trees else {}),
    }


def _against_leader(name: str, final: dict[str, float], leader: dict[str, Any]) -> dict[str, Any]:
    """Whether the federated model beats the AutoML leader on the headline metric, measured on the
    same rows (higher, or lower for RMSE), and by how much (``gap_to_leader``: federated less leader)."""
    if name not in final or not isinstance(leader.get(name), int | float):
        return {"federated_beats_leader": None, "gap_to_leader": None}
    gap = final[name] - leader[name]
    return {"federated_beats_leader": gap < 0 if name in LOWER_IS_BETTER else gap > 0, "gap_to_leader": gap}


def _trees(spec: JobSpec, vector: Any, all_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A gbdt job's ``gbdt`` (its ``[gbdt]`` settings, the final ensemble's trees and leaves) and
    ``tree_rounds`` (its rounds by kind and outcome, as ``aicfl simulate`` counts them)."""
    from shared.gbdt.model import from_bytes

    ensemble = from_bytes(vector).ensemble
    counts: dict[str, int] = {}
    for r in all_rounds:
        if r["kind"] in ("bins", "level"):
            key = f"{r['kind']}_{r['status']}"
            counts[key] = counts.get(key, 0) + 1
    return {
        "gbdt": {
            **spec.gbdt.model_dump(),
            "objective": ensemble.objective,
            "boosting_rounds": ensemble.rounds,
            "trees": len(ensemble.trees),
            "leaves": sum(int(t.is_leaf.sum()) for t in ensemble.trees),
        },
        "tree_rounds": counts,
    }
