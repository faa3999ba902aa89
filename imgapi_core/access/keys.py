"""The API keys a process accepts, cached in memory: checking a request's key costs no database
round trip. The cache is reloaded every second (a key revoked by `imgapi.py keys revoke` stops
working in every process within that, plus one reload), and when a request carries a key id the
cache does not know yet (a key created a moment ago): that request waits for a reload begun after
it arrived, so a key works as soon as the command that created it has returned. Last-used times
are written back in one batch per reload, not per request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from imgapi_core.access import tokens
from imgapi_core.store import ApiKey, Store
from imgapi_core.timestamps import now_iso

log = logging.getLogger("imgapi.access")

REFRESH_S = 1.0
# Unknown key ids trigger a reload at most this often (a request waits for the next one): a client
# guessing ids cannot turn every request into a database read.
UNKNOWN_RELOAD_S = 0.25


class KeyCache:
    def __init__(self, store: Store, refresh_s: float = REFRESH_S) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._by_id: dict[str, ApiKey] = {}
        self._used: dict[str, str] = {}
        self._loaded_at = 0.0
        # When the last finished reload began: it saw every key committed before then.
        self._read_at = float("-inf")
        self._task: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._refresh_forever(), name="imgapi-key-cache")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._flush_used()

    @property
    def empty(self) -> bool:
        return not self._by_id

    async def reload(self) -> None:
        async with self._reload_lock:
            await self._load()

    async def _load(self) -> None:
        began = time.monotonic()
        keys = await self.store.active_keys()
        self._by_id = {key.key_id: key for key in keys}
        self._read_at, self._loaded_at = began, time.monotonic()

    async def _reload_newer_than(self, asked_at: float) -> None:
        """A reload that began after `asked_at`: one already done, or a new one, at most one per
        UNKNOWN_RELOAD_S. Requests waiting together share one."""
        async with self._reload_lock:
            if self._read_at > asked_at:
                return
            await asyncio.sleep(self._loaded_at + UNKNOWN_RELOAD_S - time.monotonic())
            await self._load()

    async def check(self, token: str) -> ApiKey | None:
        """The key this token belongs to, or None (unknown, revoked, malformed)."""
        key_id = tokens.key_id_of(token)
        if key_id is None:
            return None
        key = self._by_id.get(key_id)
        if key is None:
            await self._reload_newer_than(time.monotonic())
            key = self._by_id.get(key_id)
        if key is None or not tokens.matches(token, key.token_hash):
            return None
        self._used[key_id] = now_iso()
        return key

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self._flush_used()
                await self.reload()
            except Exception as exc:
                log.warning("could not reload API keys: %s", exc)

    async def _flush_used(self) -> None:
        used, self._used = self._used, {}
        if used:
            await self.store.mark_keys_used(used)
