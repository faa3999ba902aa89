"""All SQLite access: the schema, its numbered migrations, and every statement as a named method.

One writer connection, used by one coroutine at a time (an asyncio lock around each transaction,
begun IMMEDIATE so concurrent processes queue on the busy timeout instead of failing on upgrade),
and a small pool of reader connections: WAL lets them read while the writer writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

JOB_KINDS = ("thumbnail", "exif", "caption")
FINISHED = ("done", "failed", "skipped")
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
)


def now_iso() -> str:
    """RFC 3339 UTC with milliseconds: sorts as text, and SQLite's julianday() reads it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Job:
    sha256: str
    kind: str
    attempts: int


@dataclass(frozen=True)
class Deleted:
    image_path: str | None
    sha256: str | None
    last_reference: bool


class Store:
    def __init__(self, path: str | Path, readers: int = 2) -> None:
        self.path = str(path)
        self._reader_count = readers
        self._writer: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []

    # -- connections ------------------------------------------------------------------------

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        # execute_fetchall: a statement left unfinished (PRAGMAs answer with a row) would hold a
        # read transaction open, and its stale snapshot makes every later write fail as "locked".
        await conn.execute_fetchall(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute_fetchall("PRAGMA foreign_keys = ON")
        await conn.execute_fetchall("PRAGMA synchronous = NORMAL")
        return conn

    async def open(self) -> Store:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._connect()
            await _enable_wal(self._writer)
            await self.migrate()
            for _ in range(self._reader_count):
                conn = await self._connect()
                self._all_readers.append(conn)
                self._readers.put_nowait(conn)
        except BaseException:
            # aiosqlite's threads would keep the process alive after a failed start.
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Waits for the running transaction, then closes everything; safe to call twice."""
        async with self._write_lock:
            writer, self._writer = self._writer, None
            readers, self._all_readers = self._all_readers, []
            if writer is not None:
                await writer.close()
            for conn in readers:
                await conn.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("store is closed")
            await _begin_immediate(conn)
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A reader inside one read transaction: every SELECT sees the same committed state."""
        async with self._reader() as conn:
            await conn.execute("BEGIN")
            try:
                yield conn
            finally:
                await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self._reader() as conn:
            return list(await conn.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Applies the migrations not yet applied, each in the transaction that records it."""
        async with self.transaction() as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            rows = await conn.execute_fetchall("SELECT max(version) FROM schema_migrations")
            current = rows[0][0] or 0
        for version, script in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            async with self.transaction() as conn:
                rows = await conn.execute_fetchall(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                )
                if rows:  # another process got there first
                    continue
                for statement in _statements(script):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, now_iso()),
                )
        return len(MIGRATIONS)

    async def ping(self) -> None:
        await self._fetchall("SELECT 1")

    # -- uploads ----------------------------------------------------------------------------

    async def record_success(
        self,
        *,
        image_id: str,
        original_name: str,
        processed_at: str,
        image_path: str,
        start_time: str,
        sha256: str,
        width: int,
        height: int,
        fmt: str,
        size_bytes: int,
        kinds: dict[str, tuple[str, str | None]],
    ) -> bool:
        """Metadata (first upload of these bytes wins), images, stats and jobs rows at once.

        `kinds` maps each job kind to its first state and a note ("queued", or "skipped" with why).
        Returns True when jobs must be dispatched (at least one is still queued for this sha256).
        """
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO metadata (sha256, width, height, format, size_bytes, first_upload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                (sha256, width, height, fmt, size_bytes, processed_at),
            )
            await conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES (?, ?, ?, ?, ?, NULL)",
                (image_id, original_name, processed_at, image_path, sha256),
            )
            await conn.executemany(
                "INSERT INTO jobs (sha256, kind, state, error, created_at, updated_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256, kind) DO NOTHING",
                [
                    (
                        sha256,
                        kind,
                        state,
                        note,
                        processed_at,
                        processed_at,
                        processed_at if state in FINISHED else None,
                    )
                    for kind, (state, note) in kinds.items()
                ],
            )
            pending = await _pending_jobs(conn, sha256)
            await conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, 1)",
                (image_id, start_time, None if pending else now_iso()),
            )
        return pending > 0

    async def record_failure(
        self, *, image_id: str, original_name: str, processed_at: str, start_time: str, error: str
    ) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO images (image_id, original_name, processed_at, image_path,"
                " metadata_sha256, error) VALUES (?, ?, ?, NULL, NULL, ?)",
                (image_id, original_name, processed_at, error),
            )
            await conn.execute(
                "INSERT INTO stats (image_id, start_time, end_time, status) VALUES (?, ?, ?, 0)",
                (image_id, start_time, processed_at),
            )

    async def known_sha256(self, sha256: str) -> sqlite3.Row | None:
        """The stored metadata of these bytes when an earlier upload of them succeeded."""
        return await self._fetchone(
            "SELECT sha256, width, height, format FROM metadata WHERE sha256 = ?", (sha256,)
        )

    # -- reading records --------------------------------------------------------------------

    async def get_record(self, image_id: str) -> sqlite3.Row | None:
        return await self._fetchone(_RECORD_SELECT + " WHERE i.image_id = ?", (image_id,))

    async def list_records(
        self, *, limit: int, before: tuple[str, str] | None = None, status: str | None = None
    ) -> list[sqlite3.Row]:
        """Newest first; `before` is the (processed_at, image_id) of the last row already seen."""
        return await self._fetchall(*_page_query(limit, before, status))

    async def jobs_of(self, sha256s: Iterable[str]) -> dict[str, dict[str, sqlite3.Row]]:
        async with self._reader() as conn:
            return await _jobs_of(conn, sha256s)

    # A record and its job states are read in one snapshot: read apart, a job could show "done"
    # while its result (EXIF, caption) still read as missing.

    async def record_with_jobs(
        self, image_id: str
    ) -> tuple[sqlite3.Row | None, dict[str, sqlite3.Row]]:
        async with self._snapshot() as conn:
            rows = await conn.execute_fetchall(
                _RECORD_SELECT + " WHERE i.image_id = ?", (image_id,)
            )
            if not rows:
                return None, {}
            row = next(iter(rows))
            jobs = await _jobs_of(conn, [row["sha256"]] if row["sha256"] else [])
        return row, jobs.get(row["sha256"], {})

    async def page_with_jobs(
        self, *, limit: int, before: tuple[str, str] | None = None, status: str | None = None
    ) -> tuple[list[sqlite3.Row], dict[str, dict[str, sqlite3.Row]]]:
        async with self._snapshot() as conn:
            rows = list(await conn.execute_fetchall(*_page_query(limit, before, status)))
            jobs = await _jobs_of(conn, [r["sha256"] for r in rows if r["sha256"]])
        return rows, jobs

    async def stats(self) -> dict[str, Any]:
        row = await self._fetchone(
            "SELECT count(*) AS total,"
            " coalesce(sum(status = 0), 0) AS failed,"
            " avg(CASE WHEN status = 1 AND end_time IS NOT NULL"
            "     THEN (julianday(end_time) - julianday(start_time)) * 86400.0 END) AS avg_s,"
            " coalesce(sum(status = 1 AND end_time IS NULL), 0) AS processing"
            " FROM stats"
        )
        jobs = await self._fetchall("SELECT state, count(*) AS n FROM jobs GROUP BY state")
        assert row is not None
        return {
            "total": row["total"],
            "failed": row["failed"],
            "processing": row["processing"],
            "average_processing_time_seconds": row["avg_s"],
            "jobs": {r["state"]: r["n"] for r in jobs},
        }

    # -- deleting ---------------------------------------------------------------------------

    async def delete_image(self, image_id: str) -> Deleted | None:
        """Removes the record; its metadata and jobs go with the last image of that sha256."""
        async with self.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT image_path, metadata_sha256 FROM images WHERE image_id = ?", (image_id,)
            )
            if not rows:
                return None
            image_path, sha256 = rows[0]
            await conn.execute("DELETE FROM stats WHERE image_id = ?", (image_id,))
            await conn.execute("DELETE FROM images WHERE image_id = ?", (image_id,))
            last = False
            if sha256 is not None:
                others = await conn.execute_fetchall(
                    "SELECT 1 FROM images WHERE metadata_sha256 = ? LIMIT 1", (sha256,)
                )
                if not others:
                    last = True
                    await conn.execute("DELETE FROM jobs WHERE sha256 = ?", (sha256,))
                    await conn.execute("DELETE FROM metadata WHERE sha256 = ?", (sha256,))
        return Deleted(image_path, sha256, last)

    async def image_ids_with_files(self) -> set[str]:
        rows = await self._fetchall("SELECT image_id FROM images WHERE image_path IS NOT NULL")
        return {r[0] for r in rows}

    async def original_of(self, sha256: str) -> str | None:
        """Any stored original of these bytes (every copy holds the same bytes)."""
        row = await self._fetchone(
            "SELECT image_path FROM images WHERE metadata_sha256 = ? AND image_path IS NOT NULL"
            " ORDER BY processed_at LIMIT 1",
            (sha256,),
        )
        return row[0] if row else None

    # -- jobs -------------------------------------------------------------------------------

    async def claim_job(self, sha256: str, kind: str, runner: str, lease_s: float) -> Job | None:
        """queued (and due) or running with a lapsed lease -> running, held by `runner`."""
        now = time.time()
        async with self.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, runner = ?,"
                " lease_until = ?, started_at = ?, updated_at = ?, error = NULL"
                " WHERE sha256 = ? AND kind = ? AND ("
                "   (state = 'queued' AND run_after <= ?)"
                "   OR (state = 'running' AND lease_until < ?))"
                " RETURNING attempts",
                (runner, now + lease_s, now_iso(), now_iso(), sha256, kind, now, now),
            )
        return Job(sha256, kind, rows[0][0]) if rows else None

    async def renew_leases(
        self, runner: str, jobs: Iterable[tuple[str, str]], lease_s: float
    ) -> int:
        """Extends the leases of the (sha256, kind) jobs this runner is running right now."""
        until = time.time() + lease_s
        async with self.transaction() as conn:
            cur = await conn.executemany(
                "UPDATE jobs SET lease_until = ?"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                [(until, sha256, kind, runner) for sha256, kind in jobs],
            )
            return cur.rowcount

    async def finish_job(
        self, sha256: str, kind: str, runner: str, state: str, error: str | None = None
    ) -> bool:
        """done/failed/skipped; when it was the image's last open job, closes its stats rows.

        Returns False when the job was no longer held by `runner` (its lease lapsed and another
        runner took it over): that runner's result stands.
        """
        stamp = now_iso()
        async with self.transaction() as conn:
            cur = await conn.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                (state, error, stamp, stamp, sha256, kind, runner),
            )
            if cur.rowcount == 0:
                return False
            await _close_stats_if_finished(conn, sha256, stamp)
        return True

    async def retry_job(
        self, sha256: str, kind: str, runner: str, error: str, delay_s: float
    ) -> bool:
        async with self.transaction() as conn:
            cur = await conn.execute(
                "UPDATE jobs SET state = 'queued', error = ?, run_after = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL"
                " WHERE sha256 = ? AND kind = ? AND state = 'running' AND runner = ?",
                (error, time.time() + delay_s, now_iso(), sha256, kind, runner),
            )
            return cur.rowcount > 0

    async def skip_job(self, sha256: str, kind: str, reason: str) -> None:
        """A job that will not run in this configuration (captions turned off)."""
        stamp = now_iso()
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'skipped', error = ?, finished_at = ?, updated_at = ?,"
                " lease_until = NULL, runner = NULL WHERE sha256 = ? AND kind = ?",
                (reason, stamp, stamp, sha256, kind),
            )
            await _close_stats_if_finished(conn, sha256, stamp)

    async def due_jobs(self, limit: int, updated_before: str | None = None) -> list[Job]:
        """Jobs a runner may take now: queued and due, or running with a lapsed lease.
        `updated_before` keeps only jobs untouched since then (RFC 3339)."""
        now = time.time()
        sql = (
            "SELECT sha256, kind, attempts FROM jobs"
            " WHERE ((state = 'queued' AND run_after <= ?)"
            "   OR (state = 'running' AND lease_until < ?))"
        )
        params: list[Any] = [now, now]
        if updated_before is not None:
            sql += " AND updated_at < ?"
            params.append(updated_before)
        sql += " ORDER BY run_after, created_at LIMIT ?"
        params.append(limit)
        rows = await self._fetchall(sql, params)
        return [Job(r[0], r[1], r[2]) for r in rows]

    async def release_lapsed(self) -> list[Job]:
        """running jobs whose runner vanished (lease lapsed) go back to queued."""
        now = time.time()
        async with self.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE jobs SET state = 'queued', runner = NULL, lease_until = NULL,"
                " updated_at = ?, error = 'runner vanished while running; handed out again'"
                " WHERE state = 'running' AND lease_until < ?"
                " RETURNING sha256, kind, attempts",
                (now_iso(), now),
            )
        return [Job(r[0], r[1], r[2]) for r in rows]

    async def job_state(self, sha256: str, kind: str) -> sqlite3.Row | None:
        return await self._fetchone(
            "SELECT state, attempts, error, runner, lease_until FROM jobs"
            " WHERE sha256 = ? AND kind = ?",
            (sha256, kind),
        )

    async def set_exif(self, sha256: str, exif_json: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE metadata SET exif_json = ? WHERE sha256 = ?", (exif_json, sha256)
            )

    async def set_caption(self, sha256: str, caption: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE metadata SET caption = ? WHERE sha256 = ?", (caption, sha256)
            )


_RECORD_SELECT = (
    "SELECT i.image_id, i.original_name, i.processed_at, i.error, i.image_path,"
    " i.metadata_sha256 AS sha256,"
    " m.width, m.height, m.format, m.size_bytes, m.first_upload, m.exif_json, m.caption"
    " FROM images i LEFT JOIN metadata m ON m.sha256 = i.metadata_sha256"
)


def _page_query(
    limit: int, before: tuple[str, str] | None, status: str | None
) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if status == "success":
        where.append("i.error IS NULL")
    elif status == "failed":
        where.append("i.error IS NOT NULL")
    if before is not None:
        where.append("(i.processed_at, i.image_id) < (?, ?)")
        params.extend(before)
    sql = _RECORD_SELECT
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY i.processed_at DESC, i.image_id DESC LIMIT ?"
    params.append(limit)
    return sql, params


async def _jobs_of(
    conn: aiosqlite.Connection, sha256s: Iterable[str]
) -> dict[str, dict[str, sqlite3.Row]]:
    unique = sorted(set(sha256s))
    if not unique:
        return {}
    marks = ",".join("?" * len(unique))
    rows = await conn.execute_fetchall(
        f"SELECT sha256, kind, state, attempts, error FROM jobs WHERE sha256 IN ({marks})",
        unique,
    )
    out: dict[str, dict[str, sqlite3.Row]] = {}
    for row in rows:
        out.setdefault(row["sha256"], {})[row["kind"]] = row
    return out


async def _pending_jobs(conn: aiosqlite.Connection, sha256: str) -> int:
    rows = await conn.execute_fetchall(
        "SELECT count(*) FROM jobs WHERE sha256 = ? AND state NOT IN ('done', 'failed', 'skipped')",
        (sha256,),
    )
    return rows[0][0]


async def _close_stats_if_finished(conn: aiosqlite.Connection, sha256: str, stamp: str) -> None:
    if await _pending_jobs(conn, sha256):
        return
    await conn.execute(
        "UPDATE stats SET end_time = ? WHERE end_time IS NULL AND image_id IN"
        " (SELECT image_id FROM images WHERE metadata_sha256 = ?)",
        (stamp, sha256),
    )


async def _retry_locked(conn: aiosqlite.Connection, sql: str) -> None:
    """Runs `sql`, retrying "database is locked" for up to the busy timeout.

    The busy timeout makes SQLite wait for locks, but not in every case: while another process
    switches a new file to WAL (or recovers its WAL index) SQLite answers SQLITE_BUSY at once.
    Processes that open a fresh database together meet exactly that."""
    attempts = BUSY_TIMEOUT_MS // 50
    for attempt in range(attempts):
        try:
            await conn.execute_fetchall(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05)


async def _enable_wal(conn: aiosqlite.Connection) -> None:
    await _retry_locked(conn, "PRAGMA journal_mode = WAL")


async def _begin_immediate(conn: aiosqlite.Connection) -> None:
    await _retry_locked(conn, "BEGIN IMMEDIATE")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
