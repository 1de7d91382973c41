"""A stand-in for the `dspark` command in supervisor tests: `fake_dspark.py ROLE --port P ...`
serves what `dspark up` health-checks (gRPC health for drafter/verifier, GET /healthz for the
router) in a fraction of a second, and appends "ROLE stopped" to $FAKE_DSPARK_LOG on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys


def arg(name: str, default: str = "") -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


async def main() -> None:
    role, host, port = sys.argv[1], arg("--host", "127.0.0.1"), int(arg("--port", "0"))
    if role == "router":
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    else:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"fake {role} listening on {host}:{port} threads={arg('--threads')} omp={os.environ.get('OMP_NUM_THREADS')}",
          flush=True)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    with open(os.environ["FAKE_DSPARK_LOG"], "a") as f:
        f.write(f"{role} stopped\n")


asyncio.run(main())
