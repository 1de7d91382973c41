"""Starting and stopping the project's grpc.aio servers the same way everywhere: message size
limits, the standard gRPC health service, port 0 resolved to the bound port, and a `serve` that
runs until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dspark_common.shutdown import STOP_STEP_LIMIT_S, bounded_step

log = logging.getLogger(__name__)

STOP_MARGIN_S = 10.0  # beyond the grace period, how long a stop waits for grpc.aio to confirm it


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel/server options bounding both directions' message size."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class GrpcServer:
    """A grpc.aio server with health checking for `services` ((add_fn, servicer, full name))."""

    def __init__(
        self,
        services: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
        *,
        host: str,
        port: int,
        max_message_bytes: int,
    ) -> None:
        self._services = list(services)
        self._address = f"{host}:{port}"
        self._options = message_options(max_message_bytes)
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        server = grpc.aio.server(options=self._options)
        for add, servicer, _ in self._services:
            add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(self._address)
        if not self.port:
            raise OSError(f"cannot listen on {self._address}")
        await server.start()
        self.server = server
        for name in ["", *(name for _, _, name in self._services)]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new calls, give running ones `grace` seconds, then cancel them. Bounded: grpc.aio
        can lose the core's shutdown notice and then waits for it forever (grpc/grpc#28999);
        a service that is told to stop must stop, so past the grace and a margin it gives up on
        the notice, and says so. Every step is bounded here, so callers need no bound of their own."""
        if self.server is None:
            return
        server, self.server = self.server, None
        await bounded_step(f"gRPC server on {self._address} (health: not serving)",
                           self.health.enter_graceful_shutdown(), STOP_STEP_LIMIT_S)
        await bounded_step(f"gRPC server on {self._address} (confirming its shutdown)", server.stop(grace),
                           (grace or 0.0) + STOP_MARGIN_S)


async def serve_until_signal(stop: Callable[[], Any]) -> None:
    """Block until SIGINT or SIGTERM, then await `stop()`."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    log.info("shutting down")
    await stop()
