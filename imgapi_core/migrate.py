"""`python imgapi.py migrate-store`: copies a deployment to other engines, so it can grow from one
machine (SQLite, a local folder) to PostgreSQL and S3 without losing anything.

    python imgapi.py migrate-store --to s3://BUCKET/PREFIX           # originals and thumbnails
    python imgapi.py migrate-store --database-to postgresql://...    # every table's rows
    (both at once: the database first, then the media)

The source is what the settings name now (DB_PATH or DATABASE_URL, MEDIA_DIR or STORAGE_URL); the
target's S3 endpoint and keys are the S3_* / AWS_* settings. Stop the service first (or at least
its uploads): what is written during a run may be missed, and a rerun copies it.

Resumable: a rerun copies what is missing and checks what is there. Verified: every original's
bytes are hashed at the source and again read back from the target, and must match the SHA-256 in
its record; a table's row count at the target must reach the source's. Exit status 0 only when
everything is copied and verified; each problem is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgapi_core import settings as settings_mod
from imgapi_core.media import Media, MediaMissing, open_media
from imgapi_core.settings import Settings
from imgapi_core.store import Store, open_store
from imgapi_core.thumbnails import thumbnail_keys

log = logging.getLogger("imgapi.migrate")

# Objects copied at once: enough to hide an object store's latency, few enough for 2 cores.
CONCURRENCY = 4
HASH_CHUNK = 1024 * 1024
BATCH_ROWS = 2000

# SQLite tables that are not data: its own catalog, the FTS index (PostgreSQL's triggers rebuild
# their own from the rows) and the migration counter (each backend has its own).
_NOT_DATA = ("sqlite_", "image_text", "schema_migrations")


@dataclass
class Tally:
    copied: int = 0
    present: int = 0  # already at the target and verified
    problems: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        return (
            f"{what}: {self.copied} copied, {self.present} already there, "
            f"{len(self.problems)} problems"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="imgapi.py migrate-store",
        description="copy this deployment's media and/or database to S3 / PostgreSQL",
    )
    parser.add_argument("--to", metavar="URL", help="media target: s3://BUCKET/PREFIX")
    parser.add_argument(
        "--database-to", metavar="URL", help="database target: postgresql://USER@HOST/DB"
    )
    args = parser.parse_args(argv)
    if not args.to and not args.database_to:
        parser.error("give --to and/or --database-to")
    cfg = settings_mod.load_or_exit()
    try:
        target = cfg.replace(
            storage_url=settings_mod.parse_value("STORAGE_URL", args.to or ""),
            database_url=settings_mod.parse_value("DATABASE_URL", args.database_to or ""),
        )
    except settings_mod.SettingsError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return asyncio.run(run(cfg, target, media=bool(args.to), database=bool(args.database_to)))


async def run(source: Settings, target: Settings, *, media: bool, database: bool) -> int:
    ok = True
    if database:
        if source.database_url:
            print(
                "imgapi: --database-to copies from SQLite (DB_PATH); DATABASE_URL is set",
                file=sys.stderr,
            )
            return 2
        tally = await copy_database(Path(source.db_path), target)
        print(tally.line("database rows"))
        ok &= _report(tally)
    if media:
        if source.storage_url and source.storage_url == target.storage_url:
            print("imgapi: --to names the storage this deployment already uses", file=sys.stderr)
            return 2
        # The records to check against: the target database when one was just filled, else the
        # deployment's own.
        store = await open_store(target if database else source)
        try:
            originals, thumbnails = await copy_media(store, source, target)
        finally:
            await store.close()
        print(originals.line("originals"))
        print(thumbnails.line("thumbnails"))
        ok &= _report(originals) & _report(thumbnails)
    return 0 if ok else 1


def _report(tally: Tally) -> bool:
    for problem in tally.problems:
        print(f"imgapi: {problem}", file=sys.stderr)
    return not tally.problems


# -- media ----------------------------------------------------------------------------------------


async def copy_media(store: Store, source: Settings, target: Settings) -> tuple[Tally, Tally]:
    src, dst = await open_media(source), await open_media(target)
    scratch = Path(tempfile.mkdtemp(prefix="migrate-", dir=_scratch_parent(source)))
    try:
        hashes = await store.original_hashes()
        originals, thumbnails = Tally(), Tally()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(key: str, sha256: str | None, tally: Tally) -> None:
            async with gate:
                try:
                    await _copy_object(src, dst, key, sha256, scratch, tally)
                except Exception as exc:  # one line per object, and the run goes on
                    tally.problems.append(f"{key}: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(one(key, sha, originals) for key, sha in sorted(hashes.items())))
        shas = sorted(set(hashes.values()))
        await asyncio.gather(
            *(one(key, None, thumbnails) for sha in shas for key in thumbnail_keys(sha))
        )
        return originals, thumbnails
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        await src.close()
        await dst.close()


def _scratch_parent(settings: Settings) -> Path:
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    return settings.tmp_dir


async def _copy_object(
    src: Media, dst: Media, key: str, sha256: str | None, scratch: Path, tally: Tally
) -> None:
    """One object: copied unless the target holds it whole (same size; for an original, the
    same SHA-256 read back), then checked."""
    source_stat = await src.stat(key)
    if source_stat is None:
        if sha256 is not None:  # a record without its original: worth knowing, not copying
            tally.problems.append(f"{key}: the record's original is missing at the source")
        return  # thumbnails exist for some sizes and formats only
    there = await dst.stat(key)
    whole = there is not None and there.size == source_stat.size
    if whole and (sha256 is None or await _digest(dst, key) == sha256):
        tally.present += 1
        return
    copy = scratch / hashlib.sha256(key.encode()).hexdigest()
    async with src.local_file(key) as path:
        digest = await asyncio.to_thread(_copy_and_hash, path, copy)
    if sha256 is not None and digest != sha256:
        copy.unlink(missing_ok=True)
        tally.problems.append(f"{key}: its bytes at the source do not match its record's SHA-256")
        return
    await dst.put_file(key, copy)  # moves the scratch copy
    if sha256 is not None and await _digest(dst, key) != sha256:
        tally.problems.append(f"{key}: read back from the target, its SHA-256 differs")
        return
    tally.copied += 1


def _copy_and_hash(path: Path, copy: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src, copy.open("wb") as out:
        while chunk := src.read(HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


async def _digest(media: Media, key: str) -> str | None:
    digest = hashlib.sha256()
    try:
        async with media.reader(key) as reader:
            async for chunk in reader.chunks():
                digest.update(chunk)
    except MediaMissing:
        return None
    return digest.hexdigest()


# -- database -------------------------------------------------------------------------------------


async def copy_database(db_path: Path, target: Settings) -> Tally:
    """Every row of every data table from the SQLite file to PostgreSQL, whose own migrations
    make the schema first. Rows already there (same primary key) are kept: a rerun adds what is
    missing. Identity sequences are moved past the copied ids."""
    import asyncpg

    if not db_path.is_file():
        raise SystemExit(f"imgapi: no SQLite database at DB_PATH={str(db_path)!r}")
    store = await open_store(target)  # applies the PostgreSQL migrations
    await store.close()
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    tally = Tally()
    conn = await asyncpg.connect(target.database_url)
    try:
        for table in await _parents_first(conn, _data_tables(source)):
            columns = await _target_columns(conn, table)
            if not columns:
                tally.problems.append(f"table {table}: not in the PostgreSQL schema")
                continue
            shared = [c for c in _source_columns(source, table) if c in columns]
            convert = [_converter(columns[c]) for c in shared]
            copied = await _copy_table(source, conn, table, shared, convert)
            tally.copied += copied
            source_rows = source.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
            target_rows = await conn.fetchval(f'SELECT count(*) FROM "{table}"')
            tally.present += source_rows - copied
            if target_rows < source_rows:
                tally.problems.append(
                    f"table {table}: {source_rows} rows at the source, {target_rows} at the target"
                )
        await _advance_sequences(conn)
    finally:
        await conn.close()
        source.close()
    return tally


def _data_tables(source: sqlite3.Connection) -> list[str]:
    rows = source.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return sorted(name for (name,) in rows if not name.startswith(_NOT_DATA))


async def _parents_first(conn: Any, tables: list[str]) -> list[str]:
    """The tables ordered so that each comes after the tables its foreign keys refer to."""
    rows = await conn.fetch(
        "SELECT conrelid::regclass::text AS child, confrelid::regclass::text AS parent"
        " FROM pg_constraint WHERE contype = 'f'"
    )
    parents: dict[str, set[str]] = {t: set() for t in tables}
    for row in rows:
        child, parent = row["child"].strip('"'), row["parent"].strip('"')
        if child in parents and parent in parents and child != parent:
            parents[child].add(parent)
    ordered: list[str] = []
    while parents:
        ready = sorted(t for t, p in parents.items() if not p - set(ordered))
        if not ready:  # a cycle: keep the rest as they are; PostgreSQL will say what fails
            ready = sorted(parents)
        ordered += ready
        for t in ready:
            del parents[t]
    return ordered


def _source_columns(source: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in source.execute(f'PRAGMA table_info("{table}")')]


async def _target_columns(conn: Any, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {row["column_name"]: row["data_type"] for row in rows}


def _converter(data_type: str) -> Callable[[Any], Any]:
    """SQLite's loose values into what asyncpg wants for the PostgreSQL column's type."""
    if data_type == "boolean":
        return lambda v: None if v is None else bool(v)
    if data_type in ("integer", "bigint", "smallint"):
        return lambda v: None if v is None else int(v)
    if data_type in ("double precision", "real", "numeric"):
        return lambda v: None if v is None else float(v)
    if data_type == "bytea":
        return lambda v: None if v is None else bytes(v)
    return lambda v: None if v is None else str(v)


async def _copy_table(
    source: sqlite3.Connection,
    conn: Any,
    table: str,
    columns: Sequence[str],
    convert: Sequence[Callable[[Any], Any]],
) -> int:
    names = ", ".join(f'"{c}"' for c in columns)
    cursor = source.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid')
    copied = 0
    while rows := cursor.fetchmany(BATCH_ROWS):
        values = [tuple(f(v) for f, v in zip(convert, row, strict=True)) for row in rows]
        # One transaction per batch: an interrupted run keeps whole batches, and a rerun's
        # ON CONFLICT skips them. COPY into a scratch table, then one INSERT that says how many
        # rows were new.
        async with conn.transaction():
            await conn.execute(f'CREATE TEMP TABLE migrate_batch (LIKE "{table}") ON COMMIT DROP')
            await conn.copy_records_to_table("migrate_batch", records=values, columns=columns)
            status = await conn.execute(
                f'INSERT INTO "{table}" ({names}) SELECT {names} FROM migrate_batch'
                " ON CONFLICT DO NOTHING"
            )
            copied += int(status.split()[-1])
    return copied


async def _advance_sequences(conn: Any) -> None:
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
        " AND (column_default LIKE 'nextval(%' OR is_identity = 'YES')"
    )
    for row in rows:
        table, column = row["table_name"], row["column_name"]
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence($1, $2),"
            f' GREATEST((SELECT max("{column}") FROM "{table}"), 1))',
            table,
            column,
        )
