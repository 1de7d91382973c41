"""`dspark router`: the router as a process (settings from flags and DSPARK_* variables)."""

from __future__ import annotations

import argparse
import asyncio

from dspark_common.grpc_server import serve_until_signal
from dspark_common.settings import RouterSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    RouterSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from router.app import RouterCore

    settings = RouterSettings.from_sources(args)
    from dspark_common.tracing import setup_tracing

    setup_tracing("router")

    async def main() -> None:
        core = RouterCore(settings)
        await core.start()
        grpc = f", gRPC {settings.host}:{core.grpc_port}" if core.grpc_port else ""
        print(f"dspark router listening on {core.url}{grpc} (model {core.tokenizer.model_name}, "
              f"{core.store_kind} sessions, verifiers {settings.verifier or 'from Redis'})", flush=True)
        await serve_until_signal(core.stop)

    asyncio.run(main())
    return 0
