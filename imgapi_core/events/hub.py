"""The event log as this process sees it: one follower reads new events from the store and hands
each to the waiters and streams of this process.

It reads when woken: by this process's own commits (the store's commit listener), by the Redis
channel when other processes commit (workers, other API processes), and, as a safety net for a
lost wake-up or a deployment without Redis, every POLL_S. One read per wake-up per process, never
one per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from imgapi_core.cancelling import cancel_all
from imgapi_core.events.notify import RedisNotifier
from imgapi_core.store import Event, Store
from imgapi_core.timestamps import now_iso

log = logging.getLogger("imgapi.events")

POLL_S = 1.0
READ_BATCH = 500
PRUNE_EVERY_S = 600.0
# Events a stream may fall behind by before it is closed (its client resumes by Last-Event-ID).
STREAM_BACKLOG = 2000


class Subscription:
    """The live events of one stream, in order. `None` from get() means the stream fell too far
    behind and was dropped."""

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize + 1)
        self._maxsize = maxsize
        self.dropped = False

    def offer(self, event: Event) -> bool:
        if self._queue.qsize() >= self._maxsize:
            self.dropped = True
            self._queue.put_nowait(None)
            return False
        self._queue.put_nowait(event)
        return True

    async def get(self) -> Event | None:
        return await self._queue.get()

    def end(self) -> None:
        self._queue.put_nowait(None)


class Watch:
    """Woken by every event of one image (wait=), and once by a shutdown."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.ended = False

    def wake(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """True when an event came (since the last wait), False when the time ran out."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the wait completes.
        try:
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class EventHub:
    def __init__(
        self,
        store: Store,
        notifier: RedisNotifier | None = None,
        *,
        keep_s: float = 86400.0,
        poll_s: float = POLL_S,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.keep_s = keep_s
        self.poll_s = poll_s
        self.last_id = 0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: set[Subscription] = set()
        self._watches: dict[str, set[Watch]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._tasks: list[asyncio.Task] = []
        self._ending = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.last_id = await self.store.last_event_id()
        self.store.add_commit_listener(self._committed)
        self._tasks.append(asyncio.create_task(self._follow(), name="imgapi-events"))
        self._tasks.append(asyncio.create_task(self._prune(), name="imgapi-events-prune"))
        if self.notifier is not None:
            self.notifier.attach(self.store)
            self._tasks.append(
                asyncio.create_task(self.notifier.listen(self._heard), name="imgapi-events-redis")
            )

    def _committed(self, event_id: int) -> None:
        # On the store's writer thread.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._heard, event_id)

    def _heard(self, event_id: int) -> None:
        if event_id > self.last_id:
            self._wake.set()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._read_new()
            except Exception as exc:  # the database is busy or gone: the next round tries again
                log.warning("cannot read new events: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(self.poll_s)

    async def _prune(self) -> None:
        """Events older than keep_s go (every API process does it; the deletes are idempotent)."""
        while True:
            try:
                await self.store.prune_events(now_iso(self.keep_s))
            except Exception as exc:
                log.warning("cannot prune old events: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _read_new(self) -> None:
        while True:
            events = await self.store.events_after(self.last_id, READ_BATCH)
            for event in events:
                self.last_id = event.id
                self._dispatch(event)
            if len(events) < READ_BATCH:
                return

    def on_event(self, listener: Callable[[Event], None]) -> None:
        """`listener(event)` for every event, on the event loop; it must not block."""
        self._listeners.append(listener)

    def _dispatch(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on event %d", event.id)
        for watch in self._watches.get(event.image_id, ()):
            watch.wake()
        for stream in list(self._streams):
            if not stream.offer(event):
                self._streams.discard(stream)

    @contextlib.contextmanager
    def subscribe(self, maxsize: int = STREAM_BACKLOG) -> Iterator[Subscription]:
        """Every event dispatched from now on, until the block ends."""
        stream = Subscription(maxsize)
        if self._ending:
            stream.end()
        else:
            self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)

    @contextlib.contextmanager
    def watch(self, image_id: str) -> Iterator[Watch]:
        """Woken by each event of `image_id` from now on, until the block ends."""
        watch = Watch()
        watch.ended = self._ending
        self._watches.setdefault(image_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(image_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[image_id]

    @property
    def streams(self) -> int:
        return len(self._streams)

    def end_all(self) -> None:
        """A shutdown: streams end and waiters answer now, so that no open connection holds the
        server for its whole graceful-shutdown timeout."""
        self._ending = True
        for stream in self._streams:
            stream.end()
        self._streams.clear()
        for watches in self._watches.values():
            for watch in watches:
                watch.ended = True
                watch.wake()

    async def close(self) -> None:
        await cancel_all(self._tasks)
        self._tasks.clear()
        if self.notifier is not None:
            await self.notifier.close()
