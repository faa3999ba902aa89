"""The per-process key cache against a real store: a key created by another process works on the
first request after its creation, however recently the cache reloaded; unknown ids cost at most one
store read per UNKNOWN_RELOAD_S, shared by the requests that wait for it."""

from __future__ import annotations

import asyncio

from store_backends import StoreFactory

from imgapi_core.access import keys, tokens
from imgapi_core.store import ApiKey, Store
from imgapi_core.timestamps import now_iso


async def new_key(store: Store, name: str) -> str:
    key_id, token = tokens.new_key_token()
    await store.create_key(ApiKey(name, key_id, tokens.hash_token(token), ("read",), now_iso()))
    return token


class CountingStore:
    """Counts the cache's reads of the key table; everything else goes to the real store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0

    async def active_keys(self) -> list[ApiKey]:
        self.reads += 1
        return await self._store.active_keys()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


async def test_a_key_created_just_after_a_reload_works_at_once(make_store: StoreFactory) -> None:
    server, cli = await make_store(), await make_store()
    cache = keys.KeyCache(server, refresh_s=3600)
    await cache.start()
    try:
        await new_key(cli, "early")
        await cache.reload()  # a reload a moment ago: the next one is not due for a while
        token = await new_key(cli, "fresh")
        key = await cache.check(token)
        assert key is not None and key.name == "fresh"
    finally:
        await cache.close()


async def test_unknown_ids_share_one_reload_and_are_refused(make_store: StoreFactory) -> None:
    counting = CountingStore(await make_store())
    cache = keys.KeyCache(counting, refresh_s=3600)  # type: ignore[arg-type]
    await cache.start()
    try:
        assert counting.reads == 1
        guesses = [tokens.new_key_token()[1] for _ in range(20)]
        assert await asyncio.gather(*(cache.check(t) for t in guesses)) == [None] * 20
        # The 20 arrived together, so one reload begun after them answers them all.
        assert counting.reads == 2
        # A malformed token is refused without a read.
        assert await cache.check("not-a-token") is None
        assert counting.reads == 2
    finally:
        await cache.close()


async def test_a_wrong_secret_for_a_known_id_is_refused(store: Store) -> None:
    token = await new_key(store, "real")
    cache = keys.KeyCache(store, refresh_s=3600)
    await cache.start()
    try:
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        assert await cache.check(forged) is None
        assert (await cache.check(token)) is not None
    finally:
        await cache.close()
