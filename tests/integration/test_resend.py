"""A device message sent again, after its answer was lost or the coordinator restarted, counts once.

The same message again is answered as the first was; a different one is refused (409) with the reason.
The agent's side (it sends the very same bytes again, never a new message) is in
tests/unit/test_client_errors.py. Devices are driven in-process over the real database, as in
test_secure_engine.py, whose rig these tests reuse.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from coordinator import registry
from coordinator.blobs import LocalBlobStore
from coordinator.engine import EngineSettings, Federation
from coordinator.errors import Conflict
from coordinator.models import Round, RoundMessage
from coordinator.store import session_factory
from shared import codec
from shared.jobspec import DataSchema
from shared.tabular import local_statistics
from shared.wire import ConfigureMessage

from . import test_engine_store, test_secure_engine
from .test_engine_store import SCHEMA, checkin_all, enroll, frame, open_train_round, update
from .test_engine_store import spec as plain_spec
from .test_secure_engine import Rig

fed = test_engine_store.fed  # the fixtures: a federation on each database, a SecAgg+ round's rig
rig = test_secure_engine.rig


def restart(r: Rig) -> None:
    """A new coordinator process over the same database and blob store: nothing kept in memory."""
    r.fed = Federation(
        session_factory(r.engine),
        LocalBlobStore(r.blob_dir),
        r.fed.key,
        EngineSettings(eligibility_window=3600),
        clock=r.clock,
    )


def test_masked_input_in_flight_when_the_coordinator_restarted_is_accepted_when_sent_again(
    rig: Callable[..., Rig],
) -> None:
    r = rig(4)
    for name in ("configure", "advertise_keys", "share_keys"):
        r.stage(name)
    d = r.devs[0]
    tk = r.task(d)
    assert tk is not None and tk.stage == "masked_input"
    sent = r.honest("masked_input", d, tk)  # made once, as the agent keeps it until it is answered
    restart(r)  # the coordinator died with the request in flight: nothing of it was committed
    r.send("masked_input", d, sent)
    r.in_sum.append(d.id)
    r.stage("masked_input", skip={d.id})
    r.stage("unmask")
    assert r.messages(d.id, "masked_input") == 1
    r.assert_exact()


def test_same_masked_input_again_is_accepted_once_and_a_different_one_refused(
    rig: Callable[..., Rig],
) -> None:
    r = rig(4)
    for name in ("configure", "advertise_keys", "share_keys"):
        r.stage(name)
    d = r.devs[1]
    tk = r.task(d)
    assert tk is not None
    sent = r.honest("masked_input", d, tk)
    r.send("masked_input", d, sent)
    r.in_sum.append(d.id)
    r.send("masked_input", d, sent)  # its answer was lost: the same bytes again
    header, vec = codec.decode(sent, dtype="uint64")
    other = codec.encode(header, vec + np.uint64(1))
    with pytest.raises(Conflict, match=f"device {d.id} already sent a different 'masked_input' message"):
        r.send("masked_input", d, other)
    assert r.participant(d.id)[0] == "active" and r.messages(d.id, "masked_input") == 1
    r.stage("masked_input", skip={d.id})
    r.stage("unmask")
    r.assert_exact()  # a vector counted twice would leave its masks in the sum


def test_plain_update_and_json_messages_sent_again_after_a_restart_count_once(fed: Federation) -> None:
    devices = enroll(fed, 3)
    job = fed.jobs.submit(plain_spec(rounds=1), "test")
    checkin_all(fed, devices)
    fed.tick()
    configure = ConfigureMessage(accepted=True, rows=50)
    for d, t in checkin_all(fed, devices).items():
        assert t is not None
        fed.devices.configure(d, t.round_id, configure)
    stats = {"statistics": local_statistics(frame(0, 50), DataSchema.model_validate(SCHEMA))}
    first, *others = devices
    task = checkin_all(fed, [first])[first]
    assert task is not None and task.stage == "input"
    rid = task.round_id
    fed.devices.input_json(first, rid, stats)
    fed = restart_plain(fed)
    fed.devices.configure(first, rid, configure)  # a stage that is over, sent again: answered as before
    fed.devices.input_json(first, rid, dict(reversed(stats.items())))  # the same JSON message again
    with pytest.raises(Conflict, match="already sent a different 'configure' message"):
        fed.devices.configure(first, rid, ConfigureMessage(accepted=True, rows=51))
    for i, d in enumerate(others, 1):
        fed.devices.input_json(
            d, rid, {"statistics": local_statistics(frame(i, 50), DataSchema.model_validate(SCHEMA))}
        )
    tasks = open_train_round(fed, devices)
    tid = tasks[first].round_id
    with fed.read() as s:
        n = registry.get_version(s, job.id, 0).num_parameters
    body = update(tid, np.ones(n, np.float32), 7)
    fed.devices.update(first, tid, body)
    fed = restart_plain(fed)  # its answer was lost with the coordinator
    fed.devices.update(first, tid, body)
    with pytest.raises(Conflict, match=f"device {first} already sent a different 'input' message"):
        fed.devices.update(first, tid, update(tid, np.ones(n, np.float32), 8))
    for d in others:
        fed.devices.update(d, tid, update(tid, np.ones(n, np.float32), 1))
    with fed.read() as s:
        r = s.get(Round, tid)
        assert r is not None and r.status == "completed"
        assert r.metrics["examples"] == 9  # 7 + 1 + 1: the resent update counted once
        assert s.query(RoundMessage).filter_by(round_id=tid, device_id=first, stage="input").count() == 1


def restart_plain(fed: Federation) -> Federation:
    """A new coordinator process over the same database and blob store."""
    return Federation(
        fed.factory, LocalBlobStore(fed.blobs.root), fed.key, EngineSettings(eligibility_window=60)
    )
