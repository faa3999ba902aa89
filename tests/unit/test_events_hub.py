"""The per-process event follower and SSE framing, on a fake store: what each subscriber, watcher
and listener is handed, in order, and how a stream that falls behind is dropped."""

from __future__ import annotations

import asyncio
import json

from imgapi_core.events import sse
from imgapi_core.events.hub import EventHub
from imgapi_core.store import Event


class LogStore:
    """The three event methods of the Store protocol over a list."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.listeners: list = []
        self.reads = 0

    def add(self, image_id: str, type_: str = "job.done") -> None:
        event = Event(len(self.events) + 1, type_, image_id, "exif", "done", None, "t")
        self.events.append(event)
        for listener in self.listeners:
            listener(event.id)

    def add_commit_listener(self, listener) -> None:
        self.listeners.append(listener)

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        self.reads += 1
        return [e for e in self.events if e.id > after_id][:limit]

    async def last_event_id(self) -> int:
        return len(self.events)

    async def prune_events(self, before: str) -> int:
        return 0


async def started(store: LogStore) -> EventHub:
    hub = EventHub(store, poll_s=60)  # no poll within a test: only commits wake it
    await hub.start()
    return hub


async def test_a_commit_wakes_subscribers_watchers_and_listeners_in_order() -> None:
    store = LogStore()
    store.add("old")  # before the start: not handed out
    hub = await started(store)
    heard: list[int] = []
    hub.on_event(lambda e: heard.append(e.id))
    try:
        with hub.subscribe() as stream, hub.watch("img") as watch:
            store.add("img")
            store.add("other")
            assert await watch.wait(5)
            got = [await stream.get(), await stream.get()]
            assert [e.image_id for e in got] == ["img", "other"]
            assert heard == [2, 3]
            assert not await watch.wait(0.05)  # "other" does not wake a watcher of "img"
        assert hub.streams == 0
    finally:
        await hub.close()


async def test_a_failing_listener_does_not_stop_the_others() -> None:
    store = LogStore()
    hub = await started(store)

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    hub.on_event(broken)
    try:
        with hub.subscribe() as stream:
            store.add("img")
            assert (await asyncio.wait_for(stream.get(), 5)).image_id == "img"
    finally:
        await hub.close()


async def test_a_stream_that_falls_too_far_behind_is_dropped() -> None:
    store = LogStore()
    hub = await started(store)
    try:
        with hub.subscribe(maxsize=3) as stream:
            for i in range(5):
                store.add(f"img{i}")
            items = [await asyncio.wait_for(stream.get(), 5) for _ in range(4)]
            assert [e.image_id for e in items[:3]] == ["img0", "img1", "img2"]
            assert items[3] is None and stream.dropped
            assert hub.streams == 0
    finally:
        await hub.close()


async def test_many_commits_at_once_cost_few_reads() -> None:
    store = LogStore()
    hub = await started(store)
    try:
        with hub.subscribe() as stream:
            for i in range(200):
                store.add(f"img{i}")
            for _ in range(200):
                await asyncio.wait_for(stream.get(), 5)
        assert store.reads <= 3  # woken 200 times in one loop turn: one read
    finally:
        await hub.close()


def test_an_event_is_one_frame_with_its_id_type_and_one_line_of_json() -> None:
    event = Event(7, "job.failed", "img", "caption", "failed", "line one\nline two\r", "t")
    frame = sse.frame(event)
    assert frame.endswith(b"\n\n")
    lines = frame.decode().split("\n")[:-2]
    assert lines[0] == "id: 7" and lines[1] == "event: job.failed"
    assert len(lines) == 3 and lines[2].startswith("data: ")
    assert json.loads(lines[2].removeprefix("data: ")) == event.as_json()


def test_comments_and_retry_cannot_break_the_framing() -> None:
    assert sse.comment("a\nb\rc") == b": a b c\n\n"
    assert sse.retry(2000) == b"retry: 2000\n\n"
