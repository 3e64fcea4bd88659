"""Small device requests are worked on where they arrive (the event loop) when storage is in-process and the
write lock can be had; otherwise, and always for a large body, in a worker thread. While worked in place the
write lock is held, so that no statement of the work waits for another writer of this process."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine

from coordinator.blobs import LocalBlobStore
from coordinator.context import IN_PLACE_BACKOFF, IN_PLACE_WAIT, EngineContext
from coordinator.s3blobs import S3BlobStore
from coordinator.store import session_factory
from server.security import SignedRequest


def _ctx(url: str, blobs: object) -> EngineContext:
    return EngineContext(session_factory(create_engine(url)), blobs, Ed25519PrivateKey.generate())  # type: ignore[arg-type]


def _other_thread_can_write(ctx: EngineContext) -> bool:
    got: list[bool] = []

    def take() -> None:
        got.append(ctx._write_lock.acquire(timeout=0.05))
        if got[0]:
            ctx._write_lock.release()

    t = threading.Thread(target=take)
    t.start()
    t.join()
    return got[0]


def test_sqlite_and_local_blobs_work_in_place_holding_the_write_lock(tmp_path: Path) -> None:
    ctx = _ctx(f"sqlite:///{tmp_path / 'db.sqlite'}", LocalBlobStore(tmp_path / "blobs"))
    with ctx.in_place() as here:
        assert here
        assert not _other_thread_can_write(ctx)  # held for the whole block
        with ctx.device_write():  # the work's own transactions take it again
            pass
    assert _other_thread_can_write(ctx)  # and given back


def test_a_writer_in_another_thread_is_waited_for_briefly_then_not_for_a_while(
    tmp_path: Path,
) -> None:
    ctx = _ctx(f"sqlite:///{tmp_path / 'db.sqlite'}", LocalBlobStore(tmp_path / "blobs"))
    taken, done = threading.Event(), threading.Event()

    def writer(seconds: float) -> None:
        with ctx._write_lock:
            taken.set()
            time.sleep(seconds)
        done.set()

    threading.Thread(target=writer, args=(IN_PLACE_WAIT / 4,)).start()
    taken.wait()
    with ctx.in_place() as here:
        assert here  # a short transaction is waited for
    taken.clear()
    done.clear()
    threading.Thread(target=writer, args=(IN_PLACE_WAIT * 20,)).start()
    taken.wait()
    start = time.monotonic()
    with ctx.in_place() as here:
        assert not here  # a long one is not
    assert time.monotonic() - start < IN_PLACE_WAIT * 10
    start = time.monotonic()
    with ctx.in_place() as here:
        assert not here
    assert time.monotonic() - start < IN_PLACE_WAIT / 2  # nor waited for again at once: no wait at all
    done.wait()
    time.sleep(IN_PLACE_BACKOFF)
    with ctx.in_place() as here:
        assert here  # the writer is gone and the back-off over


def test_storage_over_the_network_never_works_in_place(tmp_path: Path) -> None:
    postgres = _ctx(
        "postgresql+psycopg://127.0.0.1/test", LocalBlobStore(tmp_path / "blobs")
    )  # no connection made
    s3 = _ctx(f"sqlite:///{tmp_path / 'db.sqlite'}", S3BlobStore("bucket", endpoint_url="http://127.0.0.1:9"))
    for ctx in (postgres, s3):
        with ctx.in_place() as here:
            assert not here


def _thread_of_work(in_place: object) -> bool:
    """Whether ``SignedRequest.run`` did the work on the calling (event loop's) thread."""

    async def scenario() -> tuple[str, int, int]:
        req = SignedRequest(b"body", lambda body: "device-1", in_place=in_place)  # type: ignore[arg-type]
        loop_thread = threading.get_ident()
        device, work_thread = await req.run(lambda device_id, body: (device_id, threading.get_ident()))
        return device, work_thread, loop_thread

    device, work_thread, loop_thread = asyncio.run(scenario())
    assert device == "device-1"
    return work_thread == loop_thread


def test_signed_requests_run_in_place_only_when_the_engine_allows(tmp_path: Path) -> None:
    ctx = _ctx(f"sqlite:///{tmp_path / 'db.sqlite'}", LocalBlobStore(tmp_path / "blobs"))
    assert _thread_of_work(ctx.in_place)
    assert not _thread_of_work(None)  # a large body: never in place
    pg = _ctx("postgresql+psycopg://127.0.0.1/test", LocalBlobStore(tmp_path / "blobs"))
    assert not _thread_of_work(pg.in_place)
