"""Micro-batching for the services: work items submitted from many asyncio tasks (sessions,
streams) run together, in one call on one worker thread, so the model does one batched step for
everything that is ready and the event loop never blocks on it."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch(items) -> results` (one result per item, in order; an exception instance
    fails only its own item) on `executor` for whatever has queued.

    A batch takes the queue as it stands — after waiting `window_s` past its first item for
    company, unless `expected()` keys are queued already — up to `max_batch` items and at most
    one item per `key` (a later item of the same key waits for the next batch, so one session's
    items run in submission order). Items queued while a batch runs form the next one."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | BaseException]],
        executor: Executor,
        *,
        key: Callable[[Item], Hashable],
        window_s: float = 0.0,
        max_batch: int = 64,
        expected: Callable[[], int] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._key = key
        self._window_s = window_s
        self._max_batch = max_batch
        self._expected = expected
        self._queue: collections.deque[tuple[Item, asyncio.Future]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()

    def submit(self, item: Item) -> asyncio.Future:
        if self._task is None or self._task.done():
            raise RuntimeError("the micro-batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wakeup.set()
        return fut

    def _take_batch(self) -> list[tuple[Item, asyncio.Future]]:
        batch, held, keys = [], [], set()
        while self._queue and len(batch) < self._max_batch:
            item, fut = self._queue.popleft()
            if fut.cancelled():
                continue
            key = self._key(item)
            if key in keys:
                held.append((item, fut))
            else:
                keys.add(key)
                batch.append((item, fut))
        self._queue.extendleft(reversed(held))
        return batch

    def _all_in(self) -> bool:
        """Every key that could submit has an item queued: waiting for company would only add
        latency (always the case with a single session)."""
        if self._expected is None:
            return False
        return len({self._key(item) for item, _ in self._queue}) >= self._expected()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._window_s > 0 and not self._all_in():
                await asyncio.sleep(self._window_s)
            batch = self._take_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [item for item, _ in batch])
            except Exception as e:  # a bug in run_batch: fail this batch, keep serving
                log.exception("a micro-batch failed")
                results = [e] * len(batch)
            for (_, fut), result in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
