"""Every table of ``aicfl`` at 80 and 60 columns and piped: ids and numbers whole, long text wrapped
whole, no line past the width, and the columns that did not fit named under the table."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from server.cli.audit import FEATURE_COLUMNS, feature_rows
from server.cli.devices import DEVICE_COLUMNS, device_row
from server.cli.jobs import JOB_COLUMNS, job_row
from server.cli.models import VERSION_COLUMNS, version_row
from server.cli.rounds import DEVICE_COLUMNS as ROUND_DEVICE_COLUMNS
from server.cli.rounds import ROUND_COLUMNS, round_row
from server.cli.rounds import device_row as round_device_row
from server.tables import TEXT_MIN, Column, border_width, fit_columns, print_table

WITHDREW = "withdrew: in stage 'masked_input': metric 'loss' must be a finite number"
METRICS = {"auc": 0.93121, "accuracy": 0.88112, "loss": 0.31213, "examples": 500}
FED = {"auc": 0.9104, "accuracy": 0.8702, "loss": 0.3344, "examples": 1200}
NOW = 1_764_000_000.0


def _round(number: int, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "number": number,
        "kind": "train",
        "status": "completed",
        "stage": "done",
        "participants": 12,
        "dropped": 0,
        "declined": 0,
        "aggregation_seconds": 0.04213,
        "metrics": {"central": METRICS, "federated": FED},
        "reason": None,
        "declines": {},
    }
    return {**r, **kw}


ROUNDS = [
    _round(0, kind="stats", metrics=None, aggregation_seconds=None),
    _round(1),
    _round(
        12345,
        status="abandoned",
        stage="masked_input",
        participants=9,
        dropped=3,
        declined=2,
        metrics=None,
        reason="fewer than 10 devices left in stage 'masked_input'",
        declines={WITHDREW: 2},
    ),
    _round(12346, kind="evaluate", metrics={"federated": FED}, aggregation_seconds=None),
]
ROUND_DEVICES: list[dict[str, Any]] = [
    {"device_id": "dev-3f9a1c2b7d4e", "status": "active", "stage_done": "input", "num_examples": 1834, "reason": None},
    {"device_id": "dev-0b1c2d3e4f5a", "status": "dropped", "stage_done": None, "num_examples": None, "reason": WITHDREW},
]  # fmt: skip
JOBS: list[dict[str, Any]] = [
    {"id": 7, "name": "churn-by-state", "status": "running", "rounds_completed": 3, "rounds": 10,
     "current_version": 3, "created_at": "2026-11-30T22:51:07.123456"},
    {"id": 1024, "name": "a job whose operator gave it a long descriptive name [v2]", "status": "completed",
     "rounds_completed": 100, "rounds": 100, "current_version": 100, "created_at": "2026-11-29T08:00:00"},
]  # fmt: skip
DEVICES: list[dict[str, Any]] = [
    {"id": "dev-3f9a1c2b7d4e", "name": "hospital-north-ward-7-workstation", "online": True,
     "last_seen": NOW - 3, "agent_version": "0.4.1", "peak_rss_mb": 412.37, "revoked_at": None},
    {"id": "dev-0b1c2d3e4f5a", "name": "demo-01", "online": False, "last_seen": None,
     "agent_version": "0.4.1", "peak_rss_mb": None, "revoked_at": "2026-11-30T23:01:40.512345+00:00"},
]  # fmt: skip
VERSIONS: list[dict[str, Any]] = [
    {"version": 0, "parent": None, "round_number": None, "sha256": "ab" * 32, "num_parameters": 1217,
     "metrics": {"central": METRICS}, "provenance": {"source": "pretrain"}},
    {"version": 12, "parent": 11, "round_number": 13, "sha256": "cd" * 32, "num_parameters": 1217,
     "metrics": {"central": METRICS, "federated": FED}, "provenance": {"source": "federated"}},
]  # fmt: skip
REPORT: dict[str, Any] = {
    "importance": {"total_day_minutes": 0.1823, "number_customer_service_calls": 0.0912, "state": 0.0051},
    "shares": {"total_day_minutes": 0.65, "number_customer_service_calls": 0.33, "state": 0.02},
}

TABLES: dict[str, tuple[Sequence[Column], list[list[str]]]] = {
    "rounds list": (ROUND_COLUMNS, [round_row(r) for r in ROUNDS]),
    "rounds show (devices)": (ROUND_DEVICE_COLUMNS, [round_device_row(d) for d in ROUND_DEVICES]),
    "jobs list": (JOB_COLUMNS, [job_row(j) for j in JOBS]),
    "devices list": (DEVICE_COLUMNS, [device_row(d, NOW) for d in DEVICES]),
    "models list": (VERSION_COLUMNS, [version_row(v) for v in VERSIONS]),
    "audit show (features)": (FEATURE_COLUMNS, feature_rows(REPORT)),
}


@dataclass
class Drawn:
    """A table as printed: its headers, its rows (each cell's lines), and the lines under it."""

    headers: list[str]
    rows: list[list[list[str]]]
    after: list[str]


def parse(text: str, columns: Sequence[Column]) -> Drawn:
    """Read back what rich drew. A row of several lines is ruled off from the next; the lines of a
    row after its first leave every short column blank (which no row here does on its first)."""
    wrap = {c.header: c.wrap for c in columns}
    headers: list[str] = []
    rows: list[list[list[str]]] = []
    after: list[str] = []
    new_row = True
    for line in text.splitlines():
        if line.startswith("┃"):
            headers = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            more = all(c == "" for h, c in zip(headers, cells, strict=True) if not wrap[h])
            if new_row or not more:
                rows.append([[c] for c in cells])
            else:
                for cell, part in zip(rows[-1], cells, strict=True):
                    cell.append(part)
            new_row = False
        elif line.startswith(("├", "┡")):
            new_row = True
        elif not line.startswith(("┏", "└")):
            after.append(line)
    return Drawn(headers, rows, after)


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def render(columns: Sequence[Column], rows: list[list[str]], width: int | None) -> str:
    """Print a table into a file, as ``aicfl`` prints it when piped (``width`` None: rich's own choice)."""
    out = Console(file=io.StringIO(), width=width, markup=False)
    print_table(out, columns, rows)
    value = out.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(value, str)
    return value


def assert_readable(columns: Sequence[Column], rows: list[list[str]], text: str, width: int) -> Drawn:
    """The promise of server.tables, checked on what was printed."""
    assert all(cell_len(line) <= width for line in text.splitlines()), text
    assert "…" not in text, text
    drawn = parse(text, columns)
    by_header = {c.header: i for i, c in enumerate(columns)}
    assert set(drawn.headers) <= set(by_header), text
    left_out = [c.header for c in columns if c.header not in drawn.headers]
    # Always shown: every column of priority 0; the others left out, those of lowest priority first.
    assert all(c.priority > 0 for c in columns if c.header in left_out), text
    assert len(drawn.rows) == len(rows), text
    for drawn_row, row in zip(drawn.rows, rows, strict=True):
        for header, cell in zip(drawn.headers, drawn_row, strict=True):
            value = row[by_header[header]]
            if columns[by_header[header]].wrap:
                assert squash(" ".join(cell)) == squash(value), (header, cell, value)
            else:
                assert [line for line in cell if line] == ([value] if value else []), (header, cell, value)
    if left_out:
        assert len(drawn.after) >= 1 and drawn.after[0].startswith("not shown: "), text
        note = squash(" ".join(drawn.after))
        assert squash(", ".join(left_out)) in note and "--json" in note, text
    else:
        assert drawn.after == [], text
    return drawn


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("width", [80, 60])
def test_every_table_is_whole_and_within_the_width(name: str, width: int) -> None:
    columns, rows = TABLES[name]
    assert_readable(columns, rows, render(columns, rows, width), width)


@pytest.mark.parametrize("name", list(TABLES))
def test_every_table_piped_fits_rich_s_80_columns(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    columns, rows = TABLES[name]
    text = render(columns, rows, None)
    assert_readable(columns, rows, text, 80)


def test_every_table_at_a_wide_terminal_shows_every_column() -> None:
    for columns, rows in TABLES.values():
        drawn = assert_readable(columns, rows, render(columns, rows, 250), 250)
        assert drawn.headers == [c.header for c in columns] and drawn.after == []
    # The metrics take one line each; the longest reason has the rest of the width.
    drawn = parse(render(ROUND_COLUMNS, [round_row(r) for r in ROUNDS], 250), ROUND_COLUMNS)
    assert drawn.rows[1][8] == ["auc=0.9312 accuracy=0.8811 loss=0.3121"]
    assert len(drawn.rows[2][10]) == 2


def test_rounds_list_at_80_columns_keeps_the_counts_the_metrics_and_the_whole_reason() -> None:
    text = render(ROUND_COLUMNS, [round_row(r) for r in ROUNDS], 80)
    drawn = parse(text, ROUND_COLUMNS)
    assert drawn.headers == ["round", "kind", "status", "devices", "central", "reason"], text
    rows = [{h: " ".join(c).strip() for h, c in zip(drawn.headers, row, strict=True)} for row in drawn.rows]
    assert [r["round"] for r in rows] == ["0", "1", "12345", "12346"]
    assert [r["status"] for r in rows] == ["completed", "completed", "abandoned", "completed"]
    assert [r["devices"] for r in rows] == ["12", "12", "9", "12"]
    assert squash(rows[1]["central"]) == squash("auc=0.9312 accuracy=0.8811 loss=0.3121")
    assert squash(rows[2]["reason"]) == squash(
        f"fewer than 10 devices left in stage 'masked_input'; declined (2): {WITHDREW}"
    )
    assert drawn.after == ["not shown: stage, dropped, declined, agg s, federated, ε; --json shows all"]


def test_a_wide_terminal_honours_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = render(ROUND_COLUMNS, [round_row(r) for r in ROUNDS], None)
    assert parse(text, ROUND_COLUMNS).headers == [c.header for c in ROUND_COLUMNS]


# -- the fitting itself, on small made-up columns ------------------------------------------------


def test_short_columns_are_as_wide_as_their_widest_cell_or_header() -> None:
    columns = [Column("id"), Column("status")]
    assert fit_columns(columns, [["123456789", "ok"]], 80) == [9, 6]


def test_text_columns_share_the_room_left_and_stop_at_one_line_a_cell() -> None:
    columns = [Column("id"), Column("a", wrap=True), Column("b", wrap=True)]
    rows = [["1", "x" * 10, "word " * 20]]
    widths = fit_columns(columns, rows, 60)
    assert widths[0] == 2 and widths[1] == 10  # "a" reached one line
    assert sum(w or 0 for w in widths) + border_width(3) == 60


def test_the_lowest_priority_columns_are_left_out_first_and_priority_0_never() -> None:
    columns = [
        Column("id"),
        Column("often", priority=1),
        Column("rarely", priority=9),
        Column("why", wrap=True),
    ]
    rows = [["1", "x" * 20, "y" * 20, "a long reason " * 5]]
    widths = fit_columns(columns, rows, 60)
    assert widths[1] == 20 and widths[2] is None and (widths[3] or 0) >= TEXT_MIN
    tiny = fit_columns(columns, rows, 10)
    assert tiny[0] == 2 and tiny[1] is None and tiny[2] is None and tiny[3] is not None


def test_a_word_longer_than_its_column_is_folded_not_cut() -> None:
    path = "/var/lib/aicfl/devices/dev-3f9a1c2b7d4e/home/data/train-part-0001.parquet"
    columns = [Column("id"), Column("reason", wrap=True)]
    text = render(columns, [["1", f"cannot read {path}"]], 40)
    assert "…" not in text and all(cell_len(line) <= 40 for line in text.splitlines())
    (row,) = parse(text, columns).rows
    assert squash(" ".join(row[1])) == squash(f"cannot read {path}")
