"""How the operator's commands print a value, a metric line, JSON and an error (server/console.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from server.console import emit_json, fmt, metrics_text, print_error


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
