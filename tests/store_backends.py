"""The store backends every contract test runs against, and the fixtures that open them (a
plugin of tests/conftest.py).

A backend is one entry of BACKENDS: an async opener that takes the test's tmp_path (and the store's
options, such as webhook_urls) and returns an opened store on that test's database. Calling it
twice with the same tmp_path must give two stores on the same database (two processes, in effect):
tests of claims and leases between runners do that. PostgreSQL runs on the session's private cluster
(tests/services.py), in a database named after tmp_path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from services import PostgresServer, name_for

from imgapi_core.store import Store
from imgapi_core.store.sqlite import SqliteStore

Opener = Callable[..., Awaitable[Store]]


def _sqlite(request: pytest.FixtureRequest) -> Opener:
    async def open_sqlite(tmp_path: Path, webhook_urls: Sequence[str] = ()) -> Store:
        path = tmp_path / "data" / "imgapi.db"
        return await SqliteStore(path, webhook_urls=webhook_urls).open()

    return open_sqlite


def _postgresql(request: pytest.FixtureRequest) -> Opener:
    from imgapi_core.store.postgres import PostgresStore

    server: PostgresServer = request.getfixturevalue("postgres_server")

    async def open_postgresql(tmp_path: Path, webhook_urls: Sequence[str] = ()) -> Store:
        url = server.create_database(name_for(tmp_path, "t"))
        return await PostgresStore(url, webhook_urls=webhook_urls).open()

    return open_postgresql


# name -> a function of the test's request that gives the opener (starting its server if need be)
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Opener]] = {
    "sqlite": _sqlite,
    "postgresql": _postgresql,
}

StoreFactory = Callable[..., Awaitable[Store]]


@pytest.fixture(params=list(BACKENDS))
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens a store on this test's database; each call is one more store on the same database
    (keyword arguments are the store's options). Every store it opened is closed after the test."""
    opener = BACKENDS[request.param](request)
    opened: list[Store] = []

    async def factory(**options: object) -> Store:
        s = await opener(tmp_path, **options)
        opened.append(s)
        return s

    try:
        yield factory
    finally:
        for s in reversed(opened):
            await s.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()
