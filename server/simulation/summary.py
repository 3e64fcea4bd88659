"""The simulation's summary.json: the demo's fields (``server.demo_summary``), read from the engine.

The demo reads its summary through the operator API; the simulation has no HTTP, so it reads the
same rows through the same queries the API's routes call (``coordinator.queries.rounds_of``) and
measures the final model and the ceiling with the demo's own functions (``server.demo_metrics``).
What a simulation cannot have (pre-training, the AutoML baseline, audits, the agents' memory) is
``None`` or empty, with the reason under ``skipped``, as the demo writes them when it skips a step.
``simulation`` adds what only a simulation knows: the split, the dropouts, the SecAgg+ check of
each round and where the time went.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from coordinator import queries, registry
from coordinator.engine import Federation
from server.demo_metrics import ceiling_metrics, final_metrics, headline
from server.demo_summary import privacy_fields, round_rows
from server.simulation.data import SimulationData
from server.simulation.job import RunStats
from shared.jobspec import JobSpec

SKIPPED = {
    "pretrain": "the simulation runs no central cluster (no Horovod pre-training)",
    "baseline": "the simulation runs no central cluster (no H2O AutoML baseline)",
    "audits": "the simulation runs no audit worker (audit.enabled = false)",
    "agent_peak_rss_mb": "virtual devices share one process: no agent's own peak memory",
}


def _tree_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A gbdt job's rounds by kind and outcome (docs/gbdt.md); nothing for another job."""
    trees = [r for r in rounds if r["kind"] in ("bins", "level")]
    if not trees:
        return {}
    count: dict[str, int] = {}
    for r in trees:
        key = f"{r['kind']}_{r['status']}"
        count[key] = count.get(key, 0) + 1
    return {"tree_rounds": count}


def summarize(
    fed: Federation,
    job_id: int,
    spec: JobSpec,
    data: SimulationData,
    devices: int,
    stats: RunStats,
    simulation: dict[str, Any],
    ceiling: bool = True,
) -> dict[str, Any]:
    """The demo's summary of job ``job_id``, plus ``simulation``; without ``ceiling`` its value is
    ``None`` (and ``skipped`` says so)."""
    with fed.read() as s:
        job = queries.get_job(s, job_id)
        status, reason = job.status, job.reason
        job_privacy = queries.job_dict(s, job, with_latest=False).get("privacy")
        all_rounds = queries.rounds_of(s, job_id)
        versions = registry.list_versions(s, job_id)
        last = versions[-1] if versions else None
        header, vec = fed.vector(job_id, last) if last is not None else ({}, None)
    final = final_metrics(spec, header, vec, data.reference) if vec is not None else {}
    # As many passes over the pooled rows as each device makes over its own in the whole job.
    epochs = max(10, spec.rounds * spec.training.epochs)
    central = ceiling_metrics(spec, data.train, data.test, epochs=epochs) if ceiling else None
    # A gbdt job's boosting rounds: the level rounds that completed one (each registered a version).
    train = [
        r
        for r in all_rounds
        if r["kind"] == "train" or (r["kind"] == "level" and r["model_version_out"] is not None)
    ]
    seconds = [
        (r["ended_at"] - r["started_at"]).total_seconds()
        for r in train
        if r["status"] == "completed" and r["ended_at"] and r["started_at"]
    ]
    return {
        "devices": devices,
        "dataset": data.name,
        "headline": headline(spec),
        "job_id": job_id,
        "secure": spec.secure,
        "privacy": privacy_fields(job_privacy),
        "status": status,
        "reason": reason,
        "rounds": round_rows(train),
        "final": final,
        "ceiling": central,
        "final_version": last.version if last is not None else None,
        "agent_peak_rss_mb": {"max": None, "mean": None},
        "pretrain": None,
        "baseline": None,
        "audits": [],
        "audit_timing": {
            "mean_audit_seconds": None,
            "mean_round_seconds": sum(seconds) / len(seconds) if seconds else None,
            "audit_to_round_ratio": None,
            "audited_before_next_round_ended": "0/0",
        },
        "skipped": {**SKIPPED, **({} if ceiling else {"ceiling": "not asked for (--no-ceiling)"})},
        "simulation": {
            **simulation,
            "messages_posted": stats.posted,
            "messages_refused": stats.refused,
            "withdrawals": stats.withdrawn,
            "silent_answers": stats.silent,
            "deadlines_waited_out": stats.deadlines,
            "device_seconds": round(stats.device_seconds, 3),
            "coordinator_seconds": round(stats.coordinator_seconds, 3),
            "secagg_checks": [{**asdict(c), "exact": c.exact} for c in stats.checks],
            "secagg_exact": all(c.exact for c in stats.checks) if stats.checks else None,
            **_tree_rounds(all_rounds),
        },
    }
