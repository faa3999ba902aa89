"""Stopping background tasks without hanging a shutdown.

A cancellation can be swallowed below us: redis-py's retry loop (retry on OSError, which
TimeoutError is) can turn a cancellation that meets a connect timeout into one more retry, and a
patient connection retries for ever. So a task is cancelled again each round until it ends, and
after `patience` seconds it is left behind with a warning rather than wedging the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable

log = logging.getLogger("imgapi")

ROUND_S = 0.5


async def cancel_all(tasks: Iterable[asyncio.Task], patience: float = 10.0) -> None:
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(ROUND_S, deadline - loop.time()))
        if pending and loop.time() >= deadline:
            log.warning(
                "left %d background task(s) running after %.0f s of cancelling: %s",
                len(pending),
                patience,
                ", ".join(task.get_name() for task in pending),
            )
            return


async def bounded(awaitable: Awaitable[object], seconds: float, what: str) -> None:
    """Awaits a clean-up step for at most `seconds` (it may need a Redis that is gone)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        log.warning("%s did not finish within %.0f s; going on without it", what, seconds)
        await cancel_all([task], patience=1.0)
        return
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
