"""MicroBatcher: batching window, per-key ordering, and no waiting when everyone is in."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from dspark_common.micro_batch import MicroBatcher


def _batcher(window_s: float, expected=None):
    batches: list[list[tuple[str, int]]] = []

    def run(items):
        batches.append(list(items))
        return [v * 10 for _, v in items]

    return MicroBatcher(run, ThreadPoolExecutor(1), key=lambda it: it[0], window_s=window_s, expected=expected), batches


def test_no_window_when_every_expected_key_is_queued():
    async def main():
        mb, batches = _batcher(window_s=60.0, expected=lambda: 1)
        mb.start()
        try:  # a 60 s window would time out here: a single expected session must not wait for company
            assert await asyncio.wait_for(mb.submit(("a", 1)), 10) == 10
        finally:
            await mb.stop()
        assert batches == [[("a", 1)]]

    asyncio.run(main())


def test_window_batches_distinct_keys_and_orders_one_key():
    async def main():
        mb, batches = _batcher(window_s=0.05, expected=lambda: 3)
        mb.start()
        try:
            futs = [mb.submit(x) for x in [("a", 1), ("b", 2), ("a", 3)]]
            assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [10, 20, 30]
        finally:
            await mb.stop()
        # a's second item waits for the next batch: one session's items run in order
        assert batches == [[("a", 1), ("b", 2)], [("a", 3)]]

    asyncio.run(main())


def test_a_failing_item_fails_alone():
    async def main():
        def run(items):
            return [ValueError("bad") if v < 0 else v for _, v in items]

        mb = MicroBatcher(run, ThreadPoolExecutor(1), key=lambda it: it[0], window_s=0.01)
        mb.start()
        try:
            good, bad = mb.submit(("a", 1)), mb.submit(("b", -1))
            assert await asyncio.wait_for(good, 10) == 1
            with pytest.raises(ValueError):
                await asyncio.wait_for(bad, 10)
        finally:
            await mb.stop()

    asyncio.run(main())
