"""`GrpcServer.stop` is bounded: grpc.aio can lose the core's shutdown notice and then waits for it
forever (a CI teardown once hung 10 minutes). A server whose `stop` never returns stands in for
that; the real server stops promptly and refuses calls afterwards."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dspark_common import grpc_server
from dspark_common.grpc_server import GrpcServer


class _LostShutdown:
    async def stop(self, grace):
        await asyncio.Event().wait()  # the notice that never comes


@pytest.mark.provokes_stop_overrun
async def test_stop_gives_up_on_a_lost_shutdown_notice(monkeypatch, caplog):
    monkeypatch.setattr(grpc_server, "STOP_MARGIN_S", 0.2)
    server = GrpcServer([], host="127.0.0.1", port=0, max_message_bytes=1 << 20)
    await server.start()
    real, server.server = server.server, _LostShutdown()
    with caplog.at_level(logging.ERROR, logger="dspark_common.shutdown"):
        await asyncio.wait_for(server.stop(0.1), 5)
    assert "did not finish within" in caplog.text and server.server is None
    await real.stop(None)


async def test_stop_is_prompt_and_refuses_calls_afterwards():
    server = GrpcServer([], host="127.0.0.1", port=0, max_message_bytes=1 << 20)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.wait_for(server.stop(0.5), 5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
