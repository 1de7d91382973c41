"""RouterCore.stop is bounded: a close step that never returns is logged and skipped."""

from __future__ import annotations

import asyncio
import logging

import pytest

import router.app
from tests.router_stack import router_tokenizer, start_router


@pytest.mark.provokes_stop_overrun
async def test_stop_goes_on_past_a_store_that_never_closes(monkeypatch, caplog):
    monkeypatch.setattr(router.app, "STOP_STEP_LIMIT_S", 0.2)
    core = await start_router(router_tokenizer(), ["127.0.0.1:1"])  # no verifier needed to stop

    async def never() -> None:
        await asyncio.Event().wait()

    real_close = core.store.close
    monkeypatch.setattr(core.store, "close", never)
    with caplog.at_level(logging.ERROR, logger="dspark_common.shutdown"):
        await core.stop()  # without the bound this never returns (pytest-timeout would fail it)
    assert "router session store did not finish within" in caplog.text
    await real_close()
