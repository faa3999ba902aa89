"""One Redis channel per deployment that says "events up to id N are committed".

A process that commits events PUBLISHes (coalesced: one message in flight at a time, carrying the
newest id); every API process SUBSCRIBEs and wakes its hub. The message is only a wake-up: the
events themselves are read from the store, so a lost message costs latency (the hub's fallback
poll), never an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from imgapi_core.store import Store

log = logging.getLogger("imgapi.events")

RECONNECT_S = 1.0


def channel_name(arq_queue: str) -> str:
    """Beside the arq queue, so deployments (and tests) sharing one Redis stay apart."""
    return f"{arq_queue}:events"


class RedisNotifier:
    def __init__(self, redis_url: str, channel: str) -> None:
        self.channel = channel
        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._newest = 0
        self._published = 0
        self._sender: asyncio.Task | None = None
        self._warned = False

    def attach(self, store: Store) -> None:
        """Publish after each of this process's commits that added events."""
        self._loop = asyncio.get_running_loop()
        store.add_commit_listener(self.committed)

    def committed(self, event_id: int) -> None:
        """From any thread (the store calls it on its writer thread)."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._note, event_id)

    def _note(self, event_id: int) -> None:
        self._newest = max(self._newest, event_id)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send())

    async def _send(self) -> None:
        while self._published < self._newest:
            newest = self._newest
            try:
                await self._redis.publish(self.channel, str(newest))
            except (RedisError, OSError) as exc:
                if not self._warned:
                    log.warning(
                        "cannot publish events to Redis (%s); other processes will "
                        "see them by polling until it is back",
                        exc,
                    )
                    self._warned = True
                return
            self._warned = False
            self._published = newest

    async def listen(self, on_message: Callable[[int], None]) -> None:
        """Calls on_message(event_id) for every message, for ever, reconnecting after errors."""
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        with contextlib.suppress(ValueError):
                            on_message(int(message["data"]))
            except (RedisError, OSError) as exc:
                log.debug("event channel lost (%s); reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RECONNECT_S)

    async def close(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sender, 1.0)
        await self._redis.aclose()
