"""`?wait=SECONDS`: answer once every job of an image is finished, or when the time is up."""

from __future__ import annotations

import asyncio
import math
import re

from imgapi_core.errors import ClientError
from imgapi_core.events.hub import EventHub
from imgapi_core.store import JobState, Record, Store, all_finished

MAX_WAIT_S = 60.0

_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")


def wait_seconds(text: str | None) -> float:
    """The `wait` query parameter: 0 (absent) to 60 seconds, decimals allowed."""
    if text is None:
        return 0.0
    if not _SECONDS.fullmatch(text) or not math.isfinite(value := float(text)):
        raise ClientError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    if value > MAX_WAIT_S:
        raise ClientError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}")
    return value


async def until_ready(
    store: Store, hub: EventHub, image_id: str, seconds: float
) -> tuple[Record | None, dict[str, JobState]]:
    """The record and its jobs once they are all finished, the image is gone, or `seconds` have
    passed, whichever comes first. Woken by the image's own events, never by polling."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # Watching starts before the first read: an event between the two still wakes it.
    with hub.watch(image_id) as watch:
        while True:
            record, jobs = await store.record_with_jobs(image_id)
            remaining = deadline - loop.time()
            if record is None or all_finished(jobs) or remaining <= 0 or watch.ended:
                return record, jobs
            await watch.wait(remaining)
