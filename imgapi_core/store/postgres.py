"""The PostgreSQL store: every statement of this engine, on an asyncpg pool. The schema and its
migrations are in imgapi_core.store.postgres_schema.

It answers exactly as the SQLite store does (the same contract tests run against both). What
differs is that several processes write at once, where SQLite has one writer at a time:

- Each write is one transaction on a pooled connection (READ COMMITTED). A cancelled caller does
  not split it: it runs on as a task of its own to COMMIT or ROLLBACK, and the cancellation goes on
  once it has (as SQLite's writer thread does).
- Changes to the jobs and uploads of some bytes lock the bytes' metadata row first (FOR NO KEY
  UPDATE, several in sha256 order), so that "was that the last open job?" and "are its jobs
  finished already?" are answered one transaction at a time, as SQLite's single writer answers
  them. Then rows; the event log's lock last.
- Work is handed out with SELECT ... FOR UPDATE SKIP LOCKED: two runners never get one job or
  one webhook delivery, and neither waits for the other.
- Event ids become visible in id order (see _write_events), and each commit that wrote events
  NOTIFYs the other processes, which one LISTEN connection per store hears (_EventListener).
- A server that cannot be reached (down, restarting, refusing) is StoreUnavailable from every
  method; the transaction rolled back, nothing is half-written. A read is tried again once (a
  pooled connection may have died with the last server); a write only when it failed before it
  began.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import asyncpg
import asyncpg.exceptions as pgerr

from imgapi_core.store import (
    FINISHED,
    WEBHOOK_EVENTS,
    ApiKey,
    Deleted,
    Delivery,
    Event,
    ImageQuery,
    Job,
    JobsByImage,
    JobState,
    KeyExists,
    KnownImage,
    NewUpload,
    NotWritable,
    Record,
    Stats,
    StoreUnavailable,
)
from imgapi_core.store.postgres_schema import migrate
from imgapi_core.timestamps import now_iso

T = TypeVar("T")

log = logging.getLogger("imgapi.store")

# The channel each commit that wrote events NOTIFYs: "<store instance>:<last event id>".
EVENTS_CHANNEL = "imgapi_events"
# pg_advisory_xact_lock key of the event log ("imgapi" in ASCII, then 1; the migrations' ends in 0).
EVENTS_LOCK = 0x696D67617069_0001

# Tries of a write whose transaction the server rolled back whole (a deadlock, a serialization
# failure): nothing of it was kept, so it may run again.
WRITE_TRIES = 3
# How often the LISTEN connection, when quiet, checks that it is still connected (a half-open TCP
# connection says nothing), and how long it waits between attempts to connect again.
LISTEN_CHECK_S = 15.0
LISTEN_RETRY_S = (0.5, 10.0)
# known_sha256s asks in slices: one array parameter per statement stays a few hundred KiB.
SHA_SLICE = 5000

# Errors that say the server cannot be reached now, rather than that the statement was wrong.
# OSError covers refused, reset and unreachable connections, and TimeoutError (a connect timeout,
# the pool's command_timeout).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,  # class 08: ConnectionDoesNotExistError, ...FailureError
    pgerr.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    pgerr.AdminShutdownError,  # 57P01: fast shutdown, pg_terminate_backend
    pgerr.CrashShutdownError,  # 57P02
    pgerr.TooManyConnectionsError,  # 53300
)
# The transaction was rolled back whole by the server: safe to run again.
_ROLLED_BACK: tuple[type[BaseException], ...] = (
    pgerr.DeadlockDetectedError,
    pgerr.SerializationError,
    # A statement cached before another process changed the schema (asyncpg has dropped it).
    pgerr.InvalidCachedStatementError,
)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, _UNAVAILABLE) or _broken(exc):
        return True
    # asyncpg's InterfaceError itself (not its subclasses, which say a call was wrong) for a
    # connection or pool that is closed, or closing, under the call.
    return type(exc) is asyncpg.InterfaceError and "clos" in str(exc)


def _broken(exc: BaseException) -> bool:
    """asyncpg's protocol is in a state no call can leave: seen when the server ends a session
    (a fast shutdown, pg_terminate_backend) and asyncpg has read the server's last error but not
    yet the closed socket. The pool would hand the connection out again, failing every call on it
    (MagicStack/asyncpg#1069); the call that meets it failed before sending anything."""
    return isinstance(exc, asyncpg.InternalClientError)


def _left_in_transaction(exc: BaseException) -> bool:
    """BEGIN refused because the connection is inside a transaction already: one that a caller
    left open and the pool handed back (by the server's word, or by asyncpg's). Only what our
    BEGIN failed with means that: see `begun` at the callers."""
    if isinstance(exc, pgerr.ActiveSQLTransactionError):
        return True
    return type(exc) is asyncpg.InterfaceError and "manually started transaction" in str(exc)


def _dropped_unused(exc: BaseException, begun: bool) -> bool:
    """The call failed on a pooled connection that _drop_if_unusable closed, before anything of
    it reached the server: it may run again on another."""
    return not begun and (_broken(exc) or _left_in_transaction(exc))


def _drop_if_unusable(conn: asyncpg.Connection, exc: Exception, begun: bool) -> None:
    """Closes a pooled connection that must not be handed out again (the pool makes a new one):
    one whose protocol is broken, or whose BEGIN found a transaction already open (whatever that
    holds is nobody's to commit). Nothing of the caller's ran on it, so the caller tries again
    on another."""
    if not begun and _left_in_transaction(exc):
        log.warning(
            "a pooled PostgreSQL connection was inside a transaction it should not be in;"
            " closed: %s: %s",
            type(exc).__name__,
            exc,
        )
    elif not _broken(exc):
        return
    conn.terminate()


def _translated(exc: BaseException) -> Exception | None:
    """The store's own error for a driver error, or None when it goes up as it is."""
    if _unavailable(exc):
        return StoreUnavailable(f"PostgreSQL is unavailable: {type(exc).__name__}: {exc}")
    if isinstance(exc, pgerr.ReadOnlySQLTransactionError):  # a hot standby, a read-only default
        return NotWritable(f"the database is read-only: {exc}")
    return None


def _rowcount(status: str) -> int:
    """Rows a statement changed, from its status ("UPDATE 3", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[-1])


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo (no statement here sets session state), which saves
    asyncpg's default RESET ALL / UNLISTEN round trip on every release. asyncpg still rolls back
    a transaction left open, and drops a connection that broke."""


async def _settled(coro: Awaitable[T]) -> T:
    """Awaits a write that must not be split by a cancellation: it runs as a task of its own to
    its COMMIT or ROLLBACK, and the cancellation is raised once it has, so whatever the caller
    does next (remove a file, record a failure) sees the database as the write left it."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        if not task.cancelled():
            task.exception()  # retrieved: its outcome is known to nobody, and that is fine
        raise


# An event not yet written: (type, image_id, sha256, kind, state, error, created_at).
_PendingEvent = tuple[str, str | None, str | None, str | None, str | None, str | None, str]


class _Tx:
    """One write transaction: its connection, and the events it writes just before it commits."""

    __slots__ = ("conn", "events")

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.events: list[_PendingEvent] = []

    def emit(
        self,
        type_: str,
        *,
        image_id: str | None = None,
        sha256: str | None = None,
        kind: str | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> None:
        """An event for one image, or for every image of `sha256` (jobs belong to the bytes;
        events to the uploads that share them), written at the end of the transaction."""
        self.events.append((type_, image_id, sha256, kind, state, error, now_iso()))


class _EventListener:
    """One connection of the store's own that LISTENs to EVENTS_CHANNEL, so that a commit in
    another process wakes this one's commit listeners (API hosts wake each other without Redis).

    Only a wake-up: the events are read from the table. A lost connection is connected again
    quietly in the background; meanwhile the events hub's poll finds what was committed."""

    def __init__(self, url: str, connect_timeout: float, heard: Callable[[str], None]) -> None:
        self._url = url
        self._connect_timeout = connect_timeout
        self._heard = heard
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._warned = False
        self.listening = False

    async def start(self) -> None:
        """Starts listening; returns once the first attempt is done, whether it worked or not."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="imgapi-store-listen")
        await asyncio.shield(self._first)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _first_done(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._heard(payload)

    async def _run(self) -> None:
        delay = LISTEN_RETRY_S[0]
        self._warned = False
        while True:
            try:
                await self._listen()
                delay = LISTEN_RETRY_S[0]  # it had worked: connect again soon
            except Exception as exc:
                if not self._warned:
                    log.warning(
                        "not listening to PostgreSQL's event notifications (%s: %s); events of"
                        " other processes are found by polling until it is back",
                        type(exc).__name__,
                        exc,
                    )
                    self._warned = True
            self._first_done()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_S[1])

    async def _listen(self) -> None:
        """One connection, for as long as it lasts."""
        conn = await asyncpg.connect(self._url, timeout=self._connect_timeout)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(EVENTS_CHANNEL, self._notified)
            self.listening = True
            self._first_done()
            if self._warned:
                log.info("listening to PostgreSQL's event notifications again")
                self._warned = False
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LISTEN_CHECK_S):
                        await lost.wait()
                if not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=self._connect_timeout)
        finally:
            self.listening = False
            await _close_quietly(conn)


async def _close_quietly(conn: asyncpg.Connection) -> None:
    """Closes a connection, politely when the server answers, at once when it does not."""
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=2)
    except BaseException:
        conn.terminate()
        raise


class PostgresStore:
    """The store on a PostgreSQL database at `url`.

    The pool holds at most max_connections (few: each process has its own pool, and the server's
    max_connections is shared by all of them); connections are made when needed and kept while in
    use (closed after 5 idle minutes). min_connections keeps that many open at all times; it is 0
    by default because asyncpg restores that floor in the background while the server is down,
    logging a traceback for every try. command_timeout bounds every statement, a lock wait
    included: past it the call is StoreUnavailable."""

    def __init__(
        self,
        url: str,
        webhook_urls: Sequence[str] = (),
        *,
        min_connections: int = 0,
        max_connections: int = 10,
        command_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.webhook_urls = tuple(webhook_urls)
        self.min_connections = min_connections
        self.max_connections = max_connections
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._listeners: list[Callable[[int], None]] = []
        # Who sent a notification: this store's own commits have told its listeners already.
        self._instance = uuid.uuid4().hex
        self._events = _EventListener(url, connect_timeout, self._notified)

    # -- opening and closing ----------------------------------------------------------------

    async def open(self) -> PostgresStore:
        """Connects, applies the migrations, checks that the database takes writes, and starts
        listening to other processes' commits."""
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_connections,
                max_size=self.max_connections,
                command_timeout=self.command_timeout,
                timeout=self.connect_timeout,
                reset=_keep_session,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)
        except BaseException as exc:
            await self.close()
            mapped = _translated(exc) if isinstance(exc, Exception) else None
            if mapped is None:
                raise
            raise mapped from exc
        try:
            await self.check_writable()
            await self._events.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Waits for the calls under way, then closes every connection; safe to call twice."""
        await self._events.stop()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Graceful: waits for connections in use to come back. Bounded: a server that does
            # not answer must not hold a shutdown.
            await asyncio.wait_for(pool.close(), self.command_timeout + 5)
        except Exception as exc:
            log.warning("PostgreSQL pool closed abruptly: %s: %s", type(exc).__name__, exc)
            pool.terminate()

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is closed")
        return self._pool

    async def ping(self) -> None:
        await self._read(lambda conn: conn.fetchval("SELECT 1"))

    async def check_writable(self) -> None:
        """Raises NotWritable when a write would fail (a hot standby, default_transaction_read_only,
        a role without rights): a real write, rolled back."""

        async def probe(conn: asyncpg.Connection) -> None:
            tr = conn.transaction()
            await tr.start()
            try:
                # The backend's pid: unique among live sessions, so two probes never wait on
                # each other's row.
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at)"
                    " VALUES (-pg_backend_pid(), 'write probe')"
                )
            except pgerr.InsufficientPrivilegeError as exc:
                raise NotWritable(f"the database role may not write: {exc}") from exc
            finally:
                await tr.rollback()

        await self._read(probe)

    # -- running statements -----------------------------------------------------------------

    async def _read(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *, snapshot: bool = False
    ) -> T:
        """fn(conn) on a pooled connection; with snapshot=True, every statement of it sees the
        same committed state (one REPEATABLE READ READ ONLY transaction). Tried again once when the
        server could not be reached (a pooled connection may have died with the last server), and
        on another connection for each pooled one found unusable."""
        pool = self._open_pool()
        retried, dropped = False, 0
        while True:
            begun = False
            try:
                async with pool.acquire() as conn:
                    try:
                        if not snapshot:
                            return await fn(conn)
                        async with conn.transaction(isolation="repeatable_read", readonly=True):
                            begun = True
                            return await fn(conn)
                    except Exception as exc:
                        _drop_if_unusable(conn, exc, begun)
                        raise
            except Exception as exc:
                if _dropped_unused(exc, begun) and dropped < self.max_connections:
                    dropped += 1
                    continue
                if _unavailable(exc) and not retried:
                    retried = True
                    continue
                mapped = _translated(exc)
                if mapped is None:
                    raise
                raise mapped from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._read(lambda conn: conn.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._read(lambda conn: conn.fetchrow(sql, *args))

    async def _write(self, fn: Callable[[_Tx], Awaitable[T]]) -> T:
        """fn(tx) as one transaction, then its events; its result, or its error. The commit
        listeners hear of the events once they are committed."""
        return await _settled(self._run_write(self._open_pool(), fn))

    async def _run_write(self, pool: asyncpg.Pool, fn: Callable[[_Tx], Awaitable[T]]) -> T:
        tries = dropped = 0
        retried = False
        while True:
            tries += 1
            begun = committed = False
            result: Any = None
            last_event = 0
            try:
                async with pool.acquire() as conn:
                    # The level said outright: a BEGIN inside a transaction left open on this
                    # connection is then an error, where a plain BEGIN would only warn and join it.
                    try:
                        async with conn.transaction(isolation="read_committed"):
                            begun = True
                            tx = _Tx(conn)
                            result = await fn(tx)
                            last_event = await self._write_events(tx)
                    except Exception as exc:
                        _drop_if_unusable(conn, exc, begun)
                        raise
                    committed = True
            except Exception as exc:
                if committed:
                    # Only handing the connection back failed; the pool drops it.
                    log.debug("connection dropped after a commit: %s: %s", type(exc).__name__, exc)
                elif _dropped_unused(exc, begun) and dropped < self.max_connections:
                    # BEGIN never left on a pooled connection now closed: on another.
                    dropped += 1
                    continue
                elif not begun and _unavailable(exc) and not retried:
                    # Nothing reached the database (no connection, or BEGIN failed on a pooled
                    # connection that died with the last server): once more, on a new one. Never
                    # for a connection lost after BEGIN: its COMMIT may have landed.
                    retried = True
                    continue
                elif tries < WRITE_TRIES and isinstance(exc, _ROLLED_BACK):
                    continue  # the server rolled it all back
                else:
                    mapped = _translated(exc)
                    if mapped is None:
                        raise
                    raise mapped from exc
            if last_event:
                self._tell(last_event)
            return result

    # -- events -----------------------------------------------------------------------------

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def _tell(self, last_event: int) -> None:
        for listener in list(self._listeners):
            try:
                listener(last_event)
            except Exception:
                log.exception("a commit listener failed")

    def _notified(self, payload: str) -> None:
        """A NOTIFY of some process's commit; this store's own were told at commit."""
        sender, _, last = payload.rpartition(":")
        if sender == self._instance:
            return
        try:
            last_event = int(last)
        except ValueError:
            return
        self._tell(last_event)

    async def _write_events(self, tx: _Tx) -> int:
        """Inserts the transaction's events (and their webhook deliveries) and NOTIFYs; returns
        the last event id (0 when none was written). Called last, just before COMMIT.

        Event ids come from a sequence, which hands them out when rows are inserted, not when
        they commit: without more, a transaction could commit id 8 while another still holds 7,
        and the events follower (imgapi_core.events.hub), reading events_after(7) and seeing 8,
        would move past 7 for ever. So ids are taken only under EVENTS_LOCK, a transaction-level
        advisory lock held until COMMIT: the next transaction takes its ids only once this one is
        committed (and visible; PostgreSQL releases locks after that), so ids become visible in id
        order. The lock is taken last, and nothing is locked after it, so it cannot deadlock, and
        it is held for these few statements and the commit only."""
        if not tx.events:
            return 0
        conn = tx.conn
        await conn.execute("SELECT pg_advisory_xact_lock($1)", EVENTS_LOCK)
        columns = list(zip(*tx.events, strict=True))
        rows = await conn.fetch(_INSERT_EVENTS, *columns)
        if not rows:
            return 0
        events = sorted((Event(*row) for row in rows), key=lambda e: e.id)
        hooked = [e for e in events if e.type in WEBHOOK_EVENTS]
        if hooked and self.webhook_urls:
            deliveries = [
                (
                    str(uuid.uuid4()),
                    e.id,
                    e.type,
                    e.image_id,
                    url,
                    json.dumps(e.as_json()),
                    e.at,
                )
                for e in hooked
                for url in self.webhook_urls
            ]
            await conn.execute(_INSERT_DELIVERIES, *zip(*deliveries, strict=True))
        last = events[-1].id
        # Delivered to listeners at COMMIT, and only if it commits.
        await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, f"{self._instance}:{last}")
        return last

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        rows = await self._fetch(
            "SELECT id, type, image_id, kind, state, error, created_at FROM events"
            " WHERE id > $1 ORDER BY id LIMIT $2",
            after_id,
            limit,
        )
        return [Event(*row) for row in rows]

    async def last_event_id(self) -> int:
        """The sequence, not max(id): pruning every event must not make ids start again. Read
        under EVENTS_LOCK (shared): an id taken by a transaction still writing is not yet the
        last one (it may never be, if that transaction rolls back)."""

        async def read(conn: asyncpg.Connection) -> int:
            async with conn.transaction(readonly=True):
                await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", EVENTS_LOCK)
                return await conn.fetchval(
                    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_id_seq"
                )

        return await self._read(read)

    async def prune_events(self, before: str) -> int:
        async def txn(tx: _Tx) -> int:
            pruned = await tx.conn.execute("DELETE FROM events WHERE created_at < $1", before)
            # Failed ones stay until an admin has seen them (and maybe sent them again).
            await tx.conn.execute(
                "DELETE FROM webhook_deliveries WHERE state = 'delivered' AND updated_at < $1",
                before,
            )
            return _rowcount(pruned)

        return await self._write(txn)

    # -- uploads ----------------------------------------------------------------------------

    async def record_success(self, upload: NewUpload) -> bool:
        """Metadata (first upload of these bytes wins), images, stats and jobs rows at once.
        Returns True when jobs must be dispatched (one is still queued for this sha256)."""
        u = upload

        async def txn(tx: _Tx) -> bool:
            conn = tx.conn
            # Then locked: whether its jobs are finished is now this transaction's to say. Gone
            # by then (the last other upload of these bytes deleted meanwhile): made again.
            while True:
                await conn.execute(
                    "INSERT INTO metadata (sha256, width, height, format, size_bytes,"
                    " first_upload) VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (sha256) DO NOTHING",
                    u.sha256,
                    u.width,
                    u.height,
                    u.format,
                    u.size_bytes,
                    u.processed_at,
                )
                if await _lock_bytes(conn, [u.sha256]):
                    break
            await conn.execute(
                "INSERT INTO image_shape (sha256, frames, orientation) VALUES ($1, $2, $3)"
                " ON CONFLICT (sha256) DO NOTHING",
                u.sha256,
                u.frames,
                u.orientation,
            )
            await conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES ($1, $2, $3, $4, $5, NULL)",
                u.image_id,
                u.original_name,
                u.processed_at,
                u.original_key,
                u.sha256,
            )
            if u.jobs:
                kinds = list(u.jobs)
                await conn.execute(
                    "INSERT INTO jobs (sha256, kind, state, error, created_at, updated_at,"
                    " finished_at)"
                    " SELECT $1, j.kind, j.state, j.note, $2, $2,"
                    "   CASE WHEN j.state = ANY($6::text[]) THEN $2 END"
                    " FROM unnest($3::text[], $4::text[], $5::text[]) AS j(kind, state, note)"
                    " ON CONFLICT (sha256, kind) DO NOTHING",
                    u.sha256,
                    u.processed_at,
                    kinds,
                    [u.jobs[k][0] for k in kinds],
                    [u.jobs[k][1] for k in kinds],
                    list(FINISHED),
                )
            if u.delete_token_hash is not None:
                await conn.execute(
                    "INSERT INTO delete_tokens (image_id, token_hash) VALUES ($1, $2)",
                    u.image_id,
                    u.delete_token_hash,
                )
            pending = await _pending_jobs(conn, u.sha256)
            await conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES ($1, $2, $3, 1)",
                u.image_id,
                u.start_time,
                None if pending else now_iso(),
            )
            tx.emit("image.uploaded", image_id=u.image_id, state="success")
            if not pending:  # the same bytes again, their jobs long finished
                tx.emit("image.ready", image_id=u.image_id, state="ready")
            return pending > 0

        return await self._write(txn)

    async def record_failure(
        self, *, image_id: str, original_name: str, processed_at: str, start_time: str, error: str
    ) -> None:
        async def txn(tx: _Tx) -> None:
            await tx.conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES ($1, $2, $3, NULL, NULL, $4)",
                image_id,
                original_name,
                processed_at,
                error,
            )
            await tx.conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES ($1, $2, $3, 0)",
                image_id,
                start_time,
                processed_at,
            )
            tx.emit("image.uploaded", image_id=image_id, state="failed", error=error)

        await self._write(txn)

    async def known_image(self, sha256: str) -> KnownImage | None:
        """The stored metadata of these bytes when an earlier upload of them succeeded."""
        row = await self._fetchrow(
            "SELECT m.sha256, m.width, m.height, m.format,"
            " coalesce(s.frames, 1), coalesce(s.orientation, 1)"
            " FROM metadata m LEFT JOIN image_shape s ON s.sha256 = m.sha256"
            " WHERE m.sha256 = $1",
            sha256,
        )
        return KnownImage(*row) if row else None

    # -- reading records --------------------------------------------------------------------

    async def get_record(self, image_id: str) -> Record | None:
        row = await self._fetchrow(_RECORD_SELECT + " WHERE i.image_id = $1", image_id)
        return Record(*row) if row else None

    # A record and its job states are read in one snapshot: read apart, a job could show "done"
    # while its result (EXIF, caption) still read as missing.

    async def record_with_jobs(self, image_id: str) -> tuple[Record | None, dict[str, JobState]]:
        async def snapshot(conn: asyncpg.Connection) -> tuple[Record | None, dict[str, JobState]]:
            row = await conn.fetchrow(_RECORD_SELECT + " WHERE i.image_id = $1", image_id)
            if row is None:
                return None, {}
            record = Record(*row)
            jobs = await _jobs_of(conn, [record.sha256] if record.sha256 else [])
            return record, jobs.get(record.sha256 or "", {})

        return await self._read(snapshot, snapshot=True)

    async def search_with_jobs(
        self, query: ImageQuery, *, limit: int, after: tuple[str, str] | None = None
    ) -> tuple[list[Record], JobsByImage, list[tuple[str, str]]]:
        if query.sort == "relevance" and not query.words:
            raise ValueError("sort=relevance needs words")

        async def snapshot(
            conn: asyncpg.Connection,
        ) -> tuple[list[Record], JobsByImage, list[tuple[str, str]]]:
            tsquery = None
            if query.words:
                tsquery = await _search_tsquery(conn, query.words)
                if tsquery is None:  # a word without letters or digits matches nothing
                    return [], {}, []
            sql, params = _search_query(query, limit, after, tsquery)
            rows = await conn.fetch(sql, *params)
            records = [Record(*row[:_RECORD_FIELDS]) for row in rows]
            # A float key is written with repr(): it reads back as the same float.
            keys = [(repr(r[-1]) if isinstance(r[-1], float) else r[-1], r[0]) for r in rows]
            jobs = await _jobs_of(conn, [r.sha256 for r in records if r.sha256])
            return records, jobs, keys

        return await self._read(snapshot, snapshot=True)

    async def job_counts(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch(
            "SELECT kind, state, count(*) FROM jobs GROUP BY kind, state ORDER BY kind, state"
        )
        return {(kind, state): n for kind, state, n in rows}

    async def stats(self) -> Stats:
        async def snapshot(conn: asyncpg.Connection) -> Stats:
            row = await conn.fetchrow(
                "SELECT count(*) AS total,"
                " count(*) FILTER (WHERE status = 0) AS failed,"
                " avg(extract(epoch FROM end_time::timestamptz - start_time::timestamptz))"
                "   FILTER (WHERE status = 1 AND end_time IS NOT NULL)::float8 AS avg_s,"
                " count(*) FILTER (WHERE status = 1 AND end_time IS NULL) AS processing"
                " FROM stats"
            )
            jobs = await conn.fetch(
                "SELECT state, count(*) AS n FROM jobs GROUP BY state ORDER BY state"
            )
            return Stats(
                total=row["total"],
                failed=row["failed"],
                processing=row["processing"],
                average_processing_time_seconds=row["avg_s"],
                jobs={r["state"]: r["n"] for r in jobs},
            )

        return await self._read(snapshot, snapshot=True)

    # -- deleting ---------------------------------------------------------------------------

    async def delete_image(self, image_id: str) -> Deleted | None:
        """Removes the record; its metadata and jobs go with the last image of that sha256."""

        async def txn(tx: _Tx) -> Deleted | None:
            conn = tx.conn
            sha256 = await conn.fetchval(
                "SELECT metadata_sha256 FROM images WHERE image_id = $1", image_id
            )
            if sha256 is not None:
                await _lock_bytes(conn, [sha256])
            # Locked, then read again: a delete of the same image that got there first has
            # removed it (images rows never change otherwise).
            row = await conn.fetchrow(
                "SELECT image_path, metadata_sha256 FROM images WHERE image_id = $1 FOR UPDATE",
                image_id,
            )
            if row is None:
                return None
            original_key, sha256 = row
            tx.emit("image.deleted", image_id=image_id, state="deleted")
            await conn.execute("DELETE FROM stats WHERE image_id = $1", image_id)
            await conn.execute("DELETE FROM images WHERE image_id = $1", image_id)
            last = False
            if sha256 is not None:
                others = await conn.fetchval(
                    "SELECT 1 FROM images WHERE metadata_sha256 = $1 LIMIT 1", sha256
                )
                if others is None:
                    last = True
                    await conn.execute("DELETE FROM jobs WHERE sha256 = $1", sha256)
                    await conn.execute("DELETE FROM metadata WHERE sha256 = $1", sha256)
            return Deleted(original_key, sha256, last)

        return await self._write(txn)

    async def original_keys(self) -> set[str]:
        rows = await self._fetch("SELECT image_path FROM images WHERE image_path IS NOT NULL")
        return {r[0] for r in rows}

    async def original_hashes(self) -> dict[str, str]:
        rows = await self._fetch(
            "SELECT image_path, metadata_sha256 FROM images"
            " WHERE image_path IS NOT NULL AND metadata_sha256 IS NOT NULL"
        )
        return {r[0]: r[1] for r in rows}

    async def known_sha256s(self, sha256s: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(sha256s))

        async def read(conn: asyncpg.Connection) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(wanted), SHA_SLICE):
                rows = await conn.fetch(
                    "SELECT sha256 FROM metadata WHERE sha256 = ANY($1::text[])",
                    wanted[i : i + SHA_SLICE],
                )
                found.update(r[0] for r in rows)
            return found

        return await self._read(read) if wanted else set()

    async def original_of(self, sha256: str) -> str | None:
        """Any stored original of these bytes (every copy holds the same bytes)."""
        row = await self._fetchrow(
            "SELECT image_path FROM images WHERE metadata_sha256 = $1 AND image_path IS NOT NULL"
            " ORDER BY processed_at LIMIT 1",
            sha256,
        )
        return row[0] if row else None

    # -- access -----------------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        async def txn(tx: _Tx) -> None:
            conn = tx.conn
            row = await conn.fetchrow(
                "SELECT revoked_at FROM api_keys WHERE name = $1 FOR UPDATE", key.name
            )
            if row is not None and row[0] is None:
                raise KeyExists(key.name)
            await conn.execute("DELETE FROM api_keys WHERE name = $1", key.name)
            try:
                await conn.execute(
                    "INSERT INTO api_keys (name, key_id, token_hash, scopes, created_at)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    key.name,
                    key.key_id,
                    key.token_hash,
                    ",".join(key.scopes),
                    key.created_at,
                )
            except pgerr.UniqueViolationError as exc:
                # Another process created a key of this name since the check above.
                if exc.constraint_name == "api_keys_pkey":
                    raise KeyExists(key.name) from None
                raise

        await self._write(txn)

    async def list_keys(self) -> list[ApiKey]:
        return [_api_key(r) for r in await self._fetch(_KEY_SELECT + " ORDER BY name")]

    async def revoke_key(self, name: str, at: str) -> bool:
        async def txn(tx: _Tx) -> bool:
            done = await tx.conn.execute(
                "UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                at,
                name,
            )
            return _rowcount(done) == 1

        return await self._write(txn)

    async def active_keys(self) -> list[ApiKey]:
        rows = await self._fetch(_KEY_SELECT + " WHERE revoked_at IS NULL")
        return [_api_key(r) for r in rows]

    async def mark_keys_used(self, used: Mapping[str, str]) -> None:
        # In key_id order: two processes marking the same keys lock them in the same order.
        params = sorted((key_id, at) for key_id, at in used.items())

        async def txn(tx: _Tx) -> None:
            await tx.conn.executemany(
                "UPDATE api_keys SET last_used_at = $2 WHERE key_id = $1", params
            )

        if params:
            await self._write(txn)

    async def secret(self, name: str, make: Callable[[], str]) -> str:
        async def txn(tx: _Tx) -> str:
            # Another process making it at the same time: this insert waits for its commit,
            # then does nothing, and the read (a new snapshot) sees its value.
            await tx.conn.execute(
                "INSERT INTO secrets (name, value, created_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                name,
                make(),
                now_iso(),
            )
            return await tx.conn.fetchval("SELECT value FROM secrets WHERE name = $1", name)

        return await self._write(txn)

    async def delete_token_hash(self, image_id: str) -> str | None:
        row = await self._fetchrow(
            "SELECT token_hash FROM delete_tokens WHERE image_id = $1", image_id
        )
        return row[0] if row else None

    # -- jobs -------------------------------------------------------------------------------

    async def claim_job(self, sha256: str, kind: str, runner: str, lease_s: float) -> Job | None:
        """queued and due -> running, held by `runner` until its lease lapses.

        SKIP LOCKED: a job another runner is claiming right now is not waited for; it is theirs.
        A job whose runner vanished is not claimed here: release_lapsed() puts it back first,
        counting the lapse and backing off like any other retry."""

        async def txn(tx: _Tx) -> Job | None:
            now, stamp = time.time(), now_iso()
            attempts = await tx.conn.fetchval(
                "WITH claimed AS (SELECT sha256, kind FROM jobs"
                "   WHERE sha256 = $5 AND kind = $6 AND state = 'queued' AND run_after <= $7"
                "   FOR UPDATE SKIP LOCKED)"
                " UPDATE jobs SET state = 'running', attempts = attempts + 1, runner = $1,"
                " lease_until = $2, started_at = $3, updated_at = $4, error = NULL"
                " FROM claimed WHERE jobs.sha256 = claimed.sha256 AND jobs.kind = claimed.kind"
                " RETURNING attempts",
                runner,
                now + lease_s,
                stamp,
                stamp,
                sha256,
                kind,
                now,
            )
            if attempts is None:
                return None
            tx.emit("job.started", sha256=sha256, kind=kind, state="running")
            return Job(sha256, kind, attempts)

        return await self._write(txn)

    async def renew_leases(
        self, runner: str, jobs: Iterable[tuple[str, str]], lease_s: float
    ) -> int:
        """Extends the leases of the (sha256, kind) jobs this runner is running right now."""
        # Sorted: rows are locked in key order, as every statement that locks several does.
        wanted = sorted(set(jobs))
        until = time.time() + lease_s

        async def txn(tx: _Tx) -> int:
            renewed = 0
            for sha256, kind in wanted:
                done = await tx.conn.execute(
                    "UPDATE jobs SET lease_until = $1"
                    " WHERE sha256 = $2 AND kind = $3 AND state = 'running' AND runner = $4",
                    until,
                    sha256,
                    kind,
                    runner,
                )
                renewed += _rowcount(done)
            return renewed

        return await self._write(txn) if wanted else 0

    async def finish_job(
        self, sha256: str, kind: str, runner: str, state: str, error: str | None = None
    ) -> bool:
        """done/failed/skipped/unavailable; when it was the image's last open job, closes its
        stats rows.

        Returns False when the job was no longer held by `runner` (its lease lapsed and another
        runner took it over, or its image was deleted meanwhile)."""

        async def txn(tx: _Tx) -> bool:
            stamp = now_iso()
            await _lock_bytes(tx.conn, [sha256])
            done = await tx.conn.execute(
                "UPDATE jobs SET state = $1, error = $2, finished_at = $3, updated_at = $3,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = $4 AND kind = $5 AND state = 'running' AND runner = $6",
                state,
                error,
                stamp,
                sha256,
                kind,
                runner,
            )
            if _rowcount(done) == 0:
                return False
            await _jobs_finished(tx, [sha256], kind, state, error, stamp)
            return True

        return await self._write(txn)

    async def retry_job(
        self, sha256: str, kind: str, runner: str, error: str, delay_s: float
    ) -> bool:
        async def txn(tx: _Tx) -> bool:
            done = await tx.conn.execute(
                "UPDATE jobs SET state = 'queued', error = $1, run_after = $2, updated_at = $3,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = $4 AND kind = $5 AND state = 'running' AND runner = $6",
                error,
                time.time() + delay_s,
                now_iso(),
                sha256,
                kind,
                runner,
            )
            if _rowcount(done) == 0:
                return False
            tx.emit("job.queued", sha256=sha256, kind=kind, state="queued", error=error)
            return True

        return await self._write(txn)

    async def skip_queued(self, kind: str, reason: str) -> int:
        """Every queued job of `kind`, due or backing off, becomes skipped, in one transaction (a
        kind turned off, e.g. CAPTION_MODEL=none); uploads whose last open job that was close."""

        async def txn(tx: _Tx) -> int:
            conn, stamp = tx.conn, now_iso()
            candidates = await conn.fetch(
                "SELECT sha256 FROM jobs WHERE kind = $1 AND state = 'queued'", kind
            )
            locked = await _lock_bytes(conn, [r[0] for r in candidates])
            rows = await conn.fetch(
                "UPDATE jobs SET state = 'skipped', error = $1, finished_at = $2, updated_at = $2,"
                " lease_until = NULL, runner = NULL"
                " WHERE kind = $3 AND state = 'queued' AND sha256 = ANY($4::text[])"
                " RETURNING sha256",
                reason,
                stamp,
                kind,
                locked,
            )
            skipped = sorted(r[0] for r in rows)
            await _jobs_finished(tx, skipped, kind, "skipped", reason, stamp)
            return len(skipped)

        return await self._write(txn)

    async def requeue_jobs(
        self, kind: str, states: Iterable[str], sha256: str | None = None
    ) -> list[Job]:
        wanted = [state for state in states if state in FINISHED]
        if not wanted:
            return []

        async def txn(tx: _Tx) -> list[Job]:
            conn, stamp = tx.conn, now_iso()
            candidates = await conn.fetch(
                "SELECT sha256 FROM jobs WHERE kind = $1 AND state = ANY($2::text[])"
                " AND ($3::text IS NULL OR sha256 = $3)",
                kind,
                wanted,
                sha256,
            )
            locked = await _lock_bytes(conn, [r[0] for r in candidates])
            rows = await conn.fetch(
                "UPDATE jobs SET state = 'queued', attempts = 0, lapses = 0, error = NULL,"
                " run_after = 0, lease_until = NULL, runner = NULL, started_at = NULL,"
                " finished_at = NULL, updated_at = $1"
                " WHERE kind = $2 AND state = ANY($3::text[]) AND sha256 = ANY($4::text[])"
                " RETURNING sha256, kind, attempts",
                stamp,
                kind,
                wanted,
                locked,
            )
            jobs = sorted((Job(*row) for row in rows), key=lambda j: j.sha256)
            for job in jobs:
                tx.emit("job.queued", sha256=job.sha256, kind=kind, state="queued")
            # Their uploads are processing again: the stats rows close when these jobs finish.
            await conn.execute(
                "UPDATE stats SET end_time = NULL WHERE image_id IN"
                " (SELECT image_id FROM images WHERE metadata_sha256 = ANY($1::text[]))",
                [job.sha256 for job in jobs],
            )
            return jobs

        return await self._write(txn)

    async def due_jobs(self, limit: int, updated_before: str | None = None) -> list[Job]:
        """Queued jobs a runner may take now. `updated_before` keeps only jobs untouched since
        then (RFC 3339). SKIP LOCKED: a job some runner is claiming right now is not handed out
        again."""
        rows = await self._fetch(
            "SELECT sha256, kind, attempts FROM jobs"
            " WHERE state = 'queued' AND run_after <= $1"
            " AND ($2::text IS NULL OR updated_at < $2)"
            " ORDER BY run_after, created_at LIMIT $3 FOR UPDATE SKIP LOCKED",
            time.time(),
            updated_before,
            limit,
        )
        return [Job(r[0], r[1], r[2]) for r in rows]

    async def release_lapsed(
        self, max_attempts: int, backoff_s: Callable[[int], float]
    ) -> list[Job]:
        """running jobs whose runner vanished (lease lapsed) go back to queued after a backoff,
        or fail once they have used up their attempts: a file that kills its decoder (OOM, a
        crash in a native library) must not be handed out forever.

        Several sweepers may run at once (one per process): each takes the bytes, then the jobs,
        that no other holds (SKIP LOCKED), and checks again that the lease has lapsed."""

        async def txn(tx: _Tx) -> list[Job]:
            conn = tx.conn
            now, stamp = time.time(), now_iso()
            lapsed = await conn.fetch(
                "SELECT sha256, kind FROM jobs WHERE state = 'running' AND lease_until < $1"
                " ORDER BY sha256, kind",
                now,
            )
            locked = await _lock_bytes(conn, [r[0] for r in lapsed], skip_locked=True)
            requeued: list[Job] = []
            for sha256, kind in lapsed:
                if sha256 not in locked:
                    continue  # another transaction has these bytes: the next sweep looks again
                row = await conn.fetchrow(
                    "SELECT attempts, lapses FROM jobs WHERE sha256 = $1 AND kind = $2"
                    " AND state = 'running' AND lease_until < $3 FOR UPDATE SKIP LOCKED",
                    sha256,
                    kind,
                    now,
                )
                if row is None:  # renewed, finished or released meanwhile
                    continue
                attempts, lapses = row
                if attempts >= max_attempts:
                    error = (
                        f"the runner died {lapses + 1} times on this job"
                        f" (gave up after {attempts} attempts)"
                    )
                    await conn.execute(
                        "UPDATE jobs SET state = 'failed', error = $1, lapses = lapses + 1,"
                        " finished_at = $2, updated_at = $2, lease_until = NULL, runner = NULL"
                        " WHERE sha256 = $3 AND kind = $4",
                        error,
                        stamp,
                        sha256,
                        kind,
                    )
                    await _jobs_finished(tx, [sha256], kind, "failed", error, stamp)
                    continue
                await conn.execute(
                    "UPDATE jobs SET state = 'queued', lapses = lapses + 1, run_after = $1,"
                    " updated_at = $2, lease_until = NULL, runner = NULL,"
                    " error = 'runner vanished while running; handed out again'"
                    " WHERE sha256 = $3 AND kind = $4",
                    now + backoff_s(attempts),
                    stamp,
                    sha256,
                    kind,
                )
                tx.emit(
                    "job.queued",
                    sha256=sha256,
                    kind=kind,
                    state="queued",
                    error="runner vanished while running; handed out again",
                )
                requeued.append(Job(sha256, kind, attempts))
            return requeued

        return await self._write(txn)

    async def job_state(self, sha256: str, kind: str) -> JobState | None:
        row = await self._fetchrow(
            "SELECT kind, state, attempts, error, runner FROM jobs WHERE sha256 = $1 AND kind = $2",
            sha256,
            kind,
        )
        return JobState(*row) if row else None

    async def set_exif(self, sha256: str, exif_json: str) -> None:
        async def txn(tx: _Tx) -> None:
            await tx.conn.execute(
                "UPDATE metadata SET exif_json = $1 WHERE sha256 = $2", exif_json, sha256
            )

        await self._write(txn)

    async def set_caption(self, sha256: str, caption: str) -> None:
        async def txn(tx: _Tx) -> None:
            await tx.conn.execute(
                "UPDATE metadata SET caption = $1 WHERE sha256 = $2", caption, sha256
            )

        await self._write(txn)

    # -- webhook deliveries -----------------------------------------------------------------

    async def claim_deliveries(self, runner: str, limit: int, lease_s: float) -> list[Delivery]:
        async def txn(tx: _Tx) -> list[Delivery]:
            now = time.time()
            rows = await tx.conn.fetch(
                "WITH claimed AS (SELECT delivery_id FROM webhook_deliveries"
                "   WHERE (state = 'pending' AND next_attempt_at <= $4)"
                "      OR (state = 'delivering' AND lease_until < $4)"
                "   ORDER BY next_attempt_at, created_at LIMIT $5 FOR UPDATE SKIP LOCKED)"
                " UPDATE webhook_deliveries AS w SET state = 'delivering',"
                " attempts = attempts + 1, runner = $1, lease_until = $2, updated_at = $3"
                " FROM claimed WHERE w.delivery_id = claimed.delivery_id"
                " RETURNING " + _DELIVERY_COLUMNS_OF_W,
                runner,
                now + lease_s,
                now_iso(),
                now,
                limit,
            )
            return sorted((Delivery(*row) for row in rows), key=lambda d: d.event_id)

        return await self._write(txn)

    async def keep_delivery_body(self, delivery_id: str, runner: str, body: str) -> str | None:
        async def txn(tx: _Tx) -> str | None:
            row = await tx.conn.fetchrow(
                "UPDATE webhook_deliveries SET body = coalesce(body, $1)"
                " WHERE delivery_id = $2 AND runner = $3 AND state = 'delivering' RETURNING body",
                body,
                delivery_id,
                runner,
            )
            return row[0] if row else None

        return await self._write(txn)

    async def finish_delivery(
        self,
        delivery_id: str,
        runner: str,
        *,
        state: str,
        status: int | None,
        error: str | None,
        body: str,
        retry_at: float = 0.0,
    ) -> bool:
        async def txn(tx: _Tx) -> bool:
            stamp = now_iso()
            done = await tx.conn.execute(
                "UPDATE webhook_deliveries SET state = $1, last_status = $2, last_error = $3,"
                " body = coalesce(body, $4), next_attempt_at = $5, lease_until = NULL,"
                " runner = NULL, updated_at = $6,"
                " delivered_at = CASE WHEN $1 = 'delivered' THEN $6 END"
                " WHERE delivery_id = $7 AND runner = $8 AND state = 'delivering'",
                state,
                status,
                error,
                body,
                retry_at,
                stamp,
                delivery_id,
                runner,
            )
            return _rowcount(done) == 1

        return await self._write(txn)

    async def deliveries(
        self, *, state: str | None, limit: int, before: tuple[str, str] | None = None
    ) -> list[Delivery]:
        sql = "SELECT " + _DELIVERY_COLUMNS + " FROM webhook_deliveries WHERE true"
        params: list[Any] = []
        if state is not None:
            params.append(state)
            sql += f" AND state = ${len(params)}"
        if before is not None:
            params.extend(before)
            sql += f" AND (created_at, delivery_id) < (${len(params) - 1}, ${len(params)})"
        params.append(limit)
        sql += f" ORDER BY created_at DESC, delivery_id DESC LIMIT ${len(params)}"
        return [Delivery(*row) for row in await self._fetch(sql, *params)]

    async def requeue_deliveries(self, state: str = "failed") -> int:
        async def txn(tx: _Tx) -> int:
            done = await tx.conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,"
                " next_attempt_at = 0, updated_at = $1 WHERE state = $2",
                now_iso(),
                state,
            )
            return _rowcount(done)

        return await self._write(txn)


# -- statements and helpers -----------------------------------------------------------------------

# The transaction's events, in the order they were made; an event for some bytes becomes one row
# per upload of them (oldest upload first). Ids are assigned in this order.
_INSERT_EVENTS = (
    "INSERT INTO events (type, image_id, kind, state, error, created_at)"
    " SELECT e.type, coalesce(e.image_id, i.image_id), e.kind, e.state, e.error, e.created_at"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
    "   $7::text[]) WITH ORDINALITY AS e(type, image_id, sha256, kind, state, error, created_at, n)"
    " LEFT JOIN images i ON e.image_id IS NULL AND i.metadata_sha256 = e.sha256"
    " WHERE e.image_id IS NOT NULL OR i.image_id IS NOT NULL"
    " ORDER BY e.n, i.processed_at, i.image_id"
    " RETURNING id, type, image_id, kind, state, error, created_at"
)

_INSERT_DELIVERIES = (
    "INSERT INTO webhook_deliveries (delivery_id, event_id, event_type, image_id, url,"
    " event_json, created_at, updated_at)"
    " SELECT d.*, d.created_at FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[],"
    "   $5::text[], $6::text[], $7::text[])"
    "   AS d(delivery_id, event_id, event_type, image_id, url, event_json, created_at)"
)

# Its columns in the order of Delivery's fields.
_DELIVERY_COLUMNS = (
    "delivery_id, event_id, event_type, image_id, url, state, attempts, next_attempt_at,"
    " last_status, last_error, event_json, body, created_at, updated_at, delivered_at"
)
_DELIVERY_COLUMNS_OF_W = ", ".join("w." + c.strip() for c in _DELIVERY_COLUMNS.split(","))

_KEY_SELECT = (
    "SELECT name, key_id, token_hash, scopes, created_at, last_used_at, revoked_at FROM api_keys"
)


def _api_key(row: asyncpg.Record) -> ApiKey:
    name, key_id, token_hash, scopes, created, used, revoked = row
    return ApiKey(name, key_id, token_hash, tuple(scopes.split(",")), created, used, revoked)


# Its columns in the order of Record's fields.
_RECORD_COLUMNS = (
    "i.image_id, i.original_name, i.processed_at, i.error, i.image_path,"
    " i.metadata_sha256 AS sha256,"
    " m.width, m.height, m.format, m.size_bytes, m.first_upload, m.exif_json, m.caption,"
    " s.frames, s.orientation, f.taken_at"
)
_RECORD_JOINS = (
    " LEFT JOIN metadata m ON m.sha256 = i.metadata_sha256"
    " LEFT JOIN image_shape s ON s.sha256 = i.metadata_sha256"
    " LEFT JOIN photo_facts f ON f.sha256 = i.metadata_sha256"
)
_RECORD_SELECT = "SELECT " + _RECORD_COLUMNS + " FROM images i" + _RECORD_JOINS
_RECORD_FIELDS = len(fields(Record))

# ts_rank's weights of the fields (D, C, B, A: -, camera, caption, name): all alike, as FTS5's
# bm25() weighs its columns unless told otherwise.
_RANK_WEIGHTS = "'{1,1,1,1}'"


async def _lock_bytes(
    conn: asyncpg.Connection, sha256s: Iterable[str], *, skip_locked: bool = False
) -> set[str]:
    """Locks the metadata rows of these bytes, in sha256 order (so two transactions that lock
    several cannot deadlock); returns those locked (with skip_locked, those no one else held).

    FOR NO KEY UPDATE: it excludes every other transaction that changes the bytes' jobs or
    uploads (each locks this row first), not the foreign-key checks of rows that refer to it."""
    wanted = sorted(set(sha256s))
    if not wanted:
        return set()
    rows = await conn.fetch(
        "SELECT sha256 FROM metadata WHERE sha256 = ANY($1::text[])"
        " ORDER BY sha256 FOR NO KEY UPDATE" + (" SKIP LOCKED" if skip_locked else ""),
        wanted,
    )
    return {r[0] for r in rows}


async def _pending_jobs(conn: asyncpg.Connection, sha256: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE sha256 = $1 AND state IN ('queued', 'running')", sha256
    )


async def _jobs_finished(
    tx: _Tx,
    sha256s: Sequence[str],
    kind: str,
    state: str,
    error: str | None,
    stamp: str,
) -> None:
    """The events of a job of each of these bytes that ended (their metadata rows locked by the
    caller), and, for the bytes whose last open job it was, the end of their uploads' processing
    (stats rows closed, image.ready)."""
    if not sha256s:
        return
    conn = tx.conn
    ready = {
        r[0]
        for r in await conn.fetch(
            "SELECT b.sha256 FROM unnest($1::text[]) AS b(sha256) WHERE NOT EXISTS"
            " (SELECT 1 FROM jobs j WHERE j.sha256 = b.sha256"
            "  AND j.state IN ('queued', 'running'))",
            list(sha256s),
        )
    }
    if ready:
        await conn.execute(
            "UPDATE stats SET end_time = $1 WHERE end_time IS NULL AND image_id IN"
            " (SELECT image_id FROM images WHERE metadata_sha256 = ANY($2::text[]))",
            stamp,
            sorted(ready),
        )
    for sha256 in sha256s:
        event = "job.failed" if state == "failed" else "job.done"
        tx.emit(event, sha256=sha256, kind=kind, state=state, error=error)
        if sha256 in ready:
            tx.emit("image.ready", sha256=sha256, state="ready")


async def _jobs_of(conn: asyncpg.Connection, sha256s: Iterable[str]) -> JobsByImage:
    unique = sorted(set(sha256s))
    if not unique:
        return {}
    rows = await conn.fetch(
        "SELECT sha256, kind, state, attempts, error, runner FROM jobs"
        " WHERE sha256 = ANY($1::text[]) ORDER BY sha256, kind",
        unique,
    )
    out: JobsByImage = {}
    for sha256, kind, state, attempts, error, runner in rows:
        out.setdefault(sha256, {})[kind] = JobState(kind, state, attempts, error, runner)
    return out


def _quoted(lexeme: str) -> str:
    """A lexeme as a tsquery operand: quoted, so nothing in it is query syntax."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


async def _search_tsquery(conn: asyncpg.Connection, words: Sequence[str]) -> str | None:
    """The tsquery of SQLite's _match_expression: every word must match, each as a prefix; a word
    that the index splits in several ("p2.jpg") is a phrase within one field whose last part is
    a prefix. Its lexemes come from the function the index is built with. None when a word has
    none (only punctuation): FTS5 matches nothing then."""
    rows = await conn.fetch(
        "SELECT w.n, array_agg(v.lexeme ORDER BY p.pos) FILTER (WHERE v.lexeme IS NOT NULL)"
        " FROM unnest($1::text[]) WITH ORDINALITY AS w(word, n)"
        " LEFT JOIN LATERAL unnest(to_tsvector('simple', imgapi_search_text(w.word))) AS v"
        "   ON true"
        " LEFT JOIN LATERAL unnest(v.positions) AS p(pos) ON true"
        " GROUP BY w.n ORDER BY w.n",
        list(words),
    )
    parts: list[str] = []
    for _, lexemes in rows:
        if not lexemes:
            return None
        if len(lexemes) == 1:
            parts.append(_quoted(lexemes[0]) + ":*")
            continue
        # Weights: A name, B caption, C camera (postgres_schema, migration 5).
        phrases = [
            " <-> ".join(
                [_quoted(lx) + ":" + field for lx in lexemes[:-1]]
                + [_quoted(lexemes[-1]) + ":*" + field]
            )
            for field in "ABC"
        ]
        parts.append("(" + " | ".join(f"({p})" for p in phrases) + ")")
    return " & ".join(parts)


def _search_query(
    q: ImageQuery, limit: int, after: tuple[str, str] | None, tsquery: str | None
) -> tuple[str, list[Any]]:
    params: list[Any] = []

    def arg(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    where: list[str] = []
    if q.status == "success":
        where.append("i.error IS NULL")
    elif q.status == "failed":
        where.append("i.error IS NOT NULL")
    if q.format is not None:
        where.append(f"m.format = {arg(q.format)}")
    if q.camera is not None:
        # The make or the model, whole, in any case (SQLite: COLLATE NOCASE).
        camera = arg(q.camera)
        where.append(f"(lower(f.make) = lower({camera}) OR lower(f.model) = lower({camera}))")
    for column, op, value in (
        ("f.taken_at", ">=", q.taken_after),
        ("f.taken_at", "<", q.taken_before),
        ("i.processed_at", ">=", q.uploaded_after),
        ("i.processed_at", "<", q.uploaded_before),
    ):
        if value is not None:
            where.append(f"{column} {op} {arg(value)}")
    if q.has_gps is not None:
        where.append(f"coalesce(f.has_gps, false) = {arg(q.has_gps)}")
    source = " FROM images i" + _RECORD_JOINS
    match = ""
    if q.words:
        match = f"{arg(tsquery)}::text::tsquery"
        source = " FROM image_text t JOIN images i ON i.image_id = t.image_id" + _RECORD_JOINS
        where.append(f"t.document @@ {match}")

    if q.sort == "relevance":
        # ts_rank is higher for a better match; its negative sorts like bm25 (lower is better).
        key = f"(-ts_rank({_RANK_WEIGHTS}, t.document, {match}))::float8"
        if after is not None:
            where.append(f"({key}, i.image_id) > ({arg(float(after[0]))}::float8, {arg(after[1])})")
        direction = "ASC"
    else:
        key = "i.processed_at" if q.sort == "uploaded" else "coalesce(f.taken_at, '')"
        if after is not None:
            where.append(f"({key}, i.image_id) < ({arg(after[0])}, {arg(after[1])})")
        direction = "DESC"
    conditions = (" WHERE " + " AND ".join(where)) if where else ""
    order = f" ORDER BY {key} {direction}, i.image_id {direction} LIMIT {arg(limit)}"

    if q.sort == "uploaded" and not q.words:
        # Walked in the order of an index (images_newest or its partial twins): nothing sorted.
        return f"SELECT {_RECORD_COLUMNS}, {key} AS sort_key{source}{conditions}{order}", params
    # The page is chosen on narrow rows (id, key), and only its records are read whole.
    page = f"SELECT i.image_id AS iid, {key} AS sort_key{source}{conditions}{order}"
    sql = (
        f"SELECT {_RECORD_COLUMNS}, page.sort_key FROM ({page}) AS page"
        f" JOIN images i ON i.image_id = page.iid{_RECORD_JOINS}"
        f" ORDER BY page.sort_key {direction}, page.iid {direction}"
    )
    return sql, params
