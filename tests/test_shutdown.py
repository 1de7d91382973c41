"""`bounded_step`: a stop step that overruns is given up on at its limit, even one that ignores
cancellation (where `asyncio.wait_for` itself would hang), and the log names it and shows where
every pending task waits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dspark_common.shutdown import bounded_step


async def _stubborn(release: asyncio.Event) -> None:
    while True:
        try:
            await release.wait()
            return
        except asyncio.CancelledError:
            continue  # as a close awaited in a `finally`, or a library that swallows the cancel


async def test_wait_for_hangs_on_a_step_that_ignores_cancellation():
    release = asyncio.Event()
    outer = asyncio.ensure_future(asyncio.wait_for(_stubborn(release), 0.05))
    done, _ = await asyncio.wait({outer}, timeout=0.5)
    assert not done  # ten times past its limit, wait_for still waits for the cancel to land
    release.set()
    await outer


@pytest.mark.provokes_stop_overrun
async def test_bounded_step_gives_up_on_it_and_names_it(caplog):
    release = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="dspark_common.shutdown"):
        finished = await asyncio.wait_for(bounded_step("stubborn close", _stubborn(release), 0.1), 2)
    assert finished is False
    assert "stubborn close did not finish within 0.1 s" in caplog.text
    assert "in _stubborn" in caplog.text  # the pending task's frame: where the hang is
    release.set()
    await asyncio.sleep(0)


async def test_bounded_step_returns_true_and_logs_a_failure(caplog):
    async def fails() -> None:
        raise RuntimeError("socket already closed")

    with caplog.at_level(logging.ERROR, logger="dspark_common.shutdown"):
        assert await bounded_step("ok", asyncio.sleep(0), 1) is True
        assert await bounded_step("closing a store", fails(), 1) is True
    assert "closing a store failed" in caplog.text and "socket already closed" in caplog.text
