"""What a completed round produces.

A statistics round fixes the job's preprocessing and, unless the job waits for a pre-trained one,
its version 0. A training round turns the aggregate into the job's next version through the job's
strategy (registered, signed, queued for audit). An evaluation round files the devices' federated
metrics with the version they evaluated. Any error here abandons the round (see ``driver``): the
model does not change. Whichever way a round ends, its stored vectors and masked sum are deleted once
that decision has committed (``discard``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session

from coordinator import apps, audits, boosting, privacy, registry, secure
from coordinator.aggregation import Sums
from coordinator.context import EngineContext
from coordinator.errors import Invalid
from coordinator.evaluation import weighted_mean
from coordinator.models import Event, Job, ModelVersion, Round, RoundMessage, utcnow
from coordinator.rounds import ParticipantView
from coordinator.strategies import apply_strategy
from shared import codec
from shared.gbdt.rounds import TREE_KINDS, is_boosted
from shared.jobspec import JobSpec
from shared.privacy import (
    SkellamParams,
    add_central_noise,
    clip_l2,
    decode_total,
    under_clip,
    update_noise_multiplier,
    wrap_bound,
)
from shared.privacy.accounting import gaussian_round, skellam_round
from shared.robustness import AggregateRejected, aggregate_problem
from shared.secagg.protocol import finish as secagg_finish
from shared.secagg.protocol import unmask_total


class RoundFinisher:
    """Turns a round whose last stage is done into its outcome, in the caller's transaction."""

    def __init__(self, ctx: EngineContext, sums: Sums):
        self.ctx = ctx
        self.sums = sums

    def finish(self, s: Session, job: Job, r: Round, active: list[ParticipantView]) -> None:
        """Complete round ``r`` from the inputs of its ``active`` participants."""
        spec = JobSpec.model_validate(job.spec)
        msgs = {
            m.device_id: m
            for m in s.scalars(
                select(RoundMessage).where(RoundMessage.round_id == r.id, RoundMessage.stage == "input")
            )
        }
        senders = [p.device_id for p in active if p.device_id in msgs]
        if r.kind == "stats":
            statistics = apps.app_for(spec).statistics
            if statistics is None:
                raise Invalid(f"app {spec.app_ref} gathers no statistics")
            ctx = apps.context(spec, None)
            if r.secure:
                sr = secure.SecureRound(s, r)
                total, _ = self.sums.masked(r, sr, len(sr.layout()))
                merged = statistics.decode(
                    unmask_total(total, **sr.reconstruction_inputs()), sr.vocabulary, ctx
                )
            else:
                merged = statistics.merge([msgs[d].payload["statistics"] for d in senders], ctx)
            self.setup(s, job, spec, statistics.setup(merged, ctx), {"statistics_rows": merged.get("rows")})
        elif r.kind in TREE_KINDS:
            numel = boosting.numel(self.ctx, s, r)
            if r.secure:
                sr = secure.SecureRound(s, r)
                masked, r.aggregation_seconds = self.sums.masked(r, sr, numel)
                total = unmask_total(masked, **sr.reconstruction_inputs())
                summed = sorted(sr.sent("masked_input"))
            else:
                summed = senders
                total = self.sums.histograms(r, [msgs[d] for d in senders], numel)
            boosting.finish(self.ctx, s, job, spec, r, total, summed)
        elif r.kind == "train" and r.secure:
            self._train(s, job, spec, r, [], secure.SecureRound(s, r))
        elif r.kind == "train":
            self._train(s, job, spec, r, [msgs[d] for d in senders])
        else:
            fed = weighted_mean(
                [(int(msgs[d].payload["examples"]), msgs[d].payload["metrics"]) for d in senders]
            )
            r.metrics = {"federated": fed}
            self._record_federated(s, job, r.model_version_in, fed)
        r.status = "completed"
        r.ended_at = utcnow()
        self.discard(s, r)
        s.add(
            Event(
                actor="coordinator",
                action="round.complete",
                target=f"{job.id}/{r.number}",
                detail={"participants": len(senders)},
            )
        )

    def setup(
        self, s: Session, job: Job, spec: JobSpec, setup: dict[str, Any], facts: dict[str, Any] | None = None
    ) -> None:
        """Fix the job's setup (what its statistics round found, or ``{}``) and, unless the job waits
        for a pre-trained one, register its version 0: the app's model under the job's seed."""
        app = apps.app_for(spec)
        job.preprocess = setup
        if is_boosted(spec):
            return  # a gbdt job's version 0 comes from its binning round (coordinator/boosting.py)
        ctx = apps.context(spec, setup)
        arch = apps.describe(app, ctx)
        existing = s.scalar(
            select(ModelVersion).where(ModelVersion.job_id == job.id, ModelVersion.version == 0)
        )
        if existing is not None:
            header, _ = registry.load_vector(self.ctx.blobs, existing)
            if header.get("arch") != arch:
                raise Invalid(
                    f"version 0 was built for {header.get('arch')}, but the federation's data needs {arch}"
                )
            job.current_version = 0
            return
        if spec.model.initial == "pretrained":
            # `aicfl cluster pretrain` reads this preprocessing, trains exactly this network
            # centrally and uploads it as version 0; training rounds wait for it.
            s.add(
                Event(
                    actor="coordinator",
                    action="job.awaiting_pretrain",
                    target=str(job.id),
                    detail={"arch": arch},
                )
            )
            return
        vector = apps.initial_vector(app, ctx)
        self.ctx.register(
            s,
            job,
            vector,
            arch,
            provenance={"source": "initialised", "seed": spec.seed, **(facts or {})},
        )
        audits.enqueue(s, job, 0, self.ctx.clock())
        job.current_version = 0

    def _train(
        self,
        s: Session,
        job: Job,
        spec: JobSpec,
        r: Round,
        msgs: list[RoundMessage],
        sr: secure.SecureRound | None = None,
    ) -> None:
        t0 = time.perf_counter()
        current_row = registry.get_version(s, job.id, r.model_version_in)
        header, current = self.ctx.vector(job.id, current_row)
        unmask_seconds: float | None = None
        # What each contributor said beside its vector (example count, loss, metrics), in sender order.
        payloads = [m.payload for m in msgs]
        dp = spec.privacy
        if dp is not None and dp.level == "example":
            # Example-level DP: each device ran DP-SGD (its update weight 1); its checked report is charged
            # to its own ledger once the sum is released to the coordinator, before the model is applied.
            reports = (
                sr.payloads("masked_input") if sr is not None else {m.device_id: m.payload for m in msgs}
            )
            self._example_dp(s, spec, r, reports)
        if sr is not None and dp is not None and dp.level == "device":
            payloads = [p for _, p in sorted(sr.payloads("masked_input").items())]
            t_unmask = time.perf_counter()
            mean_delta, examples, incremental = self._device_dp(s, spec, r, sr, current.size)
            unmask_seconds = time.perf_counter() - t_unmask
            mean: np.ndarray = current + mean_delta
        elif sr is not None:
            payloads = [p for _, p in sorted(sr.payloads("masked_input").items())]
            total, incremental = self.sums.masked(r, sr, current.size + 1)
            t_unmask = time.perf_counter()
            mean_delta, examples = secagg_finish(unmask_total(total, **sr.reconstruction_inputs()), sr.params)
            unmask_seconds = time.perf_counter() - t_unmask
            mean = current + mean_delta
        elif dp is not None and dp.level == "central":
            mean_delta, examples = self._central_dp(s, spec, r, msgs, current.size)
            incremental = 0.0
            mean = current + mean_delta
        else:
            total, examples, incremental = self.sums.plain(r, msgs, current.size)
            mean = current + total / np.float32(examples)
        state = self.ctx.blobs.get(job.strategy_state_sha256) if job.strategy_state_sha256 else None
        new, new_state = apply_strategy(
            spec.strategy, current, mean, examples, job.rounds_completed + 1, state
        )
        # Whatever the path (plain, robust rule, SecAgg+, a server optimiser), the new model must be
        # finite and within robustness.max_parameter, or the round is rejected and nothing registered.
        problem = aggregate_problem(new, spec.robustness.max_parameter)
        if problem is not None:
            raise AggregateRejected(problem)
        version = registry.get_version(s, job.id).version + 1
        # Under secure aggregation a device's example count stays inside the masked sum. Under differential
        # privacy a device sends no loss or metrics in the clear (client_agent/worker.py).
        train_loss = (
            {}
            if dp is not None
            else weighted_mean([(int(m.get("num_examples", 1)), {"loss": m["train_loss"]}) for m in payloads])
        )
        row = self.ctx.register(
            s,
            job,
            new,
            header["arch"],
            version=version,
            parent=current_row.version,
            round_number=r.number,
            metrics={"train_loss": train_loss.get("loss")},
            provenance={
                "source": "federated",
                "round": r.number,
                "participants": len(payloads),
                "examples": examples,
            },
        )
        if new_state is not None:
            job.strategy_state_sha256 = self.ctx.blobs.put(new_state)
        finalize = time.perf_counter() - t0
        r.aggregation_seconds = incremental + finalize
        r.model_version_out = row.version
        audit = audits.enqueue(s, job, row.version, self.ctx.clock())
        if audit is not None and spec.audit.gate:
            row.released = False  # released when its audit's verdict is ok
        else:
            job.current_version = row.version
        job.rounds_completed += 1
        fed = weighted_mean([(int(m.get("holdout_examples", 0)), m.get("metrics", {})) for m in payloads])
        metrics: dict[str, Any] = {
            "train_loss": train_loss.get("loss"),
            "examples": examples,
            "aggregation": {
                "accumulate_cpu_seconds": incremental,
                "finalize_seconds": finalize,
                "from_store": incremental == 0.0,
            },
            "secure": sr is not None,
        }
        if unmask_seconds is not None:
            metrics["unmask_seconds"] = unmask_seconds
        central = self.ctx.central(job, spec, header["arch"], new)
        if central:
            metrics["central"] = central
            row.metrics = {**row.metrics, "central": central}
        r.metrics = metrics
        if fed:
            self._record_federated(s, job, current_row.version, fed)

    def _device_dp(
        self, s: Session, spec: JobSpec, r: Round, sr: secure.SecureRound, dim: int
    ) -> tuple[npt.NDArray[np.float32], int, float]:
        """A device-level round (distributed Skellam under SecAgg+, docs/privacy.md): unmask the signed,
        noised sum of the survivors' ``noised_input`` vectors (weight 1 each), charge the round, and return
        the noised mean delta, the contributors and the adding's CPU time."""
        params = SkellamParams(**(r.secagg or {})["privacy"])
        if params.dim != dim:
            raise Invalid(f"the round's privacy parameters are for {params.dim} values, the model has {dim}")
        total, incremental = self.sums.masked(r, sr, params.coordinates)
        unmasked = unmask_total(total, **sr.reconstruction_inputs())
        summed = len(sr.sent("masked_input"))
        noised = decode_total(unmasked, params)
        # Released to the coordinator now: the round is spent whatever the checks below decide.
        privacy.record(
            s,
            r,
            spec,
            cost=skellam_round(params),
            noise_multiplier=params.noise_multiplier,
            clip=params.clip,
            contributors=summed,
            fraction_under=noised.fraction_under,
            extra={"bits": params.bits, "min_contributors": params.min_contributors},
        )
        if noised.contributors != summed:
            raise AggregateRejected(
                f"the unmasked count coordinate says {noised.contributors} contributors, {summed} devices sent"
                " masked inputs: some device did not follow the protocol"
            )
        bound = wrap_bound(
            devices=summed,
            bits=params.bits,
            weight_cap=1,
            local_variance=params.local_variance,
            coordinates=params.coordinates - 1,
            indicator_scale=params.indicator_scale,
        )
        largest = int(np.abs(unmasked.view(np.int64)[:-1]).max())
        if largest > bound.total:
            raise AggregateRejected(
                f"a coordinate of the noised sum ({largest}) exceeds what {summed} devices following the"
                f" protocol can make ({bound.total}): some device did not follow it, or the sum wrapped"
            )
        return (noised.total / noised.contributors).astype(np.float32), noised.contributors, incremental

    def _example_dp(self, s: Session, spec: JobSpec, r: Round, reports: dict[str, dict[str, Any]]) -> None:
        """Charge an example-level round (docs/privacy.md): every device whose update is in the sum extends
        its own ledger with its DP-SGD steps. Each report was checked against the job's on arrival
        (coordinator/devices.py); checked again here, a round holding another is rejected, yet charged."""
        plan = privacy.example_plan(spec, privacy.noise_multiplier(spec, 0))
        privacy.record_example(s, r, spec, reports, plan)
        for device, payload in sorted(reports.items()):
            problem = privacy.example_report_problem(spec, payload.get("dp"))
            if problem is not None:
                raise AggregateRejected(f"device {device}: {problem}")

    def _central_dp(
        self, s: Session, spec: JobSpec, r: Round, msgs: list[RoundMessage], dim: int
    ) -> tuple[npt.NDArray[np.float32], int]:
        """A central-level round (DP-FedAvg, McMahan et al., ICLR 2018; trusts the coordinator): each
        plaintext update clipped to the clip in L2, summed with weight 1, Gaussian noise added; with an
        adaptive clip the count under it noised too (Andrew et al.). Returns the noised mean delta and the
        contributors."""
        p = spec.privacy
        assert p is not None
        if not msgs:
            raise Invalid("no update to aggregate")
        z = privacy.noise_multiplier(spec, dim)
        clip = privacy.current_clip(s, r.job_id, p)
        adaptive = p.adaptive_quantile is not None and p.indicator_noise is not None
        z_update = update_noise_multiplier(z, p.indicator_noise) if adaptive and p.indicator_noise else z
        total = np.zeros(dim, dtype=np.float64)
        under = 0
        for m in msgs:
            # A device sends (local - global) times its weight (1 under differential privacy).
            vec = codec.decode(self.ctx.blobs.get(m.blob_sha256 or ""), expected_numel=dim)[1]
            clipped = clip_l2(np.asarray(vec, dtype=np.float64) / float(m.payload["num_examples"]), clip)
            total += clipped.values
            under += under_clip(clipped.norm, clip)
        rng = privacy.central_rng()
        noised = add_central_noise(total, clip, z_update, rng)
        fraction = None
        if adaptive and p.indicator_noise:
            fraction = (under + float(rng.normal(0.0, p.indicator_noise))) / len(msgs)
        privacy.record(
            s,
            r,
            spec,
            cost=gaussian_round(z),
            noise_multiplier=z,
            clip=clip,
            contributors=len(msgs),
            fraction_under=fraction,
            extra={"update_noise_multiplier": z_update},
        )
        return (noised / len(msgs)).astype(np.float32), len(msgs)

    def discard(self, s: Session, r: Round) -> None:
        """Once this transaction commits, forget the ended round ``r``'s running sum and delete the vectors
        and masked sum it stored: the masked inputs and updates of a round are kept no longer than it runs.

        Not before the commit: were the decision rolled back, the round would still run, and need them.
        """
        round_id, secagg = r.id, r.secagg  # read now: ``r`` leaves its session with the transaction

        def delete() -> None:
            with self.ctx.read() as later:
                self.sums.discard(later, Round(id=round_id, secagg=secagg))  # a stand-in, never added

        self.ctx.after_commit(s, delete)

    def _record_federated(self, s: Session, job: Job, version: int | None, fed: dict[str, float]) -> None:
        """Federated metrics describe the model the devices received: file them with its version."""
        if version is None:
            return
        mv = registry.get_version(s, job.id, version)
        mv.metrics = {**mv.metrics, "federated": fed}
        producer = s.scalar(select(Round).where(Round.job_id == job.id, Round.model_version_out == version))
        if producer is not None:
            producer.metrics = {**producer.metrics, "federated": fed}
