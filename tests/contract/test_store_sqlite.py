"""What only the SQLite store has, on real files: migrations, pragmas, the seed schema, query
plans, closing, transactions under concurrency, and a read-only file. What every store does (jobs,
leases, deleting, listing) is in test_store_contract.py; cancellations in test_store_cancel.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from store_helpers import add_image, list_request

from imgapi_core.routes import listing
from imgapi_core.store import ImageQuery, NotWritable, now_iso
from imgapi_core.store import sqlite as sqlite_store
from imgapi_core.store.sqlite import SqliteStore as Store

SHA = "a" * 64
SHA2 = "b" * 64
SHA3 = "c" * 64
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")

# The seed's schema, as its README gives it: what an existing deployment's database holds.
SEED_SCHEMA = """
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
"""


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


@contextlib.asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Store]:
    s = await Store(path).open()
    try:
        yield s
    finally:
        await s.close()


def rows(path: Path, sql: str, *params: Any) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


# -- schema and pragmas -------------------------------------------------------------------------


async def test_migrations_are_recorded_and_idempotent(db_path):
    async with opened(db_path) as s:
        await add_image(s, "one")
    first = rows(db_path, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert [v for v, _ in first] == list(range(1, len(sqlite_store.MIGRATIONS) + 1))
    assert all(RFC3339_UTC.fullmatch(at) for _, at in first)
    async with opened(db_path) as s:  # a second start: nothing applied twice, nothing lost
        assert (await s.get_record("one")).original_name == "one.jpg"
    assert rows(db_path, "SELECT version, applied_at FROM schema_migrations ORDER BY version") == (
        first
    )
    tables = {r[0] for r in rows(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"metadata", "images", "stats", "jobs", "schema_migrations"} <= tables


async def test_two_stores_opening_the_same_new_file_at_once(tmp_path):
    """Two processes starting together on a fresh volume (API and worker, or --workers 2)."""
    for trial in range(5):  # the race is lost often, not always: a few fresh files make it show
        path = tmp_path / f"fresh-{trial}.db"
        a, b = Store(path), Store(path)
        try:
            results = await asyncio.gather(a.open(), b.open(), return_exceptions=True)
            errors = [repr(r) for r in results if isinstance(r, BaseException)]
            assert not errors, f"trial {trial}: {errors}"
        finally:
            # Also closes what a failed open() left connected (its threads keep a process alive).
            await a.close()
            await b.close()
        versions = rows(path, "SELECT version FROM schema_migrations ORDER BY version")
        assert [v for (v,) in versions] == list(range(1, len(sqlite_store.MIGRATIONS) + 1))


async def test_wal_mode_and_foreign_keys_are_on(store, db_path):
    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]  # persistent: any connection sees it
    pragmas = await store.write(
        lambda conn: [
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("foreign_keys", "busy_timeout")
        ]
    )
    assert pragmas[0] == 1 and pragmas[1] >= 1000
    # Enforced, not only set: a job for bytes with no metadata row is refused.
    with pytest.raises(sqlite3.IntegrityError):
        await store.write(
            lambda conn: conn.execute(
                "INSERT INTO jobs (sha256, kind, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (SHA2, "exif", now_iso(), now_iso()),
            )
        )
    assert rows(db_path, "SELECT count(*) FROM jobs") == [(0,)]


async def test_seed_schema_database_upgrades_in_place(db_path):
    db_path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.executescript(SEED_SCHEMA)
        conn.execute(
            "INSERT INTO metadata (sha256, width, height, format, size_bytes, exif_json, caption)"
            " VALUES (?, 1920, 1080, 'jpeg', 2048576, '{\"Make\": \"Seed\"}', 'a cat')",
            (SHA,),
        )
        conn.execute(
            "INSERT INTO images (image_id, original_name, image_path, metadata_sha256)"
            " VALUES ('img123', 'photo.jpg', 'media/originals/img123.jpg', ?)",
            (SHA,),
        )
        conn.execute("INSERT INTO stats (image_id, status) VALUES ('img123', 1)")
        conn.execute(
            "INSERT INTO images (image_id, original_name, error) VALUES"
            " ('img789', 'file.xlsx', 'invalid file format')"
        )
        conn.execute("INSERT INTO stats (image_id, end_time, status) VALUES ('img789', NULL, 0)")
        # An absolute server path (a process started elsewhere), and a row that already holds a
        # storage key.
        conn.execute(
            "INSERT INTO metadata (sha256, width, height, format, size_bytes)"
            " VALUES (?, 10, 20, 'png', 300)",
            (SHA3,),
        )
        conn.execute(
            "INSERT INTO images (image_id, original_name, image_path, metadata_sha256)"
            " VALUES ('abc', 'abc.png', '/srv/x/media/originals/abc.png', ?)",
            (SHA3,),
        )
        conn.execute(
            "INSERT INTO images (image_id, original_name, image_path, metadata_sha256)"
            " VALUES ('keyed', 'k.png', 'originals/keyed.png', ?)",
            (SHA3,),
        )
        conn.commit()

    async with opened(db_path) as s:
        old = await s.get_record("img123")
        assert old is not None
        assert (old.original_name, old.width, old.height, old.format, old.size_bytes) == (
            "photo.jpg",
            1920,
            1080,
            "jpeg",
            2048576,
        )
        assert old.caption == "a cat" and old.exif_json == '{"Make": "Seed"}'
        failed = await s.get_record("img789")
        assert failed is not None and failed.error == "invalid file format"
        assert failed.original_key is None and failed.sha256 is None
        # Server paths, relative or absolute, became storage keys; a key stayed as it was.
        assert old.original_key == "originals/img123.jpg"
        assert (await s.get_record("abc")).original_key == "originals/abc.png"
        assert (await s.get_record("keyed")).original_key == "originals/keyed.png"
        assert await s.original_of(SHA) == "originals/img123.jpg"
        assert await s.original_keys() == {
            "originals/img123.jpg",
            "originals/abc.png",
            "originals/keyed.png",
        }
        # Seed rows have no jobs; new rows go in next to the old ones, with jobs, and the list
        # reads both.
        assert await s.record_with_jobs("img123") == (old, {})
        await add_image(s, "new", sha256=SHA2)
        listed, jobs, _keys = await s.search_with_jobs(ImageQuery(), limit=10)
        ids = [r.image_id for r in listed]
        assert ids[0] == "new" and set(ids) == {"new", "img123", "img789", "abc", "keyed"}
        assert set(jobs) == {SHA2}
        assert await s.known_sha256s([SHA, SHA2, SHA3]) == {SHA, SHA2, SHA3}
        stats = await s.stats()
        assert (stats.total, stats.failed) == (3, 1)  # the seed gave abc and keyed no stats rows
        # The seed never finished img123 (its stats row was open) and left nothing that would:
        # closed by the upgrade, it does not count as processing for ever. "new" still does.
        assert stats.processing == 1
        # The rows that were there are in the search index: by caption, camera and name.
        for query, expected in (
            (ImageQuery(words=("cat",)), ["img123"]),
            (ImageQuery(words=("photo",)), ["img123"]),
            (ImageQuery(words=("file", "xlsx")), ["img789"]),
            (ImageQuery(camera="seed"), ["img123"]),
        ):
            found, _, _ = await s.search_with_jobs(query, limit=10)
            assert [r.image_id for r in found] == expected, query
    raw = dict(rows(db_path, "SELECT image_id, image_path FROM images"))
    assert raw == {
        "img123": "originals/img123.jpg",
        "img789": None,
        "abc": "originals/abc.png",
        "keyed": "originals/keyed.png",
        "new": "originals/new.jpg",
    }
    versions = rows(db_path, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == list(range(1, len(sqlite_store.MIGRATIONS) + 1))
    indexes = {r[0] for r in rows(db_path, "SELECT name FROM sqlite_master WHERE type='index'")}
    assert "images_newest" in indexes
    # The API's records say processed_at and first_upload are RFC 3339 UTC: old rows too (the
    # seed wrote datetime('now'), "YYYY-MM-DD HH:MM:SS" without a zone), so that they read and
    # sort like new ones.
    for table, column in (("images", "processed_at"), ("metadata", "first_upload")):
        for (value,) in rows(db_path, f"SELECT {column} FROM {table}"):
            assert RFC3339_UTC.fullmatch(value), (table, column, value)


# -- query plans --------------------------------------------------------------------------------


@pytest.fixture
def captured_sql(monkeypatch) -> list[tuple[str, tuple]]:
    """Every statement the store's connections execute, with its parameters."""
    seen: list[tuple[str, tuple]] = []
    original = sqlite_store._connect

    class Spy(sqlite3.Connection):
        def execute(self, sql, parameters=(), /):
            seen.append((sql, tuple(parameters)))
            return super().execute(sql, parameters)

    def connect(path: str) -> sqlite3.Connection:
        original(path).close()  # the same pragmas, checked on a throwaway connection
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Spy)
        conn.row_factory = sqlite3.Row
        return conn

    monkeypatch.setattr(sqlite_store, "_connect", connect)
    return seen


async def test_the_list_route_reads_through_an_index(captured_sql, store, db_path):
    """The statements the list route runs for a plain listing (all, by status, and the next page
    behind the cursor of its Link header) walk an index of images in its order, nothing sorted,
    and read the page's jobs by key."""
    for i in range(45):  # 30 stored, 15 failed, in turn
        if i % 3 < 2:
            await add_image(store, f"img{i:03d}", sha256=f"{i:064x}")
        else:
            stamp = now_iso()
            await store.record_failure(
                image_id=f"bad{i:03d}",
                original_name=f"bad{i:03d}.xlsx",
                processed_at=stamp,
                start_time=stamp,
                error="invalid file format",
            )
    # A filtered page reads the partial index of its status: through images_newest it would step
    # over every row of the other status (most rows, for "failed").
    index_of = {
        None: "images_newest",
        "success": "images_ok_newest",
        "failed": "images_failed_newest",
    }

    def plan_of(sql: str, params: tuple) -> list[str]:
        return [r[3] for r in rows(db_path, "EXPLAIN QUERY PLAN " + sql, *params)]

    for status in (None, "success", "failed"):
        first = "/api/images?limit=10" + (f"&status={status}" if status else "")
        path: str | None = first
        for page in ("first page", "behind its cursor"):
            assert path is not None, (status, page)
            query, after, limit = list_request(path)
            assert (after is None) == (page == "first page")
            captured_sql.clear()
            # The route's call: one record more than the page, to know if there is a next one.
            records, jobs, keys = await store.search_with_jobs(query, limit=limit + 1, after=after)
            if page == "first page":
                assert len(records) == limit + 1, status  # so there is a page behind its cursor
            listings = [(sql, p) for sql, p in captured_sql if "FROM images" in sql]
            assert len(listings) == 1, captured_sql
            sql, params = listings[0]
            if after is not None:
                assert params[-3:-1] == after, (sql, params)
            plan = plan_of(sql, params)
            where = (status, page, plan)
            assert not any(re.fullmatch(r"SCAN i\b(?!.*INDEX).*", step) for step in plan), where
            assert not any("TEMP B-TREE" in step for step in plan), where
            assert any("INDEX" in step and step.split()[1] == "i" for step in plan), where
            used = [
                m.group(1)
                for step in plan
                if (m := re.match(r"(?:SCAN|SEARCH) i .*?INDEX (\w+)", step))
            ]
            assert used == [index_of[status]], where
            # The page's jobs are read by key, not by scanning the jobs table.
            job_reads = [(sql, p) for sql, p in captured_sql if "FROM jobs" in sql]
            stored = {r.sha256 for r in records if r.sha256 is not None}
            assert set(jobs) == stored
            if status == "failed":
                assert not stored and job_reads == [], captured_sql
            else:
                assert stored and len(job_reads) == 1, captured_sql
                job_plan = plan_of(*job_reads[0])
                assert all(step.startswith("SEARCH jobs USING") for step in job_plan), job_plan
            # The next page, as the route's Link header gives it.
            path = None
            if len(records) > limit:
                path = f"{first}&cursor={listing.encode_cursor(query, keys[limit - 1])}"


# -- closing and concurrency --------------------------------------------------------------------


async def test_close_twice_is_fine(db_path):
    s = await Store(db_path).open()
    await s.close()
    await s.close()
    with pytest.raises(RuntimeError):
        await s.write(lambda conn: None)


async def test_concurrent_transactions_never_interleave(store, db_path):
    def setup(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (0)")

    await store.write(setup)

    def bump(conn: sqlite3.Connection) -> None:
        (n,) = conn.execute("SELECT n FROM counter").fetchone()
        conn.execute("UPDATE counter SET n = ?", (n + 1,))

    await asyncio.gather(*(store.write(bump) for _ in range(50)))
    assert rows(db_path, "SELECT n FROM counter") == [(50,)]
    # A second store on the same file (another process, in effect) is serialised as well.
    async with opened(db_path) as other:
        await asyncio.gather(*(s.write(bump) for _ in range(25) for s in (store, other)))
    assert rows(db_path, "SELECT n FROM counter") == [(100,)]


async def test_failed_transaction_rolls_back_and_frees_the_writer(store, db_path):
    def txn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO metadata (sha256, width, height, format, size_bytes)"
            " VALUES (?, 1, 1, 'png', 1)",
            (SHA2,),
        )
        _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await store.write(txn)
    assert rows(db_path, "SELECT count(*) FROM metadata") == [(0,)]
    assert await add_image(store, "after") is True


# -- migration scripts, writability -------------------------------------------------------------


def test_migration_scripts_split_where_sqlite_says_a_statement_ends():
    script = """
    CREATE TABLE notes (body TEXT);
    INSERT INTO notes VALUES ('a; b; c');
    CREATE TRIGGER notes_upper AFTER INSERT ON notes BEGIN
      UPDATE notes SET body = upper(body) WHERE rowid = new.rowid;
      SELECT 1;
    END;
    """
    parts = sqlite_store.statements(script)
    assert len(parts) == 3
    assert parts[1] == "INSERT INTO notes VALUES ('a; b; c');"
    assert parts[2].startswith("CREATE TRIGGER") and parts[2].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        sqlite_store.statements("CREATE TABLE x (a TEXT); INSERT INTO x VALUES ('unclosed")


async def test_a_migration_with_a_trigger_applies(db_path, monkeypatch):
    trigger = """
    CREATE TABLE audit (note TEXT);
    CREATE TRIGGER images_audit AFTER INSERT ON images BEGIN
      INSERT INTO audit VALUES ('added; ' || new.image_id);
    END;
    """
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", (*sqlite_store.MIGRATIONS, trigger))
    async with opened(db_path) as s:
        await add_image(s, "one")
    assert rows(db_path, "SELECT note FROM audit") == [("added; one",)]


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """The file cannot be written, even by root (tests run as root in CI): chattr +i."""
    import subprocess

    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"optional: chattr +i is not supported here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_read_only_database_is_refused_at_open(db_path):
    """SQLite opens a file it may not write read-only, silently: every upload would then fail.
    A real write (rolled back) at open finds it; /healthz runs the same check."""
    async with opened(db_path) as s:
        await add_image(s, "one")
    store = Store(db_path)
    with immutable(db_path), pytest.raises(NotWritable, match="read-only"):
        await store.open()
    assert store._writer is None and store._connections == []  # nothing left open
    async with opened(db_path) as s:  # writable again: opens, and the data is there
        await s.check_writable()
        assert (await s.get_record("one")) is not None
