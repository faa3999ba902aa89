"""A store call cannot be split by a cancellation: a client that leaves, a shutdown or arq's
job_timeout may cancel a coroutine at any await, and the connection must never be left inside a
transaction (every later write of that process used to fail with "cannot start a transaction
within a transaction") nor hold a stale read snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from store_helpers import add_image

from imgapi_core.store import JOB_KINDS, ImageQuery
from imgapi_core.store.sqlite import SqliteStore as Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "imgapi.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await Store(db_path).open()
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.contextmanager
def write_lock_held(db_path: Path) -> Iterator[threading.Event]:
    """Another process's writer, in effect: it holds the write lock until the event is set."""
    release = threading.Event()
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(30)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10)
    try:
        yield release
    finally:
        release.set()
        thread.join(30)


def whole_or_absent(db_path: Path) -> None:
    """Every upload is all of its rows (images, stats, metadata, jobs) or none of them."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        images = {r[0]: r[1] for r in conn.execute("SELECT image_id, metadata_sha256 FROM images")}
        stats = {r[0] for r in conn.execute("SELECT image_id FROM stats")}
        metadata = {r[0] for r in conn.execute("SELECT sha256 FROM metadata")}
        jobs = dict(conn.execute("SELECT sha256, count(*) FROM jobs GROUP BY sha256").fetchall())
    assert set(images) == stats
    assert set(images.values()) == metadata
    assert jobs == dict.fromkeys(metadata, len(JOB_KINDS))


async def cancel_after(coro, steps: int) -> bool:
    """Runs coro, cancels it after `steps` turns of the event loop; True if it was cancelled."""
    task = asyncio.ensure_future(coro)
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_writes_cancelled_at_every_point_leave_no_open_transaction(store, db_path):
    """Cancelled before its thread takes it up, while BEGIN waits on another process's lock,
    and at every later loop turn up to its end: the connection always comes back clean."""
    n = 0
    for steps in range(0, 40):
        n += 1
        await cancel_after(add_image(store, f"free{n}", f"{n:064x}"), steps)
    with write_lock_held(db_path) as release:
        cancelled = []
        for steps in range(0, 10):
            n += 1
            cancelled.append(
                asyncio.ensure_future(
                    cancel_after(add_image(store, f"busy{n}", f"{n:064x}"), steps)
                )
            )
        await asyncio.sleep(0.3)  # the writes that were taken up now wait in BEGIN IMMEDIATE
        release.set()
        await asyncio.gather(*cancelled)
    whole_or_absent(db_path)
    # The writer is usable: a new write commits and is seen by a fresh connection.
    assert await add_image(store, "after", "f" * 64) is True
    whole_or_absent(db_path)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT 1 FROM images WHERE image_id = 'after'").fetchone()


async def test_a_cancelled_write_waits_for_its_transaction_to_end(store, db_path):
    """The caller's cancellation goes on only once the transaction has ended: what it does next
    (remove a file it wrote, record a failure) sees the database as the write left it."""
    with write_lock_held(db_path) as release:
        task = asyncio.ensure_future(add_image(store, "slow", "a" * 64))
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.sleep(0.3)
        assert not task.done(), "the cancellation overtook a transaction still in progress"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    # It was under way when cancelled, so it ran to its end: committed, whole.
    whole_or_absent(db_path)
    assert (await store.get_record("slow")) is not None


async def test_reads_cancelled_at_every_point_leave_no_stale_snapshot(store, db_path):
    await add_image(store, "one", "a" * 64)
    for steps in range(0, 30):
        await cancel_after(store.record_with_jobs("one"), steps)
        await cancel_after(store.search_with_jobs(ImageQuery(), limit=10), steps)
    # Another process writes; every reader connection must see it (a reader left inside a read
    # transaction would keep answering from its old snapshot).
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute("UPDATE metadata SET caption = 'seen' WHERE sha256 = ?", ("a" * 64,))
    for _ in range(8):
        row, _jobs = await store.record_with_jobs("one")
        assert row is not None and row.caption == "seen"
        listed, _jobs, _keys = await store.search_with_jobs(ImageQuery(), limit=10)
        assert [r.caption for r in listed] == ["seen"]


async def test_a_write_that_fails_in_commit_is_rolled_back(store, db_path, monkeypatch):
    """An error anywhere in a transaction, COMMIT included, ends it: the next write works."""

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (-5, 'x')")
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        await store.write(broken)
    assert await add_image(store, "after", "b" * 64) is True
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT 1 FROM schema_migrations WHERE version = -5").fetchone() is None
