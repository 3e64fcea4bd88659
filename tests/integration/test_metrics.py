"""``/metrics`` on a real coordinator after a real federation: the round, stage, device and job families
hold what the job did, no label holds a device id, and every metric the Grafana dashboard and the alerting
rules in deploy/monitoring/ use is one the coordinator exports. On both databases, the scrape's queries for
what a completed job cannot show (abandoned rounds, a running stage, an audit's drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.engine import Federation
from coordinator.models import Audit
from server.metrics import CoordinatorMetrics

from .harness import Coordinator, churn_slices, small_spec, wait_for
from .test_engine_store import checkin_all, current_round, enroll, fed, spec

__all__ = ["fed"]  # the fixture, imported for its side effect on pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(coord: Coordinator) -> str:
    response = httpx.get(coord.url + "/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, (
        f"no sample {name}{labels} on /metrics; have {sorted(k for k in found if k[0] == name)}"
    )
    return found[key]


@pytest.mark.slow
def test_metrics_after_a_two_round_job_with_three_agents(coord: Coordinator, tmp_path: Path) -> None:
    paths, ref, schema = churn_slices(tmp_path / "data", 3)
    for i, p in enumerate(paths):
        coord.run_agent(coord.enroll(p, f"a{i}"))
    api = coord.api()
    job_id = api.json(
        "POST", "/v1/jobs", json=small_spec(schema, rounds=2, target=3, minimum=2, secure=False)
    )["id"]
    api.request("PUT", f"/v1/jobs/{job_id}/reference", content=ref.read_bytes())
    coord.wait_job(job_id)
    rounds = coord.rounds(job_id)
    assert [(r["kind"], r["status"]) for r in rounds] == [
        ("stats", "completed"),
        ("train", "completed"),
        ("train", "completed"),
        ("evaluate", "completed"),
    ]
    wait_for(
        lambda: sum(d["online"] for d in api.json("GET", "/v1/devices")) == 3, 30, "the agents to check in"
    )
    text = scrape(coord)
    found = samples(text)
    job = str(job_id)

    # Rounds and their stages, as this replica ended them.
    assert value(found, "aicfl_job_rounds_completed", job_id=job) == 2
    assert value(found, "aicfl_rounds", status="completed") == 4
    assert value(found, "aicfl_round_seconds_count", kind="train", status="completed") == 2
    assert value(found, "aicfl_round_seconds_count", kind="stats", status="completed") == 1
    assert value(found, "aicfl_round_seconds_count", kind="evaluate", status="completed") == 1
    for stage in ("configure", "input"):
        assert value(found, "aicfl_round_stage_seconds_count", kind="train", stage=stage) == 2
        assert value(found, "aicfl_round_stage_seconds_sum", kind="train", stage=stage) > 0
    # The stage histograms add up to the round histogram (the round is the sum of its stages).
    stage_sum = sum(
        value(found, "aicfl_round_stage_seconds_sum", kind="train", stage=s) for s in ("configure", "input")
    )
    assert value(found, "aicfl_round_seconds_sum", kind="train", status="completed") == pytest.approx(
        stage_sum
    )
    # The API's timelines say the same.
    for r in rounds:
        assert [e["stage"] for e in r["stages"]] == ["configure", "input"]
        assert all(e["ended"] >= e["started"] and e["seconds"] >= 0 for e in r["stages"])
    assert value(found, "aicfl_round_aggregation_seconds_count") == 2
    assert value(found, "aicfl_round_devices_total", kind="train", status="active") == 6
    assert value(found, "aicfl_job_round_participants", job_id=job) == 3
    assert value(found, "aicfl_job_round_dropped", job_id=job) == 0
    assert value(found, "aicfl_job_round_declined", job_id=job) == 0
    assert value(found, "aicfl_job_rounds_abandoned_total", job_id=job) == 0

    # Bytes from devices: the updates (input) are the bulk; check-ins and configure carry a little.
    received = {s: value(found, "aicfl_device_bytes_received_total", stage=s) for s in ("input", "configure")}
    assert received["input"] > received["configure"] > 0
    assert value(found, "aicfl_device_bytes_received_total", stage="checkin") >= 0
    # A model update (float32 parameters) is bigger than the parameter count, for each of 3 devices x 2 rounds.
    versions = api.json("GET", f"/v1/jobs/{job_id}/models")
    assert received["input"] > 6 * 4 * versions[-1]["num_parameters"]

    # The latest metrics: central from the last training round, federated from the evaluation round.
    last_train = [r for r in rounds if r["kind"] == "train"][-1]
    assert value(found, "aicfl_job_metric", job_id=job, source="central", metric="auc") == pytest.approx(
        last_train["metrics"]["central"]["auc"]
    )
    assert value(found, "aicfl_job_metric", job_id=job, source="federated", metric="auc") == pytest.approx(
        rounds[-1]["metrics"]["federated"]["auc"]
    )

    assert value(found, "aicfl_devices_enrolled") == 3
    assert value(found, "aicfl_devices_online") == 3
    assert value(found, "aicfl_jobs", status="completed") == 1

    # A label never holds a device id: a device's series would grow with the fleet.
    devices = [d["id"] for d in api.json("GET", "/v1/devices")]
    assert len(devices) == 3
    labels = {v for (_, ls) in found for _, v in ls}
    assert not [v for v in labels if any(d in v for d in devices)]
    assert not [d for d in devices if d in text]


def test_abandoned_rounds_running_stage_and_drift_on_both_databases(fed: Federation) -> None:
    """The families a completed job cannot show: abandoned rounds (in a row and in total), the running
    stage's time against its timeout, and the latest audit verdict, read by the scrape's queries."""
    now = [1_000.0]
    fed.clock = lambda: now[0]
    metrics = CoordinatorMetrics(fed, eligibility_window=60)
    devices = enroll(fed, 3)
    job = fed.jobs.submit(spec(stage_timeout=5), "op")
    for _ in range(2):
        checkin_all(fed, devices)
        fed.tick()  # opens the statistics round
        now[0] += 6  # nobody answers configure: all dropped, below the minimum
        fed.tick()
        assert current_round(fed, job.id).status == "abandoned"
    checkin_all(fed, devices)
    fed.tick()  # a third round, running
    now[0] += 4
    with fed.write() as s:
        s.add(Audit(job_id=job.id, version=0, status="done", verdict="ok"))
        s.add(Audit(job_id=job.id, version=1, status="done", verdict="drift"))
        s.add(Audit(job_id=job.id, version=2, status="queued"))

    found = samples(generate_latest(metrics.registry).decode())
    j = str(job.id)
    assert value(found, "aicfl_job_rounds_abandoned_consecutive", job_id=j) == 2
    assert value(found, "aicfl_job_rounds_abandoned_total", job_id=j) == 2
    assert value(found, "aicfl_rounds", status="abandoned") == 2
    assert value(found, "aicfl_job_stage_elapsed_seconds", job_id=j, stage="configure") == 4
    assert value(found, "aicfl_job_stage_timeout_seconds", job_id=j, stage="configure") == 5
    assert value(found, "aicfl_job_round_participants", job_id=j) == 3
    assert value(found, "aicfl_job_round_dropped", job_id=j) == 0
    assert value(found, "aicfl_job_audit_verdict", job_id=j, verdict="drift") == 1
    assert value(found, "aicfl_job_audit_verdict", job_id=j, verdict="ok") == 0
    assert value(found, "aicfl_audit_verdicts", verdict="drift") == 1
    assert value(found, "aicfl_audits", status="queued") == 1
    # Counted as the driver ended them: two abandoned rounds of 6 s, their configure stages, 6 dropped.
    assert value(found, "aicfl_round_seconds_count", kind="stats", status="abandoned") == 2
    assert value(found, "aicfl_round_seconds_sum", kind="stats", status="abandoned") == 12
    assert value(found, "aicfl_round_stage_seconds_count", kind="stats", stage="configure") == 2
    assert value(found, "aicfl_round_devices_total", kind="stats", status="dropped") == 6
    assert value(found, "aicfl_devices_enrolled") == 3
    assert value(found, "aicfl_devices_online") == 3


def _exported(text: str) -> set[str]:
    """Every series name the scrape can hold: each ``# TYPE`` family with its sample suffixes."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {f"{name}_sum", f"{name}_count"}
    return names


# PromQL's keywords: identifiers that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, label lists and Grafana variables
    left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", expr):
        if m.group(0) in _KEYWORDS or expr[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group(0))
    return names


def _dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL expression in a Grafana dashboard model: panel targets and variable queries."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, v in node.items():
            if key == "expr" and isinstance(v, str):
                out.append(v)
            elif key == "query" and isinstance(v, dict) and isinstance(v.get("query"), str):
                out.append(v["query"])
            elif key == "query" and isinstance(v, str) and "label_values" in v:
                out.append(v)
            else:
                out += _dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            out += _dashboard_exprs(v)
    return out


def test_metric_name_parser_sees_what_an_expression_reads() -> None:
    assert metric_names(
        'histogram_quantile(0.9, sum by (le, stage) (rate(aicfl_round_stage_seconds_bucket{job=~"$job"}[5m])))'
    ) == {"aicfl_round_stage_seconds_bucket"}
    assert metric_names("max by (job) (a_b) / on (job) max by (job) (c) > 0.8 and absent(up offset 5m)") == {
        "a_b",
        "c",
        "up",
    }
    assert metric_names("label_values(aicfl_job_rounds_completed, job)") == {
        "aicfl_job_rounds_completed",
        "job",
    }


def test_every_metric_in_the_dashboard_and_alerts_is_exported(coord: Coordinator) -> None:
    exported = _exported(scrape(coord)) | {"up"}  # up: Prometheus's own, per scrape target
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs = {"grafana-dashboard.json": _dashboard_exprs(dashboard)}
    exprs["alerts.yml"] = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs["grafana-dashboard.json"]) >= 10 and len(exprs["alerts.yml"]) >= 6
    unknown = {}
    for where, found in exprs.items():
        for e in found:
            # label_values(metric, label): the second argument is a label name.
            names = metric_names(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", e))
            missing = names - exported
            if missing:
                unknown[f"{where}: {e}"] = sorted(missing)
    assert not unknown, f"metrics the coordinator does not export: {unknown}"
