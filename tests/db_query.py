"""The app's database read and written directly by a test, on a connection of its own, whichever
engine the test's settings name: SQLite at DB_PATH, or PostgreSQL at DATABASE_URL. Statements are
written for SQLite (`?` placeholders); PostgreSQL gets them with `$n`. Rows answer both `row[0]`
and `row["column"]` (sqlite3.Row, asyncpg.Record)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg

from imgapi_core.settings import Settings

T = TypeVar("T")


def fetch(cfg: Settings, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    if not cfg.database_url:
        conn = sqlite3.connect(cfg.db_path, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(sql, tuple(params)))
        finally:
            conn.close()
    return _on_postgresql(cfg, lambda conn: conn.fetch(_numbered(sql), *params))


def execute(cfg: Settings, sql: str, params: Iterable[Any] = ()) -> int:
    """Runs one write in its own transaction; the number of rows it changed."""
    if not cfg.database_url:
        conn = sqlite3.connect(cfg.db_path, timeout=30)
        try:
            with conn:
                return conn.execute(sql, tuple(params)).rowcount
        finally:
            conn.close()

    async def run(conn: asyncpg.Connection) -> int:
        status = await conn.execute(_numbered(sql), *params)
        return int(status.split()[-1])

    return _on_postgresql(cfg, run)


def _numbered(sql: str) -> str:
    pieces = sql.split("?")
    return pieces[0] + "".join(f"${i}{rest}" for i, rest in enumerate(pieces[1:], start=1))


def _on_postgresql(cfg: Settings, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        conn = await asyncpg.connect(cfg.database_url)
        try:
            return await work(conn)
        finally:
            await conn.close()

    # The test's own loop may be running (and blocked here): the query gets a loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result(timeout=30)
