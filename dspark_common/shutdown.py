"""Stopping a service in bounded, named steps.

A service told to stop must stop. `asyncio.wait_for` is not enough for that: on timeout it cancels
the step and then *waits for the cancellation to finish*, so a step that ignores or outlives
cancellation (a close awaited in a `finally`, a library that catches CancelledError) hangs the
stop all the same. `bounded_step` waits with `asyncio.wait`, which returns at the limit whatever the
step does, cancels the step without waiting for it, and logs which step overran together with the
stack of every pending task, so the log names the await that never returned (an asyncio hang
otherwise shows only a loop idling in select())."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)

STOP_STEP_LIMIT_S = 5.0  # a close step (channels, stores, background tasks) that takes longer is stuck
OVERRUN_MESSAGE = "stop step overran"  # tests/conftest.py collects these records from every test


def pending_task_stacks(loop: asyncio.AbstractEventLoop | None = None, limit: int = 12) -> str:
    """Every pending task of `loop` (default: the running one) with the frames it is suspended in,
    innermost last. From another thread (a hang watchdog) the task set can change while it is read;
    that is retried."""
    for _ in range(3):
        try:
            tasks = list(asyncio.all_tasks(loop))
            break
        except RuntimeError:  # "Set changed size during iteration"
            tasks = []
    lines = []
    for task in tasks:
        lines.append(f"--- task {task.get_name()}: {task.get_coro()!r}")
        for frame in task.get_stack(limit=limit):
            lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
    return "\n".join(lines)


async def bounded_step(name: str, step: Awaitable, limit_s: float) -> bool:
    """Await `step` for at most `limit_s` seconds. True when it finished (its exception, if any, is
    logged, not raised: a stop goes on to its next step); False when it overran, after logging it."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("stop step %s failed: %r", name, task.exception())
        return True
    log.error("%s: %s did not finish within %.1f s; going on without it. Pending tasks:\n%s",
              OVERRUN_MESSAGE, name, limit_s, pending_task_stacks())
    task.cancel()  # not awaited: a step that ignores cancellation is how a stop hangs
    return False
