"""How the operator's commands print a value, a metric line, JSON, an error and a job's progress
(server/console.py)."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from server.console import api_client, emit_json, fmt, metrics_text, print_error, watch_job


def test_fmt_gives_a_dash_for_nothing_and_floats_to_significant_digits() -> None:
    assert fmt(None) == "-"
    assert fmt(0.123456) == "0.1235"
    assert fmt(0.123456, 2) == "0.12"
    assert fmt(1234567.0) == "1.235e+06"
    assert fmt(0.0) == "0"
    # Anything but a float is shown as it is.
    assert (fmt(3), fmt("ok"), fmt(True)) == ("3", "ok", "True")


def test_metrics_text_is_one_line_in_order_without_the_example_count() -> None:
    assert metrics_text(None) == "-"
    assert metrics_text({}) == "-"
    assert metrics_text({"loss": 0.3, "examples": 500, "auc": 0.912345}) == "loss=0.3 auc=0.9123"


def test_emit_json_prints_indented_json_with_dates_as_text(capsys: pytest.CaptureFixture[str]) -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    emit_json({"id": 1, "created_at": when, "rounds": [1, 2]})
    shown = capsys.readouterr()
    assert json.loads(shown.out) == {"id": 1, "created_at": str(when), "rounds": [1, 2]}
    assert shown.out.startswith('{\n  "id": 1,') and shown.out.endswith("}\n")
    assert shown.err == ""


def test_print_error_is_one_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    print_error("no job 9 (HTTP 404)")
    shown = capsys.readouterr()
    assert (shown.out, shown.err) == ("", "error: no job 9 (HTTP 404)\n")


def test_watch_job_at_80_columns_keeps_the_job_and_count_whole_and_wraps_the_metrics(
    scripted_coordinator: Any,
) -> None:
    job = {
        "id": 12,
        "status": "completed",
        "rounds": 10,
        "rounds_completed": 10,
        "latest_round": {"number": 11, "kind": "evaluate", "stage": "masked_input", "status": "completed"},
        "latest_metrics": {"central": {"auc": 0.93121, "accuracy": 0.88112, "loss": 0.31213, "examples": 9}},
    }
    scripted_coordinator.reply("GET", "/v1/jobs/12", json_body=job)
    out = Console(file=io.StringIO(), width=80, markup=False)
    assert (
        watch_job(api_client(scripted_coordinator.url, None), 12, interval=0.01, out=out)["status"]
        == "completed"
    )
    shown = out.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in shown and all(len(line) <= 80 for line in shown.splitlines()), shown
    assert shown.startswith("job 12 rounds ") and " 10/10 " in shown.splitlines()[0], shown
    info = "round 11 evaluate masked_input completed auc=0.9312 accuracy=0.8811 loss=0.3121"
    # The info column wraps beside the elapsed time: read it back without the time.
    assert re.sub(r"\s+", "", info) in re.sub(r"\s+|\d+:\d\d:\d\d", "", shown), shown
