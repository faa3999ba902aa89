"""The per-process key cache against a real store: a key created by another process works on the
first request after its creation, however recently the cache reloaded; unknown ids cost at most one
store read per UNKNOWN_RELOAD_S, shared by the requests that wait for it; a known key costs no
store read at all beyond the cache's own periodic reloads."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

from store_backends import StoreFactory

from imgapi_core.access import keys, tokens
from imgapi_core.store import ApiKey, Store
from imgapi_core.timestamps import now_iso


async def new_key(store: Store, name: str) -> str:
    key_id, token = tokens.new_key_token()
    await store.create_key(ApiKey(name, key_id, tokens.hash_token(token), ("read",), now_iso()))
    return token


class CountingStore:
    """Counts the cache's reads of the key table (`reads`) and its calls of every other store
    method (`calls`, by name); all go to the real store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0
        self.calls: Counter[str] = Counter()

    async def active_keys(self) -> list[ApiKey]:
        self.reads += 1
        return await self._store.active_keys()

    def __getattr__(self, name: str) -> object:
        found = getattr(self._store, name)
        if not callable(found):
            return found

        def counted(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            return found(*args, **kwargs)

        return counted


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


async def test_a_known_key_costs_no_store_read_per_check(make_store: StoreFactory) -> None:
    cli = await make_store()
    token = await new_key(cli, "busy")
    counting = CountingStore(await make_store())
    cache = keys.KeyCache(counting, refresh_s=3600)  # type: ignore[arg-type]
    await cache.start()
    try:
        assert counting.reads == 1  # the load at start
        for _ in range(500):  # one after another, and many at once
            key = await cache.check(token)
            assert key is not None and key.name == "busy"
        checked = await asyncio.gather(*(cache.check(token) for _ in range(500)))
        assert all(key is not None and key.name == "busy" for key in checked)
        # No periodic reload was due: the 1000 checks read nothing, wrote nothing.
        assert counting.reads == 1
        assert counting.calls == Counter(), counting.calls
    finally:
        await cache.close()


async def test_a_known_key_checked_while_the_cache_refreshes_costs_only_the_refreshes(
    make_store: StoreFactory,
) -> None:
    cli = await make_store()
    token = await new_key(cli, "busy")
    counting = CountingStore(await make_store())
    refresh_s = 0.1
    cache = keys.KeyCache(counting, refresh_s=refresh_s)  # type: ignore[arg-type]
    await cache.start()
    started = time.monotonic()
    try:
        checks = 0
        while time.monotonic() - started < 0.5:
            for _ in range(50):
                assert await cache.check(token) is not None
                checks += 1
            await asyncio.sleep(0.005)  # lets the refresh task run
        elapsed = time.monotonic() - started
        reads, calls = counting.reads, Counter(counting.calls)
    finally:
        await cache.close()
    # At most one reload per refresh_s since start (plus the load at start), and one write-back
    # of last-used times per reload: however many checks there were.
    reloads = math.ceil(elapsed / refresh_s)
    print(f"{checks} checks in {elapsed:.2f} s: {reads} key reads, other store calls {dict(calls)}")
    assert checks >= 500
    assert 2 <= reads <= 1 + reloads, (reads, reloads)
    assert set(calls) <= {"mark_keys_used"}, calls
    assert calls["mark_keys_used"] <= reloads, (calls, reloads)
