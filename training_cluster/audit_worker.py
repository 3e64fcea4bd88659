"""The audit worker: takes queued audits from the coordinator and returns their SHAP reports.

``aicfl audit worker`` (and ``aicfl server start --with-audit-worker``) run
:func:`run_worker`. Each turn of the loop claims the oldest queued audit under
a lease, fetches what it needs through :class:`~training_cluster.api.ClusterApi`
(the job, the version's model, the reference rows, the previous version's
report, the AutoML baseline), computes the audit
(:func:`training_cluster.audit_tabular.audit_version`; for a ``zoo = "gbdt"`` job's trees
:func:`training_cluster.audit_trees.audit_tree_version`; for a job on an app, which the worker
imports as the coordinator does, :func:`training_cluster.audit_app.audit_app_version`) and sends
the report back.

Failures are of two kinds. A problem with the audit itself (a model that does
not load, reference rows that do not fit the schema, an error inside shap) is
reported with ``fail_audit`` in one line; the coordinator retries it up to the
job's ``audit.max_attempts``. A coordinator that cannot be reached (or answers
5xx) is waited out with a growing back-off; an audit whose result cannot be
delivered is left to its lease, after which the coordinator hands it out
again. The same holds for a worker killed mid-audit. Nothing here blocks a
round.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from shared.api_client import CliError
from shared.apps import BUILTIN, App, JobContext, load_app
from shared.gbdt.rounds import is_boosted
from shared.jobspec import JobSpec
from shared.tabular import read_table_bytes
from training_cluster.api import ClusterApi
from training_cluster.audit import AuditResult, warm_up
from training_cluster.audit_app import app_version_importance, audit_app_version
from training_cluster.audit_tabular import audit_version, version_importance
from training_cluster.audit_trees import audit_tree_version, tree_version_importance

T = TypeVar("T")

_MAX_BACKOFF = 60.0
_ONCE_ATTEMPTS = 5  # with once=True, give up on an unreachable coordinator after this many tries
_CACHED_JOBS = 8
_ERROR_CHARS = 1000
_HTTP_STATUS = re.compile(r"\(HTTP (\d{3})\)$")


class CoordinatorUnavailable(Exception):
    """The coordinator could not be reached (or kept answering 5xx) within the retries allowed."""


def is_transient(err: BaseException) -> bool:
    """Whether a failed API call is worth repeating: no connection, a timeout, 408, 429 or 5xx."""
    if not isinstance(err, CliError):
        return False
    if err.code == 2:  # ApiClient: the request did not get an answer
        return True
    match = _HTTP_STATUS.search(str(err))
    return match is not None and (match.group(1)[0] == "5" or match.group(1) in ("408", "429"))


def one_line(err: BaseException) -> str:
    """An exception as one line for the audit's error field: its type and message."""
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}"[:_ERROR_CHARS]


@dataclass
class _Job:
    spec: JobSpec
    preprocess: dict[str, Any] | None
    reference: Any  # the rows as a DataFrame, or what the app's load_reference parsed
    app: App | None = None  # None: the built-in tabular app, audited on its preprocessed columns


class _Worker:
    def __init__(
        self,
        api: ClusterApi,
        name: str,
        *,
        once: bool,
        poll: float,
        lease_seconds: float,
        stop: threading.Event,
        log: Callable[[str], None],
    ):
        self.api = api
        self.name = name
        self.once = once
        self.poll = max(0.01, poll)
        self.lease_seconds = lease_seconds
        self.stop = stop
        self.log = log
        self.jobs: OrderedDict[int, _Job] = OrderedDict()

    # -- talking to the coordinator ------------------------------------------

    def call(self, what: str, fn: Callable[[], T], *, deadline: float | None = None) -> T:
        """``fn()``, repeated with back-off while the coordinator is unreachable.

        Gives up (:class:`CoordinatorUnavailable`) when ``stop`` is set, past
        ``deadline`` (monotonic seconds), or after a few tries with ``once``.
        A non-transient error (4xx) is raised as it is.
        """
        delay = self.poll
        tries = 0
        while True:
            try:
                return fn()
            except CliError as err:
                if not is_transient(err):
                    raise
                tries += 1
                late = deadline is not None and time.monotonic() + delay > deadline
                if self.stop.is_set() or late or (self.once and tries >= _ONCE_ATTEMPTS):
                    raise CoordinatorUnavailable(f"{what}: {err}") from None
                self.log(f"audit worker {self.name}: {what} failed ({err}); retrying in {delay:.0f} s")
                if self.stop.wait(delay):
                    raise CoordinatorUnavailable(f"{what}: {err}") from None
                delay = min(delay * 2, _MAX_BACKOFF)

    def job(self, job_id: int) -> _Job:
        cached = self.jobs.get(job_id)
        if cached is not None:
            self.jobs.move_to_end(job_id)
            return cached
        job = self.call(f"fetching job {job_id}", lambda: self.api.job(job_id))
        spec = JobSpec.model_validate(job["spec"])
        data = self.call(f"fetching job {job_id}'s reference data", lambda: self.api.reference(job_id))
        preprocess = job.get("preprocess")
        if spec.app_ref == BUILTIN:
            entry = _Job(spec=spec, preprocess=preprocess, reference=read_table_bytes(data, spec.tabular))
        else:
            # AppError, or the app's own parse error: the audit's failure, reported in one line.
            app = load_app(spec.app_ref, spec.model.app_version)
            reference = app.load_reference(data, JobContext(spec, preprocess))
            entry = _Job(spec=spec, preprocess=preprocess, reference=reference, app=app)
        # The reference and the spec never change after submission; the preprocessing is fixed
        # by the statistics round, before any version worth auditing.
        if entry.preprocess is not None:
            self.jobs[job_id] = entry
            while len(self.jobs) > _CACHED_JOBS:
                self.jobs.popitem(last=False)
        return entry

    def previous_report(self, job_id: int, previous_version: int | None, job: _Job) -> dict[str, Any] | None:
        """The previous version's report, or its importances computed here when it has no report."""
        if previous_version is None:
            return None
        audit = self.call(
            f"fetching the audit of job {job_id} v{previous_version}",
            lambda: self.api.audit(job_id, previous_version),
        )
        report = (audit or {}).get("report")
        if audit is not None and audit.get("status") == "done" and report and report.get("importance"):
            return dict(report)
        header, vector = self.call(
            f"fetching job {job_id} v{previous_version}", lambda: self.api.model(job_id, previous_version)
        )
        if job.app is not None:
            importance = app_version_importance(
                job.spec,
                job.app,
                header,
                vector,
                job.reference,
                version=previous_version,
                job_setup=job.preprocess,
            )
        else:
            of_version = tree_version_importance if is_boosted(job.spec) else version_importance
            importance = of_version(
                job.spec,
                header,
                vector,
                job.reference,
                version=previous_version,
                job_preprocess=job.preprocess,
            )
        return {"version": previous_version, "importance": importance}

    # -- one audit -----------------------------------------------------------

    def compute(self, claim: dict[str, Any]) -> AuditResult:
        job_id, version = int(claim["job_id"]), int(claim["version"])
        job = self.job(job_id)
        header, vector = self.call(
            f"fetching job {job_id} v{version}", lambda: self.api.model(job_id, version)
        )
        previous_version = claim.get("previous_version")
        previous = self.previous_report(job_id, previous_version, job)
        baseline = self.call(f"fetching job {job_id}'s baseline", lambda: self.api.baseline(job_id))
        vector32 = np.asarray(vector, dtype=np.float32)
        given: dict[str, Any] = {
            "version": version,
            "previous": previous,
            "previous_version": previous_version,
            "baseline": baseline,
        }
        if is_boosted(job.spec):
            # The version's bytes (uint8), explained as trees.
            return audit_tree_version(
                job.spec, header, vector, job.reference, job_preprocess=job.preprocess, **given
            )
        if job.app is not None:
            return audit_app_version(
                job.spec, job.app, header, vector32, job.reference, job_setup=job.preprocess, **given
            )
        return audit_version(
            job.spec, header, vector32, job.reference, job_preprocess=job.preprocess, **given
        )

    def process(self, claim: dict[str, Any]) -> bool:
        """Audit one claimed version; True when its report was accepted."""
        audit_id = int(claim["id"])
        label = (
            f"audit {audit_id} (job {claim['job_id']} v{claim['version']}, attempt {claim.get('attempt', 1)})"
        )
        lease_end = time.monotonic() + self.lease_seconds
        started = time.perf_counter()
        try:
            result = self.compute(claim)
        except CoordinatorUnavailable as err:
            self.log(
                f"{label}: coordinator unavailable ({err}); the audit goes back to the queue when its lease ends"
            )
            return False
        except Exception as err:  # noqa: BLE001 - any failure of one audit is recorded, never fatal
            error = one_line(err)
            self.log(f"{label}: failed: {error}")
            try:
                self.call(
                    f"reporting the failure of audit {audit_id}",
                    lambda: self.api.fail_audit(audit_id, self.name, error),
                    deadline=lease_end,
                )
            except (CoordinatorUnavailable, CliError) as report_err:
                self.log(f"{label}: could not record the failure ({report_err}); its lease will expire")
            return False
        seconds = time.perf_counter() - started
        result.report["seconds"] = seconds
        try:
            self.call(
                f"returning the report of audit {audit_id}",
                lambda: self.api.complete_audit(
                    audit_id,
                    self.name,
                    verdict=result.verdict,
                    report=result.report,
                    seconds=seconds,
                    plots=result.plots,
                ),
                deadline=lease_end,
            )
        except (CoordinatorUnavailable, CliError) as err:
            # A 409: the lease ran out and the audit went to someone else; that run will report.
            self.log(f"{label}: report not accepted: {err}")
            return False
        top = ", ".join(result.report["top_features"][:3])
        rho = result.report["drift"]["rank_correlation"]
        versus = (
            f"; rank correlation with v{claim.get('previous_version')} {rho:.3f}" if rho is not None else ""
        )
        self.log(f"{label}: {result.verdict} in {seconds:.1f} s; top: {top}{versus}")
        for reason in result.report["reasons"]:
            self.log(f"{label}:   drift: {reason}")
        return True

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        completed = 0
        if not self.once:
            # A standing worker compiles shap's numba code now, while the queue is likely empty.
            self.log(f"audit worker {self.name}: warmed up in {warm_up():.1f} s")
        while not self.stop.is_set():
            try:
                claim = self.call(
                    "claiming an audit", lambda: self.api.claim_audit(self.name, self.lease_seconds)
                )
            except CoordinatorUnavailable as err:
                self.log(f"audit worker {self.name}: {err}; stopping")
                break
            except CliError as err:
                # A refused claim (bad token, bad request) will not get better by asking again soon.
                self.log(f"audit worker {self.name}: claim refused: {err}")
                if self.once or self.stop.wait(_MAX_BACKOFF):
                    break
                continue
            if claim is None:
                if self.once or self.stop.wait(self.poll):
                    break
                continue
            if self.process(claim):
                completed += 1
        return completed


def run_worker(
    api: ClusterApi,
    worker: str,
    *,
    once: bool = False,
    poll: float = 2.0,
    lease_seconds: float = 600.0,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Claim and audit model versions until ``stop`` is set; return how many audits were completed.

    ``worker`` names this worker in leases and logs. With ``once``, audit what
    is queued, then return (and give up after a few tries if the coordinator
    cannot be reached). ``poll``: seconds between claims when the queue is
    empty, and the first back-off step. ``lease_seconds``: how long the
    coordinator waits for a claimed audit before handing it out again.
    ``stop`` (set it from a SIGTERM or Ctrl-C handler) ends the loop after the
    audit in progress.
    """
    loop = _Worker(
        api,
        worker,
        once=once,
        poll=poll,
        lease_seconds=lease_seconds,
        stop=stop or threading.Event(),
        log=log,
    )
    return loop.run()
