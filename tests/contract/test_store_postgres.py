"""What the PostgreSQL store must do beyond the contract every store keeps: what SQLite's single
writer gives for free, earned here with several processes writing at once (migrations applied once
by stores that start together, jobs handed out with SKIP LOCKED, event ids that become visible in id
order, commits that wake the other processes through LISTEN/NOTIFY), and a server that goes away
and comes back under an open store. Against the session's private cluster (tests/services.py);
each test has a database of its own, and each store opened here stands for one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from procs import free_port
from services import PostgresServer, name_for
from store_helpers import add_image

from imgapi_core.store import (
    JOB_KINDS,
    ImageQuery,
    Job,
    NotWritable,
    Store,
    StoreUnavailable,
    now_iso,
)
from imgapi_core.store.postgres import PostgresStore
from imgapi_core.store.postgres_schema import MIGRATIONS, migrate
from imgapi_core.store.sqlite import SqliteStore

Opener = Callable[..., Awaitable[PostgresStore]]


def sha_of(i: int) -> str:
    return f"{i:064x}"


@pytest.fixture
async def open_store(postgres_url: str) -> AsyncIterator[Opener]:
    """Opens one more store (one more process, in effect) on this test's database."""
    opened: list[PostgresStore] = []

    async def factory(**options: object) -> PostgresStore:
        store = await PostgresStore(postgres_url, **options).open()
        opened.append(store)
        return store

    try:
        yield factory
    finally:
        for store in reversed(opened):
            await store.close()


async def add_failure(store: Store, image_id: str) -> None:
    """An upload that failed: one transaction, one event."""
    stamp = now_iso()
    await store.record_failure(
        image_id=image_id,
        original_name=f"{image_id}.bin",
        processed_at=stamp,
        start_time=stamp,
        error="not an image",
    )


# -- migrations -----------------------------------------------------------------------------------


async def test_four_stores_opening_a_new_database_at_once_apply_each_migration_once(
    open_store: Opener, postgres_url: str
) -> None:
    stores = await asyncio.gather(*(open_store() for _ in range(4)))
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version")]
        assert sorted(versions) == list(range(1, len(MIGRATIONS) + 1))
        assert await migrate(conn) == 0  # a second start: nothing to do
        # No write probe is left behind either.
        assert await conn.fetchval("SELECT count(*) FROM schema_version WHERE version < 1") == 0
    finally:
        await conn.close()
    await add_image(stores[0], "img")
    for store in stores:
        assert (await store.get_record("img")) is not None


async def test_concurrent_migrations_apply_each_one_exactly_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.create_database(name_for(tmp_path, "m"))
    conns = [await asyncpg.connect(url) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(migrate(conn) for conn in conns))
        assert sum(applied) == len(MIGRATIONS)
        assert await asyncio.gather(*(migrate(conn) for conn in conns)) == [0] * 4
    finally:
        for conn in conns:
            await conn.close()


# -- handing out work -----------------------------------------------------------------------------


async def test_runners_in_two_stores_never_claim_the_same_job(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    for i in range(15):
        await add_image(a, f"img{i}", sha256=sha_of(i))
    everything = {(sha_of(i), kind) for i in range(15) for kind in JOB_KINDS}
    claimed: list[tuple[str, str, str]] = []

    async def runner(store: PostgresStore, name: str) -> None:
        # As the in-process runner does: ask what is due, claim it, leave what others won.
        while due := await store.due_jobs(5):
            random.shuffle(due)
            for job in due:
                if await store.claim_job(job.sha256, job.kind, name, 30) is not None:
                    claimed.append((job.sha256, job.kind, name))
            await asyncio.sleep(0)

    await asyncio.gather(
        *(runner(s, f"{tag}{n}") for tag, s in (("a", a), ("b", b)) for n in range(4))
    )
    assert sorted((sha, kind) for sha, kind, _ in claimed) == sorted(everything)  # each once
    assert len({runner for *_, runner in claimed}) > 1
    # And all at once on every job: one winner each.
    for i in range(15, 20):
        await add_image(a, f"img{i}", sha256=sha_of(i))
    jobs = [(sha_of(i), kind) for i in range(15, 20) for kind in JOB_KINDS]
    results = await asyncio.gather(
        *(
            s.claim_job(sha, kind, f"r{n}", 30)
            for sha, kind in jobs
            for n, s in enumerate((a, b, a, b))
        )
    )
    won = [r for r in results if r is not None]
    assert sorted((j.sha256, j.kind) for j in won) == sorted(jobs)


async def test_a_job_locked_by_another_transaction_is_skipped_not_waited_for(
    open_store: Opener, postgres_url: str
) -> None:
    store = await open_store()
    await add_image(store, "img", sha256=sha_of(1))
    other = await asyncpg.connect(postgres_url)
    try:
        async with other.transaction():
            # Another runner in the middle of claiming the exif job.
            await other.execute(
                "SELECT 1 FROM jobs WHERE sha256 = $1 AND kind = 'exif' FOR UPDATE", sha_of(1)
            )
            async with asyncio.timeout(5):  # SKIP LOCKED: no waiting for that transaction
                assert await store.claim_job(sha_of(1), "exif", "r", 30) is None
                due = await store.due_jobs(10)
                assert {j.kind for j in due} == {"thumbnail", "caption"}
                assert await store.claim_job(sha_of(1), "thumbnail", "r", 30) is not None
        # Its transaction over, the job is there to claim.
        assert await store.claim_job(sha_of(1), "exif", "r", 30) == Job(sha_of(1), "exif", 1)
    finally:
        await other.close()


async def test_two_sweepers_release_each_lapsed_job_once(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    for i in range(10):
        await add_image(a, f"img{i}", sha256=sha_of(i), jobs={"thumbnail": ("queued", None)})
        assert await a.claim_job(sha_of(i), "thumbnail", "dead", lease_s=0.01) is not None
    await asyncio.sleep(0.05)
    released: list[Job] = []
    for _ in range(3):  # a sweeper that met bytes another held looks again next round
        rounds = await asyncio.gather(*(s.release_lapsed(5, lambda n: 0) for s in (a, b, a, b)))
        released += [job for jobs in rounds for job in jobs]
    assert sorted(job.sha256 for job in released) == [sha_of(i) for i in range(10)]
    events = [e for e in await a.events_after(0, 1000) if e.type == "job.queued"]
    assert len(events) == 10


async def test_uploads_of_bytes_whose_last_job_finishes_meanwhile_all_become_ready(
    open_store: Opener,
) -> None:
    """ "Are its jobs finished?" (asked by an upload of known bytes) and "was that its last open
    job?" (asked when a job ends) are answered one transaction at a time: no upload is left
    processing, none is ready twice."""
    uploader, runner = await open_store(), await open_store()
    for n in range(4):
        await add_image(uploader, f"first{n}", sha256=sha_of(n))

    async def upload_again(n: int) -> None:
        for i in range(8):
            await add_image(uploader, f"again{n}-{i}", sha256=sha_of(n))

    async def run_jobs(n: int) -> None:
        for kind in JOB_KINDS:
            assert await runner.claim_job(sha_of(n), kind, "r", 30) is not None
            assert await runner.finish_job(sha_of(n), kind, "r", "done")

    await asyncio.gather(*(f(n) for n in range(4) for f in (upload_again, run_jobs)))
    stats = await uploader.stats()
    assert (stats.total, stats.processing) == (4 * 9, 0)
    ready = [e.image_id for e in await runner.events_after(0, 1000) if e.type == "image.ready"]
    assert sorted(ready) == sorted({e.image_id for e in await runner.events_after(0, 1000)})


async def test_an_upload_of_bytes_whose_last_upload_is_deleted_meanwhile_is_whole(
    open_store: Opener, postgres_url: str
) -> None:
    """The upload finds the bytes' metadata row, and waits for it while a delete of their last
    upload holds it; when that delete has removed the row, the upload makes it again."""
    store = await open_store()
    await add_image(store, "old", sha256=sha_of(1))
    deleter = await asyncpg.connect(postgres_url)
    try:
        tr = deleter.transaction()
        await tr.start()
        await deleter.execute(
            "SELECT 1 FROM metadata WHERE sha256 = $1 FOR NO KEY UPDATE", sha_of(1)
        )
        upload = asyncio.create_task(add_image(store, "new", sha256=sha_of(1)))
        for _ in range(500):  # until the upload waits for the row
            if await deleter.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the upload never waited for the bytes' row")
        for sql in (
            "DELETE FROM stats WHERE image_id = 'old'",
            "DELETE FROM images WHERE image_id = 'old'",
            "DELETE FROM jobs WHERE sha256 = $1",
            "DELETE FROM metadata WHERE sha256 = $1",
        ):
            await deleter.execute(sql, *([sha_of(1)] if "$1" in sql else []))
        await tr.commit()
        assert await upload is True
    finally:
        await deleter.close()
    record, jobs = await store.record_with_jobs("new")
    assert record is not None and record.width == 4
    assert {job.state for job in jobs.values()} == {"queued"} and len(jobs) == len(JOB_KINDS)
    assert (await store.stats()).processing == 1


# -- events ---------------------------------------------------------------------------------------


async def test_a_follower_never_skips_an_event_that_commits_late(open_store: Opener) -> None:
    """Many writers in several stores at once, and a reader that follows events_after(last) as
    the events hub does: every event is seen, in id order, none passed over."""
    writers = [await open_store(webhook_urls=["http://hook.example/"]) for _ in range(3)]
    reader = await open_store()
    start = await reader.last_event_id()
    done = asyncio.Event()

    async def write(store: PostgresStore, tag: str) -> None:
        for i in range(12):
            if i % 3 == 0:
                await add_failure(store, f"{tag}-{i}")
            else:  # two events, and a webhook delivery written with them
                await add_image(
                    store,
                    f"{tag}-{i}",
                    sha256=f"{tag}-{i}".ljust(64, "0"),
                    jobs={"exif": ("skipped", "off")},
                )

    async def follow() -> list[int]:
        seen: list[int] = []
        last = start
        while True:
            finished = done.is_set()
            events = await reader.events_after(last, 7)
            for event in events:
                assert event.id > last
                seen.append(event.id)
                last = event.id
            if finished and not events:
                return seen
            await asyncio.sleep(0)

    follower = asyncio.create_task(follow())
    await asyncio.gather(*(write(s, f"w{n}{k}") for n, s in enumerate(writers) for k in range(3)))
    done.set()
    seen = await follower
    everything = [e.id for e in await reader.events_after(start, 10_000)]
    assert len(everything) == 9 * (4 + 8 * 2)
    assert seen == everything
    assert await reader.last_event_id() == everything[-1]


async def test_a_commit_in_one_store_wakes_the_listeners_of_another(open_store: Opener) -> None:
    a, b = await open_store(), await open_store()
    heard_by_b: asyncio.Queue[int] = asyncio.Queue()
    b.add_commit_listener(heard_by_b.put_nowait)
    heard_by_a: list[int] = []
    a.add_commit_listener(heard_by_a.append)

    await add_image(a, "img")
    last = await a.last_event_id()
    assert await asyncio.wait_for(heard_by_b.get(), 5) == last
    # The writer's own listeners hear it once, at its commit, not again from its NOTIFY.
    await add_failure(b, "bad")
    assert await asyncio.wait_for(heard_by_b.get(), 5) == last + 1
    await asyncio.sleep(0.3)
    assert heard_by_a == [last, last + 1]
    # A write without events wakes nobody.
    await a.renew_leases("r", [(sha_of(0), "exif")], 30)
    await a.check_writable()
    await asyncio.sleep(0.3)
    assert heard_by_b.empty() and heard_by_a == [last, last + 1]


# -- cancellation ---------------------------------------------------------------------------------


async def test_a_cancelled_write_is_whole_or_absent(open_store: Opener, postgres_url: str) -> None:
    store = await open_store()
    heard: list[int] = []
    store.add_commit_listener(heard.append)
    for steps in range(0, 40, 2):
        task = asyncio.ensure_future(add_image(store, f"img{steps}", sha256=sha_of(steps)))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    conn = await asyncpg.connect(postgres_url)
    try:
        images = {r[0] for r in await conn.fetch("SELECT image_id FROM images")}
        stats = {r[0] for r in await conn.fetch("SELECT image_id FROM stats")}
        uploaded = {
            r[0]
            for r in await conn.fetch("SELECT image_id FROM events WHERE type = 'image.uploaded'")
        }
        jobs = await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()
    assert images == stats == uploaded
    assert jobs == len(images) * len(JOB_KINDS)
    # Every commit with events was told, cancelled caller or not.
    assert len(heard) == len(images)
    await add_image(store, "after", sha256=sha_of(99))  # the pool is fine


# -- the server going away ------------------------------------------------------------------------


async def test_a_server_restart_is_unavailable_while_down_and_fine_after(
    open_store: Opener, postgres_server: PostgresServer
) -> None:
    a, b = await open_store(), await open_store()
    await add_image(a, "before", sha256=sha_of(1))
    heard: asyncio.Queue[int] = asyncio.Queue()
    b.add_commit_listener(heard.put_nowait)
    await asyncio.to_thread(postgres_server.stop)
    try:
        calls: list[Callable[[], Awaitable[object]]] = [
            a.ping,
            lambda: a.get_record("before"),
            lambda: a.search_with_jobs(ImageQuery(words=("before",)), limit=10),
            lambda: add_image(a, "during", sha256=sha_of(2)),
            lambda: a.claim_job(sha_of(1), "exif", "r", 30),
            lambda: a.claim_deliveries("r", 10, 30),
            a.check_writable,
            a.last_event_id,
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable) as caught:
                await call()
            assert caught.value.__cause__ is not None
    finally:
        await asyncio.to_thread(postgres_server.start)
    # The same store objects, not reopened: their pools connect again.
    await a.ping()
    assert (await a.get_record("before")) is not None
    assert (await a.get_record("during")) is None  # nothing of the failed write was kept
    await add_image(a, "after", sha256=sha_of(3))
    assert (await b.get_record("after")) is not None
    # b's LISTEN connection is back too (it tries again quietly, at most 10 s apart); commits
    # made before it was are not heard, and nothing is lost by that (the hub polls).
    async with asyncio.timeout(20):
        for n in range(1000):
            await add_failure(a, f"again-{n}")
            last = await a.last_event_id()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    while await heard.get() != last:
                        pass
                    break


async def test_opening_an_unreachable_server_is_unavailable() -> None:
    store = PostgresStore(f"postgresql://nobody@127.0.0.1:{free_port()}/none", connect_timeout=5)
    with pytest.raises(StoreUnavailable):
        await store.open()
    await store.close()


async def test_a_read_only_database_is_not_writable(
    open_store: Opener, postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    store = await open_store()
    await add_image(store, "img")
    database = name_for(tmp_path, "t")

    def end_sessions() -> None:
        postgres_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )

    postgres_server.psql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    try:
        with pytest.raises(NotWritable):
            await PostgresStore(postgres_url).open()
        # Sessions already open keep their settings: end them, and the pool connects anew.
        end_sessions()
        with pytest.raises(NotWritable):
            await store.check_writable()
        with pytest.raises(NotWritable):
            await add_image(store, "refused", sha256=sha_of(2))
        assert (await store.get_record("img")) is not None  # reads go on
    finally:
        postgres_server.psql(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    end_sessions()
    await store.check_writable()
    await add_image(store, "taken", sha256=sha_of(3))


# -- search ---------------------------------------------------------------------------------------


async def test_search_words_match_as_fts5_does(open_store: Opener, tmp_path: Path) -> None:
    """Words with punctuation in them, and words that could match across two fields, answered
    as SQLite's FTS5 index answers them."""
    postgres = await open_store()
    sqlite = await SqliteStore(tmp_path / "data" / "imgapi.db").open()
    try:
        answers = []
        for store in (postgres, sqlite):
            await add_image(store, "p2", sha_of(1))
            await store.set_caption(sha_of(1), "jpg-a sunset over the café, l’eau")
            exif = {"Make": "Canon", "Model": "Canon EOS 5D", "LensModel": "EF 24-70mm"}
            await store.set_exif(sha_of(1), json.dumps(exif))
            await add_image(store, "x", sha_of(2))  # x.jpg, then a caption that starts "sun"
            await store.set_caption(sha_of(2), "sunrise")
            found = {}
            for word in (
                "p2.jpg", "p2.j", "jpg-a", "jpg-s", "canon-eos", "24-70", "70mm", "mm",
                "cafe", "CAFÉ", "l'eau", "eau", "5d", "-", "sun", "'", "\\", "a:b", "x&y|z",
            ):  # fmt: skip
                records, _, _ = await store.search_with_jobs(
                    ImageQuery(words=(word,), sort="relevance"), limit=10
                )
                found[word] = sorted(r.image_id for r in records)
            answers.append(found)
        assert answers[0] == answers[1]
        assert answers[0]["jpg-s"] == []  # x.jpg then "sunrise": two fields, no phrase
        assert answers[0]["p2.jpg"] == ["p2"] and answers[0]["CAFÉ"] == ["p2"]
    finally:
        await sqlite.close()


@pytest.mark.parametrize("call", ["stats", "write"])
async def test_a_connection_handed_back_inside_a_transaction_is_dropped_not_joined(
    open_store: Opener, postgres_url: str, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """A transaction left open on a pooled connection (a caller cancelled at the wrong moment,
    the pool's reset skipped) must never be joined: its work is nobody's to commit. The next
    BEGIN on it fails, the connection is closed, and the call goes on on another."""
    store = await open_store(min_connections=1, max_connections=1)
    pool = store._pool
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    await conn.execute(
        "BEGIN; INSERT INTO schema_version (version, applied_at) VALUES (-1, 'left open')"
    )
    with monkeypatch.context() as patched:
        # The reset that would roll it back, skipped as a cancellation at the wrong point can.
        patched.setattr(asyncpg.connection.Connection, "_reset", _no_reset)
        await pool.release(conn)

    if call == "stats":
        assert (await store.stats()).total == 0
    else:
        await add_failure(store, "after")
        assert (await store.stats()).failed == 1
    async with pool.acquire() as again:
        assert again.get_server_pid() != pid  # a new connection: the old one was closed
    check = await asyncpg.connect(postgres_url)
    try:
        # What the abandoned transaction wrote was never committed by anyone.
        assert await check.fetchval("SELECT count(*) FROM schema_version WHERE version = -1") == 0
    finally:
        await check.close()


async def _no_reset(self: asyncpg.Connection) -> None:
    return None


async def _sessions_ended_under(postgres_server: PostgresServer, pids: list[int]) -> None:
    """Ends these sessions from the server's side, and leaves asyncpg between reading the server's
    last error and reading the closed socket: both wait in each socket while the loop is blocked,
    and each turn of the loop reads one of them. (Before the second read, asyncpg's protocol is
    stuck in "another operation is in progress" for good.)"""
    postgres_server.psql(f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY{pids}) AS pid")
    # Blocking on purpose: the error and the FIN both arrive before the loop reads either.
    time.sleep(0.3)  # noqa: ASYNC251
    for _ in range(2):
        await asyncio.sleep(0)


async def test_sessions_ended_by_the_server_break_no_call(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """What a fast shutdown or pg_terminate_backend leaves on the pool's connections never gets
    to a caller: a connection that asyncpg can no longer use is closed, and the call goes on on
    another (it failed before anything of it was sent). Without that, the call failed and the
    pool handed the same broken connection out again (MagicStack/asyncpg#1069)."""
    raw = await asyncpg.connect(postgres_url)
    await _sessions_ended_under(postgres_server, [raw.get_server_pid()])
    with pytest.raises(asyncpg.InternalClientError):  # what the store has to deal with
        await raw.execute("SELECT 1")
    raw.terminate()

    for call in ("stats", "write", "read"):
        store = await PostgresStore(postgres_url, min_connections=2, max_connections=2).open()
        try:
            pool = store._pool
            assert pool is not None
            held = [await pool.acquire() for _ in range(2)]
            pids = [conn.get_server_pid() for conn in held]
            for conn in held:
                await pool.release(conn)
            await _sessions_ended_under(postgres_server, pids)
            if call == "stats":
                assert (await store.stats()).failed == 0
            elif call == "write":
                await add_failure(store, f"after-{call}")
            else:
                assert await store.get_record("none") is None
            for _ in range(4):  # and no broken connection is left in the pool
                await store.stats()
        finally:
            await store.close()
