"""The coordinator's side of a gbdt job's rounds: the binning round, the tree levels, the versions they make.

A ``[model] zoo = "gbdt"`` job (docs/gbdt.md) runs, after its statistics round, one ``bins`` round
(the summed cell counts give the bin edges and ``base_score``: version 0, no trees yet) and then,
per boosting round, one ``level`` round per tree level: the devices' histograms of the open nodes,
summed under SecAgg+ like a training update (or, with ``secure = false``, checked one by one and
summed in the clear). The coordinator grows the level from the sum (``shared.gbdt.grow_level``);
when a boosting round's trees are complete it registers them as the next signed version, with its
central metrics; each version, 0 included, queues its SHAP audit (``coordinator/audits.py``).
Between levels the round's trees so far live in the job's state blob
(``Job.strategy_state_sha256``, which holds a strategy's state in a training job): an abandoned
level round leaves it as it was, and the next level round grows the same level again.

What is derived per round (its vector's length, what its devices are told) is read once per
process and kept: a level round's input is fixed when it opens.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from coordinator import apps, audits, registry, secure
from coordinator.context import EngineContext
from coordinator.models import Job, Round, RoundMessage
from shared.gbdt import HistogramError, check_histogram, decode, finish_round, grow_level, start_round
from shared.gbdt.model import BoostedModel, from_bytes, growth_from_json, growth_to_json, to_vector
from shared.gbdt.rounds import BoostSetup, boost_setup, read_bins
from shared.jobspec import JobSpec

_ROWS = select(RoundMessage.device_id, RoundMessage.payload).where(
    RoundMessage.round_id == bindparam("round"), RoundMessage.stage == "configure"
)
_JOB_STATE = select(Job.strategy_state_sha256).where(Job.id == bindparam("job"))
_LIMIT = 4096


@dataclass
class _Known:
    """What one engine has derived and keeps: ids repeat across databases, so each engine has its own."""

    setups: dict[int, BoostSetup] = field(default_factory=dict)  # job id -> its boosting setup
    inputs: dict[int, tuple[int, dict[str, Any] | None]] = field(default_factory=dict)  # round id -> input


_KNOWN: weakref.WeakKeyDictionary[EngineContext, _Known] = weakref.WeakKeyDictionary()


def _known(ctx: EngineContext) -> _Known:
    known = _KNOWN.get(ctx)
    if known is None:
        known = _KNOWN[ctx] = _Known()
    return known


def next_kind(job: Job, spec: JobSpec) -> str | None:
    """The kind of a gbdt job's next round once its preprocessing is fixed; None when its trees are grown."""
    if job.current_version is None:
        return "bins"
    if job.rounds_completed < spec.rounds:
        return "level"
    return None


def _setup(ctx: EngineContext, s: Session | secure.Db, job_id: int) -> BoostSetup:
    setups = _known(ctx).setups
    hit = setups.get(job_id)
    if hit is None:
        spec_json, preprocess = ctx.job_spec(s, job_id, True)
        if preprocess is None:
            raise ValueError(f"job {job_id}'s preprocessing is not fixed yet")
        if len(setups) >= _LIMIT:
            setups.clear()
        hit = setups[job_id] = boost_setup(JobSpec.model_validate(spec_json), preprocess)
    return hit


def _state(ctx: EngineContext, sha: str | None) -> dict[str, Any]:
    return {} if not sha else dict(json.loads(ctx.blobs.get(sha)))


def _input(
    ctx: EngineContext, s: Session | secure.Db, r: secure.RoundInfo
) -> tuple[int, dict[str, Any] | None]:
    inputs = _known(ctx).inputs
    hit = inputs.get(r.id)
    if hit is None:
        setup = _setup(ctx, s, r.job_id)
        if r.kind == "bins":
            hit = (setup.bins_size, None)
        else:
            sha = secure.run(s, _JOB_STATE, job=r.job_id).scalar()
            growth = _state(ctx, sha).get("growth")
            if growth is None:
                raise ValueError(f"job {r.job_id} has no boosting round in progress")
            spec = ctx.spec(secure.orm(s), r.job_id)
            info = {"growth": growth, "devices": spec.cohort.target}
            hit = (setup.level_size(len(growth["open"])), info)
        if len(inputs) >= _LIMIT:
            inputs.clear()
        inputs[r.id] = hit
    return hit


def numel(ctx: EngineContext, s: Session | secure.Db, r: secure.RoundInfo) -> int:
    """The length of a tree round's vector (uint64): the binning vector, or the level's histogram."""
    return _input(ctx, s, r)[0]


def task_info(ctx: EngineContext, s: Session | secure.Db, r: secure.RoundInfo) -> dict[str, Any] | None:
    """What a level round's task tells each device: the round's trees so far and the cohort size."""
    return _input(ctx, s, r)[1] if r.kind == "level" else None


def declared_rows(s: Session | secure.Db, round_id: int, devices: list[str] | None = None) -> dict[str, int]:
    """The rows each device said it holds when it accepted the round."""
    out = {}
    for device, payload in secure.run(s, _ROWS, round=round_id):
        if devices is None or device in devices:
            out[str(device)] = int((payload or {}).get("rows", 0))
    return out


def check_plain(
    ctx: EngineContext, s: Session | secure.Db, r: secure.RoundInfo, device: str, vec: np.ndarray
) -> str | None:
    """Why one device's plaintext tree vector cannot be summed (``secure = false``), or None.

    A level histogram passes ``shared.gbdt.check_histogram`` against the rows the device declared;
    cell counts must not be negative nor exceed those rows.
    """
    setup = _setup(ctx, s, r.job_id)
    rows = declared_rows(s, r.id, [device]).get(device, 0)
    ints = np.asarray(vec, dtype=np.uint64).view(np.int64)
    if r.kind == "bins":
        cells = ints[: setup.features * setup.cells].reshape(setup.features, setup.cells)
        if (ints < 0).any() and not setup.objective.startswith("reg:"):
            return "negative_counts: a cell or label count is negative"
        if (cells < 0).any() or (cells.sum(axis=1) > rows).any() or int(ints[-1]) != rows:
            return f"counts_inconsistent: the cell counts or row count disagree with the {rows} rows declared"
        return None
    info = _input(ctx, s, r)[1] or {}
    slots = len(info["growth"]["open"])
    try:
        hist = decode(np.asarray(vec, dtype=np.uint64), slots, setup.features, setup.bins + 1)
        check_histogram(
            hist,
            n_slots=slots,
            features=setup.features,
            width=setup.bins + 1,
            objective=setup.objective,
            rows=rows,
            trees=setup.trees,
        )
    except HistogramError as err:
        return f"{err.reason}: {err.detail}"
    return None


def finish(
    ctx: EngineContext, s: Session, job: Job, spec: JobSpec, r: Round, total: np.ndarray, summed: list[str]
) -> None:
    """Complete a tree round from the (unmasked) sum of the ``summed`` devices' vectors.

    ``ValueError`` (a ``HistogramError`` among them) when the sum cannot be used: the round is
    abandoned and the job's state stays as it was.
    """
    setup = _setup(ctx, s, job.id)
    rows = sum(declared_rows(s, r.id, summed).values())
    if r.kind == "bins":
        _finish_bins(ctx, s, job, spec, r, setup, total, rows, len(summed))
    else:
        _finish_level(ctx, s, job, spec, r, setup, total, rows, len(summed))


def _save(ctx: EngineContext, job: Job, growth: Any) -> None:
    body = json.dumps({"growth": growth_to_json(growth)}, separators=(",", ":")).encode()
    job.strategy_state_sha256 = ctx.blobs.put(body)


def _finish_bins(
    ctx: EngineContext,
    s: Session,
    job: Job,
    spec: JobSpec,
    r: Round,
    setup: BoostSetup,
    total: np.ndarray,
    rows: int,
    devices: int,
) -> None:
    edges, base_score, summed_rows = read_bins(setup, total)
    if summed_rows > rows:
        raise ValueError(f"the binning sum counts {summed_rows} rows; its devices declared {rows}")
    model = setup.empty(edges, base_score)
    job_ctx = apps.context(spec, job.preprocess)
    arch = apps.describe(apps.app_for(spec), job_ctx)
    vector = to_vector(model)
    central = ctx.central(job, spec, arch, vector)
    row = ctx.register(
        s,
        job,
        vector,
        arch,
        version=0,
        round_number=r.number,
        metrics={"central": central} if central else {},
        provenance={"source": "binned", "round": r.number, "participants": devices, "rows": summed_rows},
    )
    job.current_version = row.version
    audits.enqueue(s, job, row.version, ctx.clock())
    _save(ctx, job, start_round(setup.trees))
    r.model_version_out = row.version
    r.metrics = {
        "secure": r.secure,
        "rows": summed_rows,
        "edges": [int(e.size) for e in edges.edges],
        "base_score": list(base_score),
        **({"central": central} if central else {}),
    }


def _finish_level(
    ctx: EngineContext,
    s: Session,
    job: Job,
    spec: JobSpec,
    r: Round,
    setup: BoostSetup,
    total: np.ndarray,
    rows: int,
    devices: int,
) -> None:
    growth = growth_from_json(_state(ctx, job.strategy_state_sha256)["growth"])
    slots = len(growth.open)
    hist = decode(np.asarray(total, dtype=np.uint64), slots, setup.features, setup.bins + 1)
    check_histogram(
        hist,
        n_slots=slots,
        features=setup.features,
        width=setup.bins + 1,
        objective=setup.objective,
        rows=rows,
        trees=setup.trees,
        devices=devices,
    )
    current_row = registry.get_version(s, job.id, r.model_version_in)
    header, current = ctx.vector(job.id, current_row)
    boosted = from_bytes(current)
    grown = grow_level(growth, hist, boosted.edges, setup.tree)
    metrics: dict[str, Any] = {
        "secure": r.secure,
        "boosting_round": job.rounds_completed + 1,
        "depth": growth.depth,
        "slots": slots,
        "rows": int(hist.rows.sum()),
        "examples": rows,
    }
    if not grown.done:
        _save(ctx, job, grown)
        r.metrics = metrics
        return
    from shared.gbdt import with_round

    model = BoostedModel(boosted.edges, with_round(boosted.ensemble, finish_round(grown)))
    vector = to_vector(model)
    central = ctx.central(job, spec, header["arch"], vector)
    row = ctx.register(
        s,
        job,
        vector,
        header["arch"],
        version=current_row.version + 1,
        parent=current_row.version,
        round_number=r.number,
        metrics={"central": central} if central else {},
        provenance={
            "source": "federated",
            "round": r.number,
            "boosting_round": job.rounds_completed + 1,
            "participants": devices,
            "examples": rows,
        },
    )
    job.current_version = row.version
    audits.enqueue(s, job, row.version, ctx.clock())
    job.rounds_completed += 1
    _save(ctx, job, start_round(setup.trees))
    r.model_version_out = row.version
    if central:
        metrics["central"] = central
    r.metrics = metrics
