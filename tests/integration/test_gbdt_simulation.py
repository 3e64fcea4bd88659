"""A gbdt job (docs/gbdt.md) through ``aicfl simulate``: the real engine and the agent's own device code.

What is proved: under SecAgg+ without dropouts the engine grows exactly the ensemble that
``shared.gbdt.simulation.train_in_memory`` grows on the devices' training rows and the same grid;
with dropouts in every round each level is grown from the sum of exactly the devices whose
vectors the coordinator summed (replayed here from the rounds' records), and the job still ends
after the requested boosting rounds; the final version exports as an XGBoost JSON model that
``xgboost.Booster`` loads and predicts with as aicfl does; a device that sends a histogram no
honest device could send is excluded from that level with the reason recorded, and the level
completes without it.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from coordinator import registry
from coordinator.engine import Federation
from coordinator.models import Device, Job, Participant, Round
from server.routers.jobs import export_version
from server.simulate import scratch_federation
from server.simulation import whole_job
from server.simulation.data import SimulationData, prepare
from server.simulation.devices import device_code
from server.simulation.splits import parse_split
from server.simulation.whole_job import SimulationOptions, simulation_spec
from shared.apps import DeviceContext, JobContext
from shared.gbdt import (
    BoostConfig,
    decode,
    finish_round,
    grow_level,
    predict,
    predict_margin,
    start_round,
    train_in_memory,
    with_round,
)
from shared.gbdt.histograms import SCALE
from shared.gbdt.model import BoostedModel, from_bytes
from shared.gbdt.rounds import BoostSetup, bins_input, boost_setup, codes_of, level_input, read_bins
from shared.gbdt.simulation import secure_sum
from shared.jobspec import JobSpec, validate_spec
from shared.tabular import Preprocessor

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "churn_gbdt.toml"


def gbdt_spec(**top: Any) -> JobSpec:
    """examples/churn_gbdt.toml, with small trees (depth 3, 32 bins) and ``top`` (top-level keys)."""
    d = tomllib.loads(EXAMPLE.read_text())
    d["gbdt"].update(max_depth=3, bins=32)
    d["evaluation"] = {}
    d.update(top)
    return validate_spec(d)


@contextmanager
def simulated(
    spec: JobSpec, opts: SimulationOptions
) -> Iterator[tuple[Federation, dict[str, Any], SimulationData, JobSpec]]:
    """``simulate_job``'s steps, keeping the engine open for the test to read its records."""
    spec = simulation_spec(spec, opts)
    assert spec.data is not None
    data = prepare(opts.data, spec.data, opts.split, opts.devices, opts.seed)[0]
    with scratch_federation("aicfl-test-gbdt-", eligibility_window=1e12) as (fed, clock):
        t = time.perf_counter()
        summary = whole_job._run(fed, clock, spec, opts, data, t, t)
        yield fed, summary, data, spec


def training_rows(
    fed: Federation, spec: JobSpec, data: SimulationData, preprocess: dict[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each device's training rows as its worker sees them (its holdout split off, preprocessed)."""
    pre = Preprocessor.from_dict(preprocess)
    job = JobContext(spec, preprocess)
    out = {}
    with fed.read() as s:
        devices = s.execute(select(Device.id, Device.name)).all()
    for device_id, name in devices:
        frame = data.parts[int(name.split("-")[1])]  # enrolled as sim-00000, sim-00001, ... in order
        train, _ = DeviceContext(job, device_id, device_id).holdout_split(len(frame))
        out[device_id] = pre.transform(frame.iloc[train])
    return out


def job_of(
    fed: Federation, job_id: int
) -> tuple[dict[str, Any], BoostedModel, list[Round], dict[int, list[str]]]:
    """The job's preprocessing, its final model, its tree rounds and who was summed in each."""
    with fed.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.preprocess is not None
        final = from_bytes(fed.vector(job_id, registry.get_version(s, job_id))[1])
        rounds = list(
            s.scalars(
                select(Round)
                .where(Round.job_id == job_id, Round.kind.in_(("bins", "level")))
                .order_by(Round.number)
            )
        )
        summed = {
            r.id: sorted(
                s.scalars(
                    select(Participant.device_id).where(
                        Participant.round_id == r.id,
                        Participant.status == "active",
                        Participant.stage_done.in_(("masked_input", "unmask", "input")),
                    )
                )
            )
            for r in rounds
        }
        return job.preprocess, final, rounds, summed


def assert_same_ensemble(a: BoostedModel, b: BoostedModel, x: np.ndarray) -> None:
    assert a.ensemble.base_score == pytest.approx(b.ensemble.base_score, abs=1e-9)
    assert len(a.ensemble.trees) == len(b.ensemble.trees)
    for ta, tb in zip(a.ensemble.trees, b.ensemble.trees, strict=True):
        for name in ("left", "right", "feature", "split_bin", "default_left"):
            assert np.array_equal(getattr(ta, name), getattr(tb, name)), name
        np.testing.assert_allclose(ta.threshold, tb.threshold, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        predict_margin(a.ensemble, x), predict_margin(b.ensemble, x), rtol=0, atol=1e-5
    )


def test_secure_gbdt_job_grows_the_in_memory_protocols_ensemble_and_exports_to_xgboost() -> None:
    opts = SimulationOptions(devices=6, split=parse_split("group"), rounds=3, seed=1, ceiling=False)
    with simulated(gbdt_spec(), opts) as (fed, summary, data, spec):
        preprocess, final, rounds, _ = job_of(fed, summary["job_id"])
        rows = training_rows(fed, spec, data, preprocess)
        setup = boost_setup(spec, preprocess)
        config = BoostConfig(objective=setup.objective, rounds=3, bins=setup.bins, tree=setup.tree)
        expected, trace = train_in_memory(list(rows.values()), config, grid=setup.grid())
        exported, media, _ = export_version(fed, summary["job_id"], summary["final_version"], "xgboost")

    pre = Preprocessor.from_dict(preprocess)
    x_test, _ = pre.transform(data.test)
    assert (summary["status"], summary["final_version"], summary["secure"]) == ("completed", 3, True)
    assert [r.status for r in rounds] == ["completed"] * trace.secure_sums  # one secure sum per round
    assert all(r.secure for r in rounds)
    assert [e.tolist() for e in final.edges.edges] == [e.tolist() for e in trace.edges.edges]
    assert_same_ensemble(final, BoostedModel(trace.edges, expected), x_test)
    assert len(summary["rounds"]) == 3 and all(r["central"]["auc"] > 0.8 for r in summary["rounds"])
    assert summary["final"]["auc"] == pytest.approx(summary["rounds"][-1]["central"]["auc"])

    xgboost = pytest.importorskip("xgboost")
    assert media == "application/json"
    booster = xgboost.Booster()
    booster.load_model(bytearray(exported))
    np.testing.assert_allclose(
        booster.predict(xgboost.DMatrix(x_test)), predict(final.ensemble, x_test), rtol=0, atol=1e-6
    )


def replay(
    setup: BoostSetup,
    rounds: list[Round],
    summed: dict[int, list[str]],
    rows: dict[str, tuple[np.ndarray, np.ndarray]],
    devices: int,
) -> BoostedModel:
    """The protocol over exactly the devices each completed round summed (abandoned rounds change nothing)."""
    done = [r for r in rounds if r.status == "completed"]
    assert done[0].kind == "bins"
    edges, base, _ = read_bins(setup, secure_sum([bins_input(setup, *rows[d]) for d in summed[done[0].id]]))
    model = setup.empty(edges, base)
    growth = start_round(setup.trees)
    for r in done[1:]:
        vectors = [
            level_input(setup, model, growth, codes_of(model, rows[d][0]), rows[d][1], devices)
            for d in summed[r.id]
        ]
        hist = decode(secure_sum(vectors), len(growth.open), setup.features, setup.bins + 1)
        growth = grow_level(growth, hist, model.edges, setup.tree)
        if growth.done:
            model = BoostedModel(model.edges, with_round(model.ensemble, finish_round(growth)))
            growth = start_round(setup.trees)
    return model


def test_secure_gbdt_job_with_dropouts_grows_each_level_from_exactly_the_summed_devices() -> None:
    opts = SimulationOptions(
        devices=8, split=parse_split("group"), dropout=0.25, rounds=3, seed=5, ceiling=False
    )
    with simulated(gbdt_spec(), opts) as (fed, summary, data, spec):
        preprocess, final, rounds, summed = job_of(fed, summary["job_id"])
        rows = training_rows(fed, spec, data, preprocess)
        with fed.read() as s:
            dropped = s.scalar(
                select(Participant.id)
                .where(Participant.round_id.in_([r.id for r in rounds]), Participant.status == "dropped")
                .limit(1)
            )

    assert (summary["status"], summary["final_version"]) == ("completed", 3)
    assert dropped is not None and summary["simulation"]["silent_answers"] > 0  # the drops were real
    assert any(len(summed[r.id]) < 8 for r in rounds if r.status == "completed")  # some level lacked devices
    x_test, _ = Preprocessor.from_dict(preprocess).transform(data.test)
    setup = boost_setup(spec, preprocess)
    assert_same_ensemble(final, replay(setup, rounds, summed, rows, spec.cohort.target), x_test)
    # Three trees of depth 3 from partial sums: well above chance (0.84-0.92 over device draws).
    assert summary["final"]["auc"] > 0.75


def _inflate_hessians(vec: np.ndarray) -> np.ndarray:
    """A level vector with a hessian of one more per row in every feature: logistic rows give at most 0.25."""
    ints = vec.view(np.int64).copy()
    cells = (ints.size - 1) // 2  # one slot at the first level: 2 * cells + 1 values
    width = 32 + 1
    hess = ints[cells : 2 * cells].reshape(-1, width)  # (features, width), a view
    hess[:, -1] += ints[-1] * SCALE  # into each feature's missing-value bin: the features still agree
    return ints.view(np.uint64)


def _one_longer(vec: np.ndarray) -> np.ndarray:
    return np.concatenate([vec, np.zeros(1, dtype=np.uint64)])


@pytest.mark.parametrize(
    ("secure", "tamper", "reason"),
    [
        (False, _inflate_hessians, "histogram refused: hessian_bound"),
        (True, _one_longer, "masked input refused: expected"),
    ],
)
def test_a_bad_histogram_excludes_its_device_with_the_reason_and_the_level_completes(
    monkeypatch: pytest.MonkeyPatch, secure: bool, tamper: Callable[[np.ndarray], np.ndarray], reason: str
) -> None:
    worker = device_code().worker
    honest = worker._tree_input
    liar: list[str] = []

    def tree_input(self: Any, task: Any) -> tuple[np.ndarray, int]:
        vec, n = honest(self, task)
        if (
            task.kind == "level"
            and task.boosting["growth"]["depth"] == 0
            and (liar or [self.device_id]) == [self.device_id]
        ):
            liar[:] = [self.device_id]  # the first device asked at a round's first level, every round
            return tamper(vec), n
        return vec, n

    monkeypatch.setattr(worker, "_tree_input", tree_input)
    opts = SimulationOptions(devices=5, split=parse_split("group"), rounds=2, seed=2, ceiling=False)
    with simulated(gbdt_spec(secure=secure), opts) as (fed, summary, _, _), fed.read() as s:
        excluded = s.execute(
            select(Round.kind, Round.status, Participant.device_id, Participant.reason)
            .join(Participant, Participant.round_id == Round.id)
            .where(Round.job_id == summary["job_id"], Participant.status == "excluded")
        ).all()

    assert len(excluded) == 2  # the first level of each boosting round
    for kind, status, device, why in excluded:
        assert (kind, status, device) == ("level", "completed", liar[0])
        assert why.startswith(reason), why
    assert (summary["status"], summary["final_version"]) == ("completed", 2)


def test_devices_refuse_a_level_whose_secure_context_names_other_trees_than_they_were_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator that shows devices other trees than the round's SecAgg+ context names (as one
    that shows different devices different trees must): each device declines before masking any
    histogram, and every such level round is abandoned."""
    from coordinator import boosting, checkins

    class Lying:
        @staticmethod
        def task_info(ctx: Any, s: Any, r: Any) -> dict[str, Any] | None:
            task = boosting.task_info(ctx, s, r)
            if task is None:
                return None
            return {**task, "devices": task["devices"] + 1}  # a task a device would still compute

        def __getattr__(self, name: str) -> Any:
            return getattr(boosting, name)

    monkeypatch.setattr(checkins, "boosting", Lying())
    opts = SimulationOptions(devices=4, split=parse_split("group"), rounds=1, seed=2, ceiling=False)
    with simulated(gbdt_spec(secure=True), opts) as (fed, summary, _, _), fed.read() as s:
        levels = s.execute(
            select(Round.id, Round.status, Round.reason).where(
                Round.job_id == summary["job_id"], Round.kind == "level"
            )
        ).all()
        reasons = set(
            s.scalars(select(Participant.reason).where(Participant.round_id.in_([r.id for r in levels])))
        )
        masked = s.scalar(
            select(func.count())
            .select_from(Participant)
            .where(
                Participant.round_id.in_([r.id for r in levels]),
                Participant.stage_done.in_(("masked_input", "unmask")),
            )
        )

    assert levels and all(status == "abandoned" for _, status, _ in levels), levels
    assert masked == 0
    assert any(r and "does not name the trees this device was sent" in r for r in reasons), reasons
    assert summary["final_version"] == 0  # no boosting round finished
