"""The SQLite store: the schema, its numbered migrations, and every statement, in one place.

Each transaction is one synchronous function run on the writer connection's own thread, inside
BEGIN IMMEDIATE ... COMMIT (datasette's execute_write_fn). Nothing can split it: a cancelled caller
does not stop the function half way (it runs to COMMIT or ROLLBACK on its thread, and the caller
waits for that before its cancellation goes on), so the connection is never left inside a
transaction. Reads run the same way on a small pool of reader threads, each with its own
connection; WAL lets them read while the writer writes. Concurrent processes queue on the busy
timeout (IMMEDIATE takes the write lock up front instead of failing on upgrade).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

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
)
from imgapi_core.timestamps import now_iso

T = TypeVar("T")

BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: tuple[str, ...] = (
    # 1: the seed's three tables, column names unchanged, plus the jobs table of the design.
    """
    CREATE TABLE IF NOT EXISTS metadata (
      sha256 TEXT PRIMARY KEY,
      width INTEGER,
      height INTEGER,
      format TEXT,
      size_bytes INTEGER,
      first_upload TEXT DEFAULT (datetime('now')),
      exif_json TEXT,
      caption TEXT
    );
    CREATE TABLE IF NOT EXISTS images (
      image_id TEXT PRIMARY KEY,
      original_name TEXT NOT NULL,
      processed_at TEXT DEFAULT (datetime('now')),
      image_path TEXT,
      metadata_sha256 TEXT,
      error TEXT,
      FOREIGN KEY (metadata_sha256) REFERENCES metadata(sha256)
    );
    CREATE TABLE IF NOT EXISTS stats (
      image_id TEXT PRIMARY KEY,
      start_time TEXT DEFAULT (datetime('now')),
      end_time TEXT,
      status INTEGER NOT NULL,
      FOREIGN KEY (image_id) REFERENCES images(image_id) ON DELETE CASCADE
    );
    CREATE TABLE jobs (
      sha256 TEXT NOT NULL REFERENCES metadata(sha256) ON DELETE CASCADE,
      kind TEXT NOT NULL CHECK (kind IN ('thumbnail', 'exif', 'caption')),
      state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped')),
      attempts INTEGER NOT NULL DEFAULT 0,
      error TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      started_at TEXT,
      finished_at TEXT,
      run_after REAL NOT NULL DEFAULT 0,
      lease_until REAL,
      runner TEXT,
      PRIMARY KEY (sha256, kind)
    );
    """,
    # 2: the indexes that listing, filtering, joins and the job sweeper read through.
    """
    CREATE INDEX images_newest ON images (processed_at DESC, image_id DESC);
    CREATE INDEX images_ok_newest ON images (processed_at DESC, image_id DESC)
      WHERE error IS NULL;
    CREATE INDEX images_failed_newest ON images (processed_at DESC, image_id DESC)
      WHERE error IS NOT NULL;
    CREATE INDEX images_by_sha ON images (metadata_sha256);
    CREATE INDEX jobs_due ON jobs (state, run_after);
    CREATE INDEX stats_open ON stats (image_id) WHERE end_time IS NULL;
    """,
    # 3: rows a seed database wrote with datetime('now') ("2026-02-22 12:00:00", UTC without a
    # zone) become RFC 3339 UTC like every new row, so they sort and paginate by time.
    """
    UPDATE images SET processed_at = strftime('%Y-%m-%dT%H:%M:%fZ', processed_at)
      WHERE processed_at NOT LIKE '%Z';
    UPDATE metadata SET first_upload = strftime('%Y-%m-%dT%H:%M:%fZ', first_upload)
      WHERE first_upload NOT LIKE '%Z';
    UPDATE stats SET start_time = strftime('%Y-%m-%dT%H:%M:%fZ', start_time)
      WHERE start_time NOT LIKE '%Z';
    UPDATE stats SET end_time = strftime('%Y-%m-%dT%H:%M:%fZ', end_time)
      WHERE end_time NOT LIKE '%Z';
    """,
    # 4: how often a job's runner vanished while holding it (lease lapsed): those count against
    # JOB_MAX_ATTEMPTS like failures do.
    """
    ALTER TABLE jobs ADD COLUMN lapses INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: images.image_path held the original's server path (absolute, or relative to the working
    # folder of the process that stored it). It holds its storage key now, originals/{file name},
    # so moving MEDIA_DIR (or starting a worker elsewhere) keeps every original found.
    """
    UPDATE images
      -- the file name: what is left once rtrim() has taken the folder part off the end
      SET image_path = 'originals/' || replace(image_path,
        rtrim(image_path, replace(image_path, '/', '')), '')
      WHERE image_path IS NOT NULL AND image_path NOT LIKE 'originals/%';
    """,
    # 6: a database from the seed may hold uploads it never finished processing (its stats row
    # open, no jobs here to close it): they would count as processing for ever. Closed with no
    # duration, which leaves the average processing time as it was.
    """
    UPDATE stats SET end_time = start_time
      WHERE end_time IS NULL AND image_id IN (
        SELECT i.image_id FROM images i
          WHERE i.metadata_sha256 IS NULL
             OR NOT EXISTS (SELECT 1 FROM jobs j WHERE j.sha256 = i.metadata_sha256));
    """,
    # 7: access control. Keys are kept as the SHA-256 of their token, never the token; the upload's
    # delete token likewise. Secrets: the URL-signing key, made once.
    """
    CREATE TABLE api_keys (
      name TEXT PRIMARY KEY,
      key_id TEXT NOT NULL UNIQUE,
      token_hash TEXT NOT NULL,
      scopes TEXT NOT NULL,
      created_at TEXT NOT NULL,
      last_used_at TEXT,
      revoked_at TEXT
    );
    CREATE TABLE secrets (
      name TEXT PRIMARY KEY,
      value TEXT NOT NULL,
      created_at TEXT NOT NULL
    );
    CREATE TABLE delete_tokens (
      image_id TEXT PRIMARY KEY REFERENCES images(image_id) ON DELETE CASCADE,
      token_hash TEXT NOT NULL
    );
    """,
    # 8: frames (animations, TIFF pages, HEIF images) and the EXIF orientation of each image's
    # bytes, beside the seed's metadata table rather than in it. Images stored before are stills;
    # their orientation comes from the EXIF the job read (1 where it has not run or has none).
    """
    CREATE TABLE image_shape (
      sha256 TEXT PRIMARY KEY REFERENCES metadata(sha256) ON DELETE CASCADE,
      frames INTEGER NOT NULL DEFAULT 1,
      orientation INTEGER NOT NULL DEFAULT 1
    );
    INSERT INTO image_shape (sha256, frames, orientation)
      SELECT sha256, 1,
        CASE WHEN json_valid(exif_json)
              AND json_type(exif_json, '$.Orientation') = 'integer'
              AND json_extract(exif_json, '$.Orientation') BETWEEN 1 AND 8
          THEN json_extract(exif_json, '$.Orientation') ELSE 1 END
      FROM metadata;
    """,
    # 9: events. The jobs table is rebuilt (SQLite cannot change a CHECK) to allow the state
    # 'unavailable'; the event log and webhook deliveries are written in the transaction of the
    # state change they describe. Deliveries carry their event, since events are pruned.
    """
    CREATE TABLE jobs_v9 (
      sha256 TEXT NOT NULL REFERENCES metadata(sha256) ON DELETE CASCADE,
      kind TEXT NOT NULL CHECK (kind IN ('thumbnail', 'exif', 'caption')),
      state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'skipped', 'unavailable')),
      attempts INTEGER NOT NULL DEFAULT 0,
      error TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      started_at TEXT,
      finished_at TEXT,
      run_after REAL NOT NULL DEFAULT 0,
      lease_until REAL,
      runner TEXT,
      lapses INTEGER NOT NULL DEFAULT 0,
      PRIMARY KEY (sha256, kind)
    );
    INSERT INTO jobs_v9 (sha256, kind, state, attempts, error, created_at, updated_at,
        started_at, finished_at, run_after, lease_until, runner, lapses)
      SELECT sha256, kind, state, attempts, error, created_at, updated_at,
        started_at, finished_at, run_after, lease_until, runner, lapses FROM jobs;
    DROP TABLE jobs;
    ALTER TABLE jobs_v9 RENAME TO jobs;
    CREATE INDEX jobs_due ON jobs (state, run_after);
    CREATE TABLE events (
      id INTEGER PRIMARY KEY AUTOINCREMENT,
      type TEXT NOT NULL,
      image_id TEXT NOT NULL,
      kind TEXT,
      state TEXT,
      error TEXT,
      created_at TEXT NOT NULL
    );
    CREATE INDEX events_by_time ON events (created_at);
    CREATE TABLE webhook_deliveries (
      delivery_id TEXT PRIMARY KEY,
      event_id INTEGER NOT NULL,
      event_type TEXT NOT NULL,
      image_id TEXT NOT NULL,
      url TEXT NOT NULL,
      state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'delivering', 'delivered', 'failed')),
      attempts INTEGER NOT NULL DEFAULT 0,
      next_attempt_at REAL NOT NULL DEFAULT 0,
      lease_until REAL,
      runner TEXT,
      last_status INTEGER,
      last_error TEXT,
      event_json TEXT NOT NULL,
      body TEXT,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      delivered_at TEXT
    );
    CREATE INDEX deliveries_due ON webhook_deliveries (state, next_attempt_at);
    CREATE INDEX deliveries_newest ON webhook_deliveries (created_at DESC, delivery_id DESC);
    """,
    # 10: search. photo_facts holds what filters read from the EXIF (the date taken, on the camera's
    # clock, as YYYY-MM-DDTHH:MM:SS; make, model, lens; GPS), each indexed; image_text is the
    # full-text index of each upload (its name, its caption, its camera), rowid = images.rowid.
    # Triggers keep both right in the transaction of every change of their sources; the images
    # already there are indexed by the same triggers (a no-op update of their sources).
    """
    CREATE TABLE photo_facts (
      sha256 TEXT PRIMARY KEY REFERENCES metadata(sha256) ON DELETE CASCADE,
      taken_at TEXT,
      make TEXT,
      model TEXT,
      lens TEXT,
      has_gps INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX photo_facts_taken ON photo_facts (taken_at);
    CREATE INDEX photo_facts_make ON photo_facts (make COLLATE NOCASE);
    CREATE INDEX photo_facts_model ON photo_facts (model COLLATE NOCASE);
    CREATE VIRTUAL TABLE image_text USING fts5(
      original_name, caption, camera,
      tokenize = "unicode61 remove_diacritics 2", prefix = '2 3 4'
    );
    CREATE TRIGGER metadata_facts AFTER UPDATE OF exif_json ON metadata
    WHEN json_valid(new.exif_json)
    BEGIN
      INSERT OR REPLACE INTO photo_facts (sha256, taken_at, make, model, lens, has_gps)
      SELECT new.sha256,
        CASE WHEN d GLOB
            '[0-9][0-9][0-9][0-9]:[0-9][0-9]:[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]*'
          THEN substr(d, 1, 4) || '-' || substr(d, 6, 2) || '-' || substr(d, 9, 2) || 'T'
            || substr(d, 12, 8) END,
        nullif(trim(json_extract(new.exif_json, '$.Make')), ''),
        nullif(trim(json_extract(new.exif_json, '$.Model')), ''),
        nullif(trim(json_extract(new.exif_json, '$.LensModel')), ''),
        json_type(new.exif_json, '$.latitude') IS NOT NULL
          AND json_type(new.exif_json, '$.longitude') IS NOT NULL
      FROM (SELECT CAST(coalesce(json_extract(new.exif_json, '$.DateTimeOriginal'),
                                 json_extract(new.exif_json, '$.DateTime')) AS TEXT) AS d);
      UPDATE image_text SET camera = (
          SELECT trim(coalesce(make, '') || ' ' || coalesce(model, '') || ' ' || coalesce(lens, ''))
          FROM photo_facts WHERE sha256 = new.sha256)
        WHERE rowid IN (SELECT rowid FROM images WHERE metadata_sha256 = new.sha256);
    END;
    CREATE TRIGGER metadata_caption_text AFTER UPDATE OF caption ON metadata
    BEGIN
      UPDATE image_text SET caption = new.caption
        WHERE rowid IN (SELECT rowid FROM images WHERE metadata_sha256 = new.sha256);
    END;
    CREATE TRIGGER images_text_insert AFTER INSERT ON images
    BEGIN
      INSERT INTO image_text (rowid, original_name, caption, camera)
      SELECT new.rowid, new.original_name, m.caption,
        (SELECT trim(coalesce(make, '') || ' ' || coalesce(model, '') || ' '
                     || coalesce(lens, '')) FROM photo_facts WHERE sha256 = new.metadata_sha256)
      FROM (SELECT 1) LEFT JOIN metadata m ON m.sha256 = new.metadata_sha256;
    END;
    CREATE TRIGGER images_text_delete AFTER DELETE ON images
    BEGIN
      DELETE FROM image_text WHERE rowid = old.rowid;
    END;
    INSERT INTO image_text (rowid, original_name) SELECT rowid, original_name FROM images;
    UPDATE metadata SET caption = caption WHERE caption IS NOT NULL;
    UPDATE metadata SET exif_json = exif_json WHERE exif_json IS NOT NULL;
    """,
)


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module opens no transactions of its own; ours are explicit.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _retry_locked(conn: sqlite3.Connection, sql: str) -> None:
    """Runs `sql`, retrying "database is locked" for up to the busy timeout.

    The busy timeout makes SQLite wait for locks, but not in every case: while another process
    switches a new file to WAL (or recovers its WAL index) SQLite answers SQLITE_BUSY at once.
    Processes that open a fresh database together meet exactly that."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute(sql).fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    _retry_locked(conn, "BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _in_snapshot(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Every SELECT of `fn` sees the same committed state."""
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _probe_write(conn: sqlite3.Connection) -> None:
    """A real write, rolled back: BEGIN IMMEDIATE alone succeeds on a read-only file."""
    _retry_locked(conn, "BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (-1, 'write probe')"
        )
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_READONLY" or "readonly" in str(exc):
            raise NotWritable(f"the database is read-only: {exc}") from None
        raise
    finally:
        conn.execute("ROLLBACK")


async def _settled(future: concurrent.futures.Future[T]) -> T:
    """Awaits a database call that must not be split by a cancellation.

    Cancelled before its thread took it up, it never runs. Cancelled while it runs, it runs to its
    end (COMMIT or ROLLBACK) and the cancellation is re-raised only then, so whatever the caller
    does next (remove a file, record a failure) sees the database as the call left it."""
    waiter = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waiter)
    except asyncio.CancelledError:
        if future.cancel():
            raise
        while not waiter.done():
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise


class SqliteStore:
    def __init__(
        self, path: str | Path, readers: int = 2, webhook_urls: Sequence[str] = ()
    ) -> None:
        self.path = str(path)
        self.webhook_urls = tuple(webhook_urls)
        self._listeners: list[Callable[[int], None]] = []
        self._reader_count = readers
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._connections: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    # -- connections ------------------------------------------------------------------------

    def _thread_connection(self) -> sqlite3.Connection:
        """This thread's own connection (each writer and reader thread opens one)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs fn(conn) as one transaction on the writer thread; its result, or its error."""
        if self._writer is None:
            raise RuntimeError("store is closed")
        return await _settled(self._writer.submit(self._run_write, fn))

    def _run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._local.last_event = 0
        result = _in_transaction(self._thread_connection(), fn)
        # Told here, on the writer thread, once committed: a caller cancelled meanwhile must not
        # keep the listeners from hearing of events that are in the database.
        last_event, self._local.last_event = self._local.last_event, 0
        if last_event:
            for listener in self._listeners:
                listener(last_event)
        return result

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def _emit(
        self,
        conn: sqlite3.Connection,
        type_: str,
        *,
        image_id: str | None = None,
        sha256: str | None = None,
        kind: str | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> None:
        """Writes an event, in the caller's transaction, for one image, or for every image of
        `sha256` (jobs belong to the bytes; events to the uploads that share them)."""
        stamp = now_iso()
        if image_id is not None:
            rows = conn.execute(
                "INSERT INTO events (type, image_id, kind, state, error, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) RETURNING id, image_id",
                (type_, image_id, kind, state, error, stamp),
            ).fetchall()
        else:
            rows = conn.execute(
                "INSERT INTO events (type, image_id, kind, state, error, created_at)"
                " SELECT ?, image_id, ?, ?, ?, ? FROM images WHERE metadata_sha256 = ?"
                " ORDER BY processed_at, image_id RETURNING id, image_id",
                (type_, kind, state, error, stamp, sha256),
            ).fetchall()
        if not rows:
            return
        self._local.last_event = max(self._local.last_event, max(r[0] for r in rows))
        if type_ not in WEBHOOK_EVENTS or not self.webhook_urls:
            return
        conn.executemany(
            "INSERT INTO webhook_deliveries (delivery_id, event_id, event_type, image_id, url,"
            " event_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    str(uuid.uuid4()),
                    event_id,
                    type_,
                    event_image,
                    url,
                    json.dumps(
                        Event(event_id, type_, event_image, kind, state, error, stamp).as_json()
                    ),
                    stamp,
                    stamp,
                )
                for event_id, event_image in rows
                for url in self.webhook_urls
            ],
        )

    def _job_finished(
        self,
        conn: sqlite3.Connection,
        sha256: str,
        kind: str,
        state: str,
        error: str | None,
        stamp: str,
    ) -> None:
        """The events of a job that ended, and, when it was the last open one of its bytes, the
        end of its uploads' processing (stats rows closed, image.ready)."""
        self._emit(
            conn,
            "job.failed" if state == "failed" else "job.done",
            sha256=sha256,
            kind=kind,
            state=state,
            error=error,
        )
        if _pending_jobs(conn, sha256):
            return
        conn.execute(
            "UPDATE stats SET end_time = ? WHERE end_time IS NULL AND image_id IN"
            " (SELECT image_id FROM images WHERE metadata_sha256 = ?)",
            (stamp, sha256),
        )
        self._emit(conn, "image.ready", sha256=sha256, state="ready")

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs fn(conn) in one read snapshot on a reader thread."""
        if self._readers is None:
            raise RuntimeError("store is closed")
        return await _settled(
            self._readers.submit(lambda: _in_snapshot(self._thread_connection(), fn))
        )

    async def open(self) -> SqliteStore:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="imgapi-db-w")
        self._readers = concurrent.futures.ThreadPoolExecutor(
            self._reader_count, thread_name_prefix="imgapi-db-r"
        )
        try:
            await _settled(self._writer.submit(self._prepare))
            await self.check_writable()
        except BaseException:
            # Threads that hold connections would keep the process alive after a failed start.
            await self.close()
            raise
        return self

    def _prepare(self) -> None:
        conn = self._thread_connection()
        _retry_locked(conn, "PRAGMA journal_mode = WAL")
        _migrate(conn)

    async def check_writable(self) -> None:
        """Raises NotWritable when a write would fail; `/healthz` and start-up ask."""
        if self._writer is None:
            raise RuntimeError("store is closed")
        # Not _settled: a caller that stops waiting (a health check's timeout) leaves the probe to
        # roll itself back on its thread; nothing depends on its outcome.
        await asyncio.wrap_future(
            self._writer.submit(lambda: _probe_write(self._thread_connection()))
        )

    async def close(self) -> None:
        """Waits for the running calls, then closes every connection; safe to call twice."""
        executors = [e for e in (self._writer, self._readers) if e is not None]
        self._writer = self._readers = None
        for executor in executors:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    async def ping(self) -> None:
        await self.read(lambda conn: conn.execute("SELECT 1").fetchall())

    # -- uploads ----------------------------------------------------------------------------

    async def record_success(self, upload: NewUpload) -> bool:
        """Metadata (first upload of these bytes wins), images, stats and jobs rows at once.
        Returns True when jobs must be dispatched (one is still queued for this sha256)."""
        u = upload

        def txn(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT INTO metadata (sha256, width, height, format, size_bytes, first_upload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (u.sha256, u.width, u.height, u.format, u.size_bytes, u.processed_at),
            )
            conn.execute(
                "INSERT INTO image_shape (sha256, frames, orientation) VALUES (?, ?, ?)"
                " ON CONFLICT (sha256) DO NOTHING",
                (u.sha256, u.frames, u.orientation),
            )
            conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES (?, ?, ?, ?, ?, NULL)",
                (u.image_id, u.original_name, u.processed_at, u.original_key, u.sha256),
            )
            conn.executemany(
                "INSERT INTO jobs (sha256, kind, state, error, created_at, updated_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256, kind) DO NOTHING",
                [
                    (
                        u.sha256,
                        kind,
                        state,
                        note,
                        u.processed_at,
                        u.processed_at,
                        u.processed_at if state in FINISHED else None,
                    )
                    for kind, (state, note) in u.jobs.items()
                ],
            )
            if u.delete_token_hash is not None:
                conn.execute(
                    "INSERT INTO delete_tokens (image_id, token_hash) VALUES (?, ?)",
                    (u.image_id, u.delete_token_hash),
                )
            pending = _pending_jobs(conn, u.sha256)
            conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, 1)",
                (u.image_id, u.start_time, None if pending else now_iso()),
            )
            self._emit(conn, "image.uploaded", image_id=u.image_id, state="success")
            if not pending:  # the same bytes again, their jobs long finished
                self._emit(conn, "image.ready", image_id=u.image_id, state="ready")
            return pending > 0

        return await self.write(txn)

    async def record_failure(
        self, *, image_id: str, original_name: str, processed_at: str, start_time: str, error: str
    ) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES (?, ?, ?, NULL, NULL, ?)",
                (image_id, original_name, processed_at, error),
            )
            conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, 0)",
                (image_id, start_time, processed_at),
            )
            self._emit(conn, "image.uploaded", image_id=image_id, state="failed", error=error)

        await self.write(txn)

    async def known_image(self, sha256: str) -> KnownImage | None:
        """The stored metadata of these bytes when an earlier upload of them succeeded."""
        row = await self._fetchone(
            "SELECT m.sha256, m.width, m.height, m.format,"
            " coalesce(s.frames, 1), coalesce(s.orientation, 1)"
            " FROM metadata m LEFT JOIN image_shape s ON s.sha256 = m.sha256"
            " WHERE m.sha256 = ?",
            (sha256,),
        )
        return KnownImage(*row) if row else None

    # -- reading records --------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return await self.read(lambda conn: conn.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    async def get_record(self, image_id: str) -> Record | None:
        row = await self._fetchone(_RECORD_SELECT + " WHERE i.image_id = ?", (image_id,))
        return Record(*row) if row else None

    # A record and its job states are read in one snapshot: read apart, a job could show "done"
    # while its result (EXIF, caption) still read as missing.

    async def record_with_jobs(self, image_id: str) -> tuple[Record | None, dict[str, JobState]]:
        def snapshot(conn: sqlite3.Connection) -> tuple[Record | None, dict[str, JobState]]:
            row = conn.execute(_RECORD_SELECT + " WHERE i.image_id = ?", (image_id,)).fetchone()
            if row is None:
                return None, {}
            record = Record(*row)
            jobs = _jobs_of(conn, [record.sha256] if record.sha256 else [])
            return record, jobs.get(record.sha256 or "", {})

        return await self.read(snapshot)

    async def search_with_jobs(
        self, query: ImageQuery, *, limit: int, after: tuple[str, str] | None = None
    ) -> tuple[list[Record], JobsByImage, list[tuple[str, str]]]:
        sql, params = _search_query(query, limit, after)

        def snapshot(
            conn: sqlite3.Connection,
        ) -> tuple[list[Record], JobsByImage, list[tuple[str, str]]]:
            rows = conn.execute(sql, params).fetchall()
            records = [Record(*row[:_RECORD_FIELDS]) for row in rows]
            # A float key is written with repr(): it reads back as the same float.
            keys = [(repr(r[-1]) if isinstance(r[-1], float) else r[-1], r[0]) for r in rows]
            return records, _jobs_of(conn, [r.sha256 for r in records if r.sha256]), keys

        return await self.read(snapshot)

    async def job_counts(self) -> dict[tuple[str, str], int]:
        rows = await self._fetchall("SELECT kind, state, count(*) FROM jobs GROUP BY kind, state")
        return {(kind, state): n for kind, state, n in rows}

    async def stats(self) -> Stats:
        def snapshot(conn: sqlite3.Connection) -> Stats:
            row = conn.execute(
                "SELECT count(*) AS total,"
                " coalesce(sum(status = 0), 0) AS failed,"
                " avg(CASE WHEN status = 1 AND end_time IS NOT NULL"
                "     THEN (julianday(end_time) - julianday(start_time)) * 86400.0 END) AS avg_s,"
                " coalesce(sum(status = 1 AND end_time IS NULL), 0) AS processing"
                " FROM stats"
            ).fetchone()
            jobs = conn.execute("SELECT state, count(*) AS n FROM jobs GROUP BY state").fetchall()
            return Stats(
                total=row["total"],
                failed=row["failed"],
                processing=row["processing"],
                average_processing_time_seconds=row["avg_s"],
                jobs={r["state"]: r["n"] for r in jobs},
            )

        return await self.read(snapshot)

    # -- deleting ---------------------------------------------------------------------------

    async def delete_image(self, image_id: str) -> Deleted | None:
        """Removes the record; its metadata and jobs go with the last image of that sha256."""

        def txn(conn: sqlite3.Connection) -> Deleted | None:
            row = conn.execute(
                "SELECT image_path, metadata_sha256 FROM images WHERE image_id = ?", (image_id,)
            ).fetchone()
            if row is None:
                return None
            original_key, sha256 = row
            self._emit(conn, "image.deleted", image_id=image_id, state="deleted")
            conn.execute("DELETE FROM stats WHERE image_id = ?", (image_id,))
            conn.execute("DELETE FROM images WHERE image_id = ?", (image_id,))
            last = False
            if sha256 is not None:
                others = conn.execute(
                    "SELECT 1 FROM images WHERE metadata_sha256 = ? LIMIT 1", (sha256,)
                ).fetchone()
                if others is None:
                    last = True
                    conn.execute("DELETE FROM jobs WHERE sha256 = ?", (sha256,))
                    conn.execute("DELETE FROM metadata WHERE sha256 = ?", (sha256,))
            return Deleted(original_key, sha256, last)

        return await self.write(txn)

    async def original_keys(self) -> set[str]:
        rows = await self._fetchall("SELECT image_path FROM images WHERE image_path IS NOT NULL")
        return {r[0] for r in rows}

    async def original_hashes(self) -> dict[str, str]:
        rows = await self._fetchall(
            "SELECT image_path, sha256 FROM images WHERE image_path IS NOT NULL"
        )
        return {r[0]: r[1] for r in rows}

    async def known_sha256s(self, sha256s: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(sha256s))
        found: set[str] = set()
        # In slices: SQLite caps the number of host parameters of one statement.
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            rows = await self._fetchall(
                f"SELECT sha256 FROM metadata WHERE sha256 IN ({','.join('?' * len(part))})", part
            )
            found.update(r[0] for r in rows)
        return found

    async def original_of(self, sha256: str) -> str | None:
        """Any stored original of these bytes (every copy holds the same bytes)."""
        row = await self._fetchone(
            "SELECT image_path FROM images WHERE metadata_sha256 = ? AND image_path IS NOT NULL"
            " ORDER BY processed_at LIMIT 1",
            (sha256,),
        )
        return row[0] if row else None

    # -- access -----------------------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT revoked_at FROM api_keys WHERE name = ?", (key.name,)
            ).fetchone()
            if row is not None and row[0] is None:
                raise KeyExists(key.name)
            conn.execute("DELETE FROM api_keys WHERE name = ?", (key.name,))
            conn.execute(
                "INSERT INTO api_keys (name, key_id, token_hash, scopes, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key.name, key.key_id, key.token_hash, ",".join(key.scopes), key.created_at),
            )

        await self.write(txn)

    async def list_keys(self) -> list[ApiKey]:
        return [_api_key(r) for r in await self._fetchall(_KEY_SELECT + " ORDER BY name")]

    async def revoke_key(self, name: str, at: str) -> bool:
        def txn(conn: sqlite3.Connection) -> bool:
            done = conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (at, name),
            )
            return done.rowcount == 1

        return await self.write(txn)

    async def active_keys(self) -> list[ApiKey]:
        rows = await self._fetchall(_KEY_SELECT + " WHERE revoked_at IS NULL")
        return [_api_key(r) for r in rows]

    async def mark_keys_used(self, used: Mapping[str, str]) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE key_id = ?",
                [(at, key_id) for key_id, at in used.items()],
            )

        if used:
            await self.write(txn)

    async def secret(self, name: str, make: Callable[[], str]) -> str:
        def txn(conn: sqlite3.Connection) -> str:
            conn.execute(
                "INSERT INTO secrets (name, value, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, make(), now_iso()),
            )
            return conn.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0]

        return await self.write(txn)

    async def delete_token_hash(self, image_id: str) -> str | None:
        row = await self._fetchone(
            "SELECT token_hash FROM delete_tokens WHERE image_id = ?", (image_id,)
        )
        return row[0] if row else None

    # -- jobs -------------------------------------------------------------------------------

    async def claim_job(self, sha256: str, kind: str, runner: str, lease_s: float) -> Job | None:
        """queued and due -> running, held by `runner` until its lease lapses.

        A job whose runner vanished is not claimed here: release_lapsed() puts it back first,
        counting the lapse and backing off like any other retry."""

        def txn(conn: sqlite3.Connection) -> Job | None:
            now, stamp = time.time(), now_iso()
            row = conn.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, runner = ?,"
                " lease_until = ?, started_at = ?, updated_at = ?, error = NULL"
                " WHERE sha256 = ? AND kind = ? AND state = 'queued' AND run_after <= ?"
                " RETURNING attempts",
                (runner, now + lease_s, stamp, stamp, sha256, kind, now),
            ).fetchone()
            if row is None:
                return None
            self._emit(conn, "job.started", sha256=sha256, kind=kind, state="running")
            return Job(sha256, kind, row[0])

        return await self.write(txn)

    async def renew_leases(
        self, runner: str, jobs: Iterable[tuple[str, str]], lease_s: float
    ) -> int:
        """Extends the leases of the (sha256, kind) jobs this runner is running right now."""
        params = [(time.time() + lease_s, sha256, kind, runner) for sha256, kind in jobs]

        def txn(conn: sqlite3.Connection) -> int:
            cur = conn.executemany(
                "UPDATE jobs SET lease_until = ?"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                params,
            )
            return cur.rowcount

        return await self.write(txn)

    async def finish_job(
        self, sha256: str, kind: str, runner: str, state: str, error: str | None = None
    ) -> bool:
        """done/failed/skipped; when it was the image's last open job, closes its stats rows.

        Returns False when the job was no longer held by `runner` (its lease lapsed and another
        runner took it over, or its image was deleted meanwhile)."""

        def txn(conn: sqlite3.Connection) -> bool:
            stamp = now_iso()
            cur = conn.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                (state, error, stamp, stamp, sha256, kind, runner),
            )
            if cur.rowcount == 0:
                return False
            self._job_finished(conn, sha256, kind, state, error, stamp)
            return True

        return await self.write(txn)

    async def retry_job(
        self, sha256: str, kind: str, runner: str, error: str, delay_s: float
    ) -> bool:
        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE jobs SET state = 'queued', error = ?, run_after = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                (error, time.time() + delay_s, now_iso(), sha256, kind, runner),
            )
            if cur.rowcount == 0:
                return False
            self._emit(conn, "job.queued", sha256=sha256, kind=kind, state="queued", error=error)
            return True

        return await self.write(txn)

    async def skip_queued(self, kind: str, reason: str) -> int:
        """Every queued job of `kind`, due or backing off, becomes skipped, in one statement (a
        kind turned off, e.g. CAPTION_MODEL=none); uploads whose last open job that was close."""

        def txn(conn: sqlite3.Connection) -> int:
            stamp = now_iso()
            skipped = conn.execute(
                "UPDATE jobs SET state = 'skipped', error = ?, finished_at = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL WHERE kind = ? AND state = 'queued'"
                " RETURNING sha256",
                (reason, stamp, stamp, kind),
            ).fetchall()
            for (sha256,) in skipped:
                self._job_finished(conn, sha256, kind, "skipped", reason, stamp)
            return len(skipped)

        return await self.write(txn)

    async def requeue_jobs(
        self, kind: str, states: Iterable[str], sha256: str | None = None
    ) -> list[Job]:
        wanted = [state for state in states if state in FINISHED]
        if not wanted:
            return []

        def txn(conn: sqlite3.Connection) -> list[Job]:
            stamp = now_iso()
            sql = (
                "UPDATE jobs SET state = 'queued', attempts = 0, lapses = 0, error = NULL,"
                " run_after = 0, lease_until = NULL, runner = NULL, started_at = NULL,"
                " finished_at = NULL, updated_at = ?"
                f" WHERE kind = ? AND state IN ({','.join('?' * len(wanted))})"
            )
            params: list[Any] = [stamp, kind, *wanted]
            if sha256 is not None:
                sql += " AND sha256 = ?"
                params.append(sha256)
            jobs = [
                Job(*row) for row in conn.execute(sql + " RETURNING sha256, kind, attempts", params)
            ]
            for job in jobs:
                self._emit(conn, "job.queued", sha256=job.sha256, kind=kind, state="queued")
            # Their uploads are processing again: the stats rows close when these jobs finish.
            conn.executemany(
                "UPDATE stats SET end_time = NULL WHERE image_id IN"
                " (SELECT image_id FROM images WHERE metadata_sha256 = ?)",
                [(job.sha256,) for job in jobs],
            )
            return jobs

        return await self.write(txn)

    async def due_jobs(self, limit: int, updated_before: str | None = None) -> list[Job]:
        """Queued jobs a runner may take now. `updated_before` keeps only jobs untouched since
        then (RFC 3339)."""
        sql = "SELECT sha256, kind, attempts FROM jobs WHERE state = 'queued' AND run_after <= ?"
        params: list[Any] = [time.time()]
        if updated_before is not None:
            sql += " AND updated_at < ?"
            params.append(updated_before)
        sql += " ORDER BY run_after, created_at LIMIT ?"
        params.append(limit)
        rows = await self._fetchall(sql, params)
        return [Job(r[0], r[1], r[2]) for r in rows]

    async def release_lapsed(
        self, max_attempts: int, backoff_s: Callable[[int], float]
    ) -> list[Job]:
        """running jobs whose runner vanished (lease lapsed) go back to queued after a backoff,
        or fail once they have used up their attempts: a file that kills its decoder (OOM, a
        crash in a native library) must not be handed out forever."""

        def txn(conn: sqlite3.Connection) -> list[Job]:
            now, stamp = time.time(), now_iso()
            lapsed = conn.execute(
                "SELECT sha256, kind, attempts, lapses FROM jobs"
                " WHERE state = 'running' AND lease_until < ?",
                (now,),
            ).fetchall()
            requeued: list[Job] = []
            for sha256, kind, attempts, lapses in lapsed:
                if attempts >= max_attempts:
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', error = ?, lapses = lapses + 1,"
                        " finished_at = ?, updated_at = ?, lease_until = NULL, runner = NULL"
                        " WHERE sha256 = ? AND kind = ?",
                        (
                            f"the runner died {lapses + 1} times on this job"
                            f" (gave up after {attempts} attempts)",
                            stamp,
                            stamp,
                            sha256,
                            kind,
                        ),
                    )
                    error = conn.execute(
                        "SELECT error FROM jobs WHERE sha256 = ? AND kind = ?", (sha256, kind)
                    ).fetchone()[0]
                    self._job_finished(conn, sha256, kind, "failed", error, stamp)
                    continue
                conn.execute(
                    "UPDATE jobs SET state = 'queued', lapses = lapses + 1, run_after = ?,"
                    " updated_at = ?, lease_until = NULL, runner = NULL,"
                    " error = 'runner vanished while running; handed out again'"
                    " WHERE sha256 = ? AND kind = ?",
                    (now + backoff_s(attempts), stamp, sha256, kind),
                )
                self._emit(
                    conn,
                    "job.queued",
                    sha256=sha256,
                    kind=kind,
                    state="queued",
                    error="runner vanished while running; handed out again",
                )
                requeued.append(Job(sha256, kind, attempts))
            return requeued

        return await self.write(txn)

    async def job_state(self, sha256: str, kind: str) -> JobState | None:
        row = await self._fetchone(
            "SELECT kind, state, attempts, error, runner FROM jobs WHERE sha256 = ? AND kind = ?",
            (sha256, kind),
        )
        return JobState(*row) if row else None

    async def set_exif(self, sha256: str, exif_json: str) -> None:
        await self.write(
            lambda conn: conn.execute(
                "UPDATE metadata SET exif_json = ? WHERE sha256 = ?", (exif_json, sha256)
            )
        )

    async def set_caption(self, sha256: str, caption: str) -> None:
        await self.write(
            lambda conn: conn.execute(
                "UPDATE metadata SET caption = ? WHERE sha256 = ?", (caption, sha256)
            )
        )

    # -- events and webhook deliveries --------------------------------------------------------

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        rows = await self._fetchall(
            "SELECT id, type, image_id, kind, state, error, created_at FROM events"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [Event(*row) for row in rows]

    async def last_event_id(self) -> int:
        # The sequence, not max(id): pruning every event must not make ids start again.
        row = await self._fetchone("SELECT seq FROM sqlite_sequence WHERE name = 'events'")
        return row[0] if row else 0

    async def prune_events(self, before: str) -> int:
        def txn(conn: sqlite3.Connection) -> int:
            pruned = conn.execute("DELETE FROM events WHERE created_at < ?", (before,)).rowcount
            # Failed ones stay until an admin has seen them (and maybe sent them again).
            conn.execute(
                "DELETE FROM webhook_deliveries WHERE state = 'delivered' AND updated_at < ?",
                (before,),
            )
            return pruned

        return await self.write(txn)

    async def claim_deliveries(self, runner: str, limit: int, lease_s: float) -> list[Delivery]:
        def txn(conn: sqlite3.Connection) -> list[Delivery]:
            now = time.time()
            rows = conn.execute(
                "UPDATE webhook_deliveries SET state = 'delivering', attempts = attempts + 1,"
                " runner = ?, lease_until = ?, updated_at = ?"
                " WHERE delivery_id IN (SELECT delivery_id FROM webhook_deliveries"
                "   WHERE (state = 'pending' AND next_attempt_at <= ?)"
                "      OR (state = 'delivering' AND lease_until < ?)"
                "   ORDER BY next_attempt_at, created_at LIMIT ?)"
                " RETURNING " + _DELIVERY_COLUMNS,
                (runner, now + lease_s, now_iso(), now, now, limit),
            ).fetchall()
            return sorted((Delivery(*row) for row in rows), key=lambda d: d.event_id)

        return await self.write(txn)

    async def keep_delivery_body(self, delivery_id: str, runner: str, body: str) -> str | None:
        def txn(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "UPDATE webhook_deliveries SET body = coalesce(body, ?)"
                " WHERE delivery_id = ? AND runner = ? AND state = 'delivering' RETURNING body",
                (body, delivery_id, runner),
            ).fetchone()
            return row[0] if row else None

        return await self.write(txn)

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
        def txn(conn: sqlite3.Connection) -> bool:
            stamp = now_iso()
            cur = conn.execute(
                "UPDATE webhook_deliveries SET state = ?, last_status = ?, last_error = ?,"
                " body = coalesce(body, ?), next_attempt_at = ?, lease_until = NULL,"
                " runner = NULL, updated_at = ?,"
                " delivered_at = CASE WHEN ? = 'delivered' THEN ? END"
                " WHERE delivery_id = ? AND runner = ? AND state = 'delivering'",
                (state, status, error, body, retry_at, stamp, state, stamp, delivery_id, runner),
            )
            return cur.rowcount == 1

        return await self.write(txn)

    async def deliveries(
        self, *, state: str | None, limit: int, before: tuple[str, str] | None = None
    ) -> list[Delivery]:
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if before is not None:
            where.append("(created_at, delivery_id) < (?, ?)")
            params.extend(before)
        sql = "SELECT " + _DELIVERY_COLUMNS + " FROM webhook_deliveries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, delivery_id DESC LIMIT ?"
        params.append(limit)
        return [Delivery(*row) for row in await self._fetchall(sql, params)]

    async def requeue_deliveries(self, state: str = "failed") -> int:
        def txn(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE webhook_deliveries SET state = 'pending', attempts = 0,"
                " next_attempt_at = 0, updated_at = ? WHERE state = ?",
                (now_iso(), state),
            ).rowcount

        return await self.write(txn)


# Its columns in the order of Delivery's fields.
_DELIVERY_COLUMNS = (
    "delivery_id, event_id, event_type, image_id, url, state, attempts, next_attempt_at,"
    " last_status, last_error, event_json, body, created_at, updated_at, delivered_at"
)

_KEY_SELECT = (
    "SELECT name, key_id, token_hash, scopes, created_at, last_used_at, revoked_at FROM api_keys"
)


def _api_key(row: sqlite3.Row) -> ApiKey:
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


def _match_expression(words: Sequence[str]) -> str:
    """Each word as a quoted FTS5 string (nothing in it is query syntax) matched as a prefix;
    all of them must match."""
    return " AND ".join('"' + word.replace('"', '""') + '"*' for word in words)


def _search_query(
    q: ImageQuery, limit: int, after: tuple[str, str] | None
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if q.status == "success":
        where.append("i.error IS NULL")
    elif q.status == "failed":
        where.append("i.error IS NOT NULL")
    if q.format is not None:
        where.append("m.format = ?")
        params.append(q.format)
    if q.camera is not None:
        where.append("(f.make = ? COLLATE NOCASE OR f.model = ? COLLATE NOCASE)")
        params += [q.camera, q.camera]
    for column, op, value in (
        ("f.taken_at", ">=", q.taken_after),
        ("f.taken_at", "<", q.taken_before),
        ("i.processed_at", ">=", q.uploaded_after),
        ("i.processed_at", "<", q.uploaded_before),
    ):
        if value is not None:
            where.append(f"{column} {op} ?")
            params.append(value)
    if q.has_gps is not None:
        where.append("coalesce(f.has_gps, 0) = ?")
        params.append(int(q.has_gps))
    source = " FROM images i" + _RECORD_JOINS
    if q.words:
        source = " FROM image_text t JOIN images i ON i.rowid = t.rowid" + _RECORD_JOINS
        where.append("image_text MATCH ?")
        params.append(_match_expression(q.words))
    conditions = (" WHERE " + " AND ".join(where)) if where else ""

    # The page is chosen on narrow rows (rowid, id, key), and only its records are read whole:
    # sorting every match with its EXIF along made common words several times slower.
    if q.sort == "relevance":
        # bm25() is lower for a better match. It cannot be compared in the WHERE of its own
        # query, so the page is cut from a subquery.
        page = (
            "SELECT * FROM (SELECT i.rowid AS rid, i.image_id AS iid,"
            " bm25(image_text) AS sort_key" + source + conditions + ")"
        )
        if after is not None:
            page += " WHERE (sort_key, iid) > (?, ?)"
            params += [float(after[0]), after[1]]
        page += " ORDER BY sort_key, iid LIMIT ?"
        order = "page.sort_key, page.iid"
    else:
        key = "i.processed_at" if q.sort == "uploaded" else "coalesce(f.taken_at, '')"
        if after is not None:
            conditions += (" AND " if conditions else " WHERE ") + f"({key}, i.image_id) < (?, ?)"
            params += list(after)
        page = (
            f"SELECT i.rowid AS rid, i.image_id AS iid, {key} AS sort_key"
            + source
            + conditions
            + f" ORDER BY {key} DESC, i.image_id DESC LIMIT ?"
        )
        order = "page.sort_key DESC, page.iid DESC"
    if q.sort == "uploaded" and not q.words:
        # Walked in the order of an index (images_newest or its partial twins): nothing is
        # sorted, and the page's records are read as it goes.
        sql = (
            "SELECT "
            + _RECORD_COLUMNS
            + ", i.processed_at AS sort_key"
            + source
            + conditions
            + " ORDER BY i.processed_at DESC, i.image_id DESC LIMIT ?"
        )
        return sql, [*params, limit]
    sql = (
        "SELECT " + _RECORD_COLUMNS + ", page.sort_key FROM (" + page + ") AS page"
        " JOIN images i ON i.rowid = page.rid" + _RECORD_JOINS + " ORDER BY " + order
    )
    return sql, [*params, limit]


def _jobs_of(conn: sqlite3.Connection, sha256s: Iterable[str]) -> JobsByImage:
    unique = sorted(set(sha256s))
    if not unique:
        return {}
    marks = ",".join("?" * len(unique))
    rows = conn.execute(
        f"SELECT sha256, kind, state, attempts, error, runner FROM jobs WHERE sha256 IN ({marks})",
        unique,
    ).fetchall()
    out: JobsByImage = {}
    for sha256, kind, state, attempts, error, runner in rows:
        out.setdefault(sha256, {})[kind] = JobState(kind, state, attempts, error, runner)
    return out


def _pending_jobs(conn: sqlite3.Connection, sha256: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM jobs WHERE sha256 = ? AND state IN ('queued', 'running')",
        (sha256,),
    ).fetchone()[0]


# -- schema -------------------------------------------------------------------------------------


def statements(script: str) -> list[str]:
    """A migration script as SQL statements, split where SQLite itself says a statement ends,
    so a trigger body (BEGIN ...; ...; END) or a string holding ';' stays whole."""
    out: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\n;"):
                out.append(current.strip())
            current = ""
    if current.strip(" \t\n;"):
        raise ValueError(f"incomplete SQL statement in a migration: {current.strip()[:80]!r}")
    return out


def _migrate(conn: sqlite3.Connection) -> None:
    """Applies the migrations not yet applied, each in the transaction that records it."""

    def ensure_table(c: sqlite3.Connection) -> int:
        c.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        return c.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0

    current = _in_transaction(conn, ensure_table)
    for version, script in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue

        def apply(c: sqlite3.Connection, version: int = version, script: str = script) -> None:
            done = c.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            ).fetchone()
            if done:  # another process got there first
                return
            for statement in statements(script):
                c.execute(statement)
            c.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, now_iso()),
            )

        _in_transaction(conn, apply)
