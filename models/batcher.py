"""Merge concurrent requests into batches run by a blocking function in an executor."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

logger = logging.getLogger("imgapi.captions")

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    queued_at: float


class MicroBatcher(Generic[Item, Result]):
    """Runs `run(items) -> results` (same order) in `executor` for up to `batch_size` items.

    A batch starts when it is full or when its oldest item has waited `max_wait_s`, so an item
    that queued while the previous batch ran does not wait again. Bound to the running event
    loop it is created on; one batch runs at a time. `on_batch(size)`, when given, is told the
    size of each batch as it starts (for metrics).
    """

    def __init__(
        self,
        run: Callable[[list[Item]], list[Result]],
        executor: Executor,
        *,
        batch_size: int,
        max_wait_s: float,
        closed_error: Callable[[], BaseException],
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._run = run
        self._executor = executor
        self._batch_size = batch_size
        self._max_wait_s = max_wait_s
        self._closed_error = closed_error
        self._on_batch = on_batch
        self._pending: deque[_Pending[Item, Result]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, item: Item) -> Result:
        if self._closed:
            raise self._closed_error()
        if self._task is None:
            self._task = self.loop.create_task(self._serve(), name="imgapi-caption-batcher")
        future: asyncio.Future[Result] = self.loop.create_future()
        self._pending.append(_Pending(item, future, self.loop.time()))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop serving; callers still waiting get `closed_error()`. Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail(list(self._pending), self._closed_error)
        self._pending.clear()

    async def _serve(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._fill(self._pending[0].queued_at + self._max_wait_s)
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _fill(self, deadline: float) -> None:
        while self._live() < self._batch_size:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _live(self) -> int:
        return sum(1 for pending in self._pending if not pending.future.done())

    def _take(self) -> list[_Pending[Item, Result]]:
        batch: list[_Pending[Item, Result]] = []
        while self._pending and len(batch) < self._batch_size:
            pending = self._pending.popleft()
            if not pending.future.done():  # a caller that gave up (cancelled) costs nothing
                batch.append(pending)
        return batch

    async def _execute(self, batch: list[_Pending[Item, Result]]) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch))
            except Exception:  # an observer's error must not leave the batch's callers waiting
                logger.exception("on_batch callback failed")
        try:
            results: list[Any] = await self.loop.run_in_executor(
                self._executor, self._run, [pending.item for pending in batch]
            )
        except asyncio.CancelledError:
            # close() while the batch runs: its callers must not wait for ever.
            self._fail(batch, self._closed_error)
            raise
        except Exception as exc:  # every caller in the batch gets the error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Pending[Item, Result]], error: Callable[[], BaseException]) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error())
