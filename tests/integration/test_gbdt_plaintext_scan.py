"""A secure gbdt job leaves no device's histogram, cell counts or rows anywhere the coordinator keeps.

The job (docs/gbdt.md) runs through ``aicfl simulate``'s steps: the real engine on SQLite with its
blob store and the agent's own device code, every round (statistics, bins, one per tree level) under
SecAgg+. A spy on the device's ``_tree_input`` (it calls through) records each device's plaintext
vector of every tree round: its cell counts in the binning round, its encoded gradient and hessian
histogram in each level round. A spy on ``coordinator.boosting.finish`` (it calls through too) copies
everything the coordinator holds at the moment it has unmasked a tree round's sum, before the round's
stored vectors are deleted (its masked sum; in a plaintext round, each device's vector): every row of
every table, read in the finishing transaction, and every blob file; and again once the round's trees
are saved. Those copies, the store at the end and
the log are scanned for each device's vectors in every form it has them (uint64, int64, the decoded
float histogram, as numbers in text, base64 or hex) and for its raw and preprocessed rows.

That the scan can see: the same scan finds, in the secure job, what the coordinator keeps of the
sums (each level's node totals, in the job's state blob), and, in the same job with ``secure =
false``, every device's own vectors (the coordinator keeps a checked plaintext vector until its
round ends).
"""

from __future__ import annotations

import json
import logging
import re
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from coordinator import boosting
from coordinator.engine import Federation
from coordinator.models import Device, Job, Round
from server.simulate import scratch_federation
from server.simulation import whole_job
from server.simulation.data import prepare
from server.simulation.devices import device_code
from server.simulation.splits import parse_split
from server.simulation.whole_job import SimulationOptions, simulation_spec
from shared.gbdt import decode
from shared.gbdt.histograms import SCALE
from shared.gbdt.rounds import BoostSetup, boost_setup
from shared.jobspec import JobSpec, validate_spec
from shared.signing import b64e
from shared.tabular import Preprocessor
from tests.integration.test_secure_engine import _cell, _expanded

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "churn_gbdt.toml"
WINDOW_VALUES = 8  # 64 bytes of uint64: a needle
WINDOWS = 4  # needles per vector and form


def gbdt_spec(secure: bool) -> JobSpec:
    """examples/churn_gbdt.toml with small trees; every row trains (no holdout), so every row is in a sum."""
    d = tomllib.loads(EXAMPLE.read_text())
    d["gbdt"].update(max_depth=3, bins=16)
    d["evaluation"] = {}
    d["audit"] = {"enabled": False}  # not what this test is about
    d["training"] = {"holdout": 0.0}
    d["secure"] = secure
    return validate_spec(d)


@dataclass
class Seen:
    """What the devices sent and what the coordinator held, as the spies recorded them."""

    vectors: list[tuple[str, str, int, np.ndarray]] = field(default_factory=list)  # device, kind, round, vec
    totals: dict[int, np.ndarray] = field(default_factory=dict)  # round id: the unmasked sum
    setups: dict[int, BoostSetup] = field(default_factory=dict)  # round id: the job's boosting setup
    slots: dict[int, int] = field(default_factory=dict)  # level round id: its open slots
    saved: list[int] = field(default_factory=list)  # level rounds that left the round's growth saved
    masked_sums: int = 0  # secure rounds whose stored masked sum the copies hold
    places: list[tuple[str, bytes]] = field(default_factory=list)  # (where, bytes) the coordinator held


def _tables(s: Session) -> list[tuple[str, bytes]]:
    """Every row of every table as the finishing transaction sees it (its own writes included)."""
    out = []
    for table in inspect(s.connection()).get_table_names():
        for row in s.execute(text(f'SELECT * FROM "{table}"')):
            out.append((f"table {table}", b"\x1f".join(_cell(v) for v in row)))
    return out


def _blobs(fed: Federation) -> list[tuple[str, bytes]]:
    root = Path(fed.blobs.root)  # type: ignore[attr-defined]
    return [(f"blob {p.relative_to(root)}", p.read_bytes()) for p in root.rglob("*") if p.is_file()]


@contextmanager
def secure_job(
    monkeypatch: pytest.MonkeyPatch, secure: bool
) -> Iterator[tuple[Federation, dict[str, Any], Seen, list[pd.DataFrame], JobSpec]]:
    """Run the job with both spies on; yields the engine (still open), the summary, what was seen, the
    devices' raw rows (by enrolment order) and the job as simulated."""
    seen = Seen()
    worker = device_code().worker
    honest_input = worker._tree_input

    def tree_input(self: Any, task: Any) -> tuple[np.ndarray, int]:
        vec, n = honest_input(self, task)
        seen.vectors.append((self.device_id, task.kind, task.round_id, vec.copy()))
        return vec, n

    honest_finish = boosting.finish

    def finish(ctx: Any, s: Session, job: Job, spec: JobSpec, r: Round, total: Any, summed: Any) -> None:
        assert job.preprocess is not None  # fixed by the statistics round
        seen.totals[r.id] = np.array(total, dtype=np.uint64)
        seen.setups[r.id] = boost_setup(spec, job.preprocess)
        if r.kind == "level":
            seen.slots[r.id] = len(boosting._state(ctx, job.strategy_state_sha256)["growth"]["open"])
        held = _tables(s) + _blobs(ctx)
        if r.secure and r.secagg:  # the masked sum is stored when the masked-input stage ends (SQLite)
            name = r.secagg["masked_sum"]["blob"]
            seen.masked_sums += any(name in where for where, _ in held)
        seen.places += [(f"{w} (round {r.id} unmasked)", b) for w, b in held]
        honest_finish(ctx, s, job, spec, r, total, summed)
        if r.kind == "level" and r.model_version_out is None:
            seen.saved.append(r.id)  # the level's nodes, with their totals, are in the saved growth
        seen.places += [(f"{w} (round {r.id} finished)", b) for w, b in _blobs(ctx)]

    monkeypatch.setattr(worker, "_tree_input", tree_input)
    monkeypatch.setattr(boosting, "finish", finish)
    opts = SimulationOptions(devices=4, split=parse_split("group"), rounds=2, seed=3, ceiling=False)
    spec = simulation_spec(gbdt_spec(secure), opts)
    assert spec.data is not None
    data = prepare(opts.data, spec.data, opts.split, opts.devices, opts.seed)[0]
    with scratch_federation("aicfl-test-gbdt-scan-", eligibility_window=1e12) as (fed, clock):
        t = time.perf_counter()
        summary = whole_job._run(fed, clock, spec, opts, data, t, t)
        yield fed, summary, seen, data.parts, spec


# -- the needles ----------------------------------------------------------------------------------


def _own_windows(vec: np.ndarray, total: np.ndarray) -> list[slice]:
    """Up to WINDOWS spans of 8 values where the device's vector has at least 3 non-zero values and
    differs from the sum: what only this device's vector holds (where it alone has rows, its values
    are the sum's, which says nothing about what it sent)."""
    spans = []
    for start in range(0, vec.size - WINDOW_VALUES + 1, WINDOW_VALUES):
        part = slice(start, start + WINDOW_VALUES)
        if np.count_nonzero(vec[part]) >= 3 and not np.array_equal(vec[part], total[part]):
            spans.append(part)
    assert spans, "a device's vector that is the sum's everywhere: give the job more devices"
    picks = np.linspace(0, len(spans) - 1, min(WINDOWS, len(spans))).round().astype(int)
    return [spans[i] for i in sorted(set(picks))]


def device_needles(seen: Seen) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """Each device's vector of each tree round, in every form it has it: byte windows and numbers as text.

    A level vector is the histogram's gradients, then its hessians (int64 fixed point, ``SCALE``
    steps per unit, in uint64), then its rows per slot; ``decode`` divides by ``SCALE`` in that
    order, so the float forms line up with the vector. A binning vector holds counts.
    """
    binary: list[tuple[str, bytes]] = []
    texts: list[tuple[str, str]] = []
    for device, kind, round_id, vec in seen.vectors:
        label = f"{device[:8]} {kind} round {round_id}"
        ints = vec.view(np.int64)
        scaled = ints / SCALE if kind == "level" else ints.astype(np.float64)
        forms = {
            "uint64": vec.astype("<u8"),
            "int64": ints.astype("<i8"),
            "float64": scaled.astype("<f8"),
            "float32": scaled.astype("<f4"),
        }
        if kind == "bins":
            forms["uint32"] = vec.astype("<u4")
        for span in _own_windows(vec, seen.totals[round_id]):
            binary += [(f"{label} {name}", arr[span].tobytes()) for name, arr in forms.items()]
            texts.append((f"{label} integers as text", ",".join(str(int(v)) for v in ints[span])))
            if kind == "level":
                texts.append((f"{label} floats as text", ",".join(repr(float(v)) for v in scaled[span])))
    return binary, texts


def row_needles(
    fed: Federation, parts: list[pd.DataFrame], spec: JobSpec, job_id: int
) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """Three rows of each device, raw (their numeric values as text, a CSV line) and preprocessed
    (float32 and float64 bytes, as the device's trees see them)."""
    assert spec.data is not None
    numeric = [f.name for f in spec.data.features if f.type == "numeric"]
    with fed.read() as s:
        names = {d: n for d, n in s.execute(select(Device.id, Device.name))}
        job = s.get(Job, job_id)
        assert job is not None and job.preprocess is not None
        pre = Preprocessor.from_dict(job.preprocess)
    binary: list[tuple[str, bytes]] = []
    texts: list[tuple[str, str]] = []
    for device, name in names.items():
        frame = parts[int(name.split("-")[1])]  # enrolled as sim-00000, sim-00001, ... in order
        x, _ = pre.transform(frame)
        for i in (0, len(frame) // 2, len(frame) - 1):
            label = f"{device[:8]} row {i}"
            row = frame.iloc[i]
            texts.append((f"{label} numeric text", ",".join(str(row[c]) for c in numeric)))
            texts.append((f"{label} csv line", frame.iloc[[i]].to_csv(index=False, header=False).strip()))
            binary.append((f"{label} float32", x[i].astype("<f4").tobytes()))
            binary.append((f"{label} float64", x[i].astype("<f8").tobytes()))
    return binary, texts


def sum_needles(seen: Seen) -> list[tuple[str, str]]:
    """What the coordinator keeps of a level's sum: every open node's gradient and hessian totals, in
    the growth it saves in the job's state blob, as JSON writes the floats it computes from the
    unmasked sum (a level that ends its boosting round leaves leaves in a version instead)."""
    out = []
    for round_id in seen.saved:
        slots = seen.slots[round_id]
        setup = seen.setups[round_id]
        grad, hess = decode(seen.totals[round_id], slots, setup.features, setup.bins + 1).node_sums()
        for slot in range(slots):
            out.append((f"round {round_id} slot {slot} gradient total", f'"grad":{float(grad[slot])!r}'))
            out.append((f"round {round_id} slot {slot} hessian total", f'"hess":{float(hess[slot])!r}'))
    return out


# -- the scan -------------------------------------------------------------------------------------


def scan(
    places: list[tuple[str, bytes]], binary: list[tuple[str, bytes]], texts: list[tuple[str, str]]
) -> list[str]:
    """Which needles occur where: bytes in the raw place and in whatever its base64 or hex tokens
    decode to, text with all white space removed from both."""
    hits: set[str] = set()
    for where, raw in places:
        for haystack in _expanded(raw):
            hits.update(f"{label} in {where}" for label, needle in binary if needle in haystack)
        compact = re.sub(rb"\s+", b"", raw)
        hits.update(
            f"{label} in {where}" for label, needle in texts if re.sub(r"\s+", "", needle).encode() in compact
        )
    return sorted(hits)


def stored(fed: Federation) -> list[tuple[str, bytes]]:
    """Everything the coordinator keeps once the job is over: every table's rows, every blob file."""
    with fed.read() as s:
        return [(f"{w} (end)", b) for w, b in _tables(s)] + [(f"{w} (end)", b) for w, b in _blobs(fed)]


def test_secure_gbdt_job_keeps_no_devices_histogram_counts_or_rows(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with secure_job(monkeypatch, secure=True) as (fed, summary, seen, parts, spec):
        assert (summary["status"], summary["final_version"]) == ("completed", 2)
        kinds = {kind for _, kind, _, _ in seen.vectors}
        assert kinds == {"bins", "level"} and len(seen.saved) == 4  # two boosting rounds of depth 3
        assert {d for d, _, _, _ in seen.vectors} and len({d for d, _, _, _ in seen.vectors}) == 4
        places = seen.places + stored(fed) + [("log", caplog.text.encode())]
        dev_binary, dev_texts = device_needles(seen)
        row_binary, row_texts = row_needles(fed, parts, spec, summary["job_id"])

        assert scan(places, dev_binary, dev_texts) == []
        assert scan(places, row_binary, row_texts) == []
        assert seen.masked_sums == len(seen.totals)  # every tree round secure, its stored masked sum read
        # The scan sees: what the coordinator keeps of the sums is there, found the same way.
        sums = sum_needles(seen)
        found = scan(places, [], sums)
        missing = {label for label, _ in sums} - {h.split(" in ")[0] for h in found}
        assert not missing, sorted(missing)[:5]


def test_the_scan_finds_every_devices_vectors_in_a_plaintext_gbdt_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Positive control: with ``secure = false`` the coordinator keeps each device's checked vector
    while its round runs, and the same needles and scan find every one of them."""
    with secure_job(monkeypatch, secure=False) as (fed, summary, seen, parts, spec):
        assert summary["status"] == "completed"
        places = seen.places + stored(fed)
        binary, texts = device_needles(seen)
        found = {h.split(" in ")[0] for h in scan(places, binary, [])}
        sent = {f"{device[:8]} {kind} round {round_id} uint64" for device, kind, round_id, _ in seen.vectors}
        assert sent <= found, sorted(sent - found)[:5]
        # ...and a device's rows, had the coordinator kept them: as a JSON list, as base64 of float32.
        row_binary, row_texts = row_needles(fed, parts, spec, summary["job_id"])
        assert scan(places, row_binary, row_texts) == []
        label, values = row_texts[0]
        leak = json.dumps({"row": json.loads(f"[{values}]"), "b64": b64e(row_binary[0][1])})
        hits = scan([("leak", leak.encode())], row_binary, row_texts)
        assert f"{label} in leak" in hits and f"{row_binary[0][0]} in leak" in hits, hits
