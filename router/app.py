"""The router assembled: tokenizer, session store, verifier pool and registry, admission, metrics,
the generation service, and the HTTP and gRPC servers over them; `start` binds both (port 0 =
any free port) and `stop` closes everything."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from dspark_common.grpc_server import GrpcServer
from dspark_common.settings import RouterSettings
from dspark_common.shutdown import STOP_STEP_LIMIT_S, bounded_step
from dspark_common._proto.dspark.v1 import router_pb2_grpc
from router.admission import Admission
from router.generation import GenerationService
from router.grpc_api import SERVICE_NAME, RouterService
from router.http_api import build_app
from router.metrics import RouterMetrics
from router.openai_schema import Limits
from router.registry import Registry
from router.sessions import RedisStore, make_store
from router.tokenizer import TargetTokenizer, load_tokenizer
from router.verifier_client import VerifierPool

log = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 30.0
SHUTDOWN_GRACE_S = 2.0  # running generations get this long to finish when the router stops


class RouterCore:
    def __init__(self, settings: RouterSettings, tokenizer: TargetTokenizer | None = None) -> None:
        s = self.settings = settings
        self.tokenizer = tokenizer or load_tokenizer(s.model, s.model_name)
        self.limits = Limits(s.default_max_tokens, s.max_tokens_limit, s.max_prompt_tokens)
        self.metrics = RouterMetrics()
        self.admission = Admission(s.max_sessions, s.retry_after_s)
        self.store = make_store(s.redis_url, s.session_ttl_s, prefix=s.redis_prefix)
        self.store_kind = "redis" if isinstance(self.store, RedisStore) else "memory"
        self.pool = VerifierPool()
        self.registry = Registry(
            list(s.verifier), self.pool.stats, redis_client=self.store.redis if isinstance(self.store, RedisStore) else None,
            prefix=s.redis_prefix, interval_s=s.health_interval_s, on_removed=self.pool.drop,
        )
        self.generations = GenerationService(settings=s, tokenizer=self.tokenizer, pool=self.pool,
                                             registry=self.registry, store=self.store, admission=self.admission,
                                             metrics=self.metrics)
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self._grpc: GrpcServer | None = None
        self._sweeper: asyncio.Task | None = None
        self.http_port = 0
        self.grpc_port = 0

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.http_port}"

    async def start(self) -> int:
        s = self.settings
        await self.registry.start()
        self._runner = web.AppRunner(build_app(self), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_GRACE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.host, s.port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]
        if s.grpc_port >= 0:
            self._grpc = GrpcServer([(router_pb2_grpc.add_RouterServicer_to_server, RouterService(self), SERVICE_NAME)],
                                    host=s.host, port=s.grpc_port, max_message_bytes=64 << 20)
            self.grpc_port = await self._grpc.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self.http_port

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(EXPIRY_SWEEP_S, self.settings.session_ttl_s))
            try:
                await self.generations.release_expired()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("releasing expired sessions failed")

    async def stop(self) -> None:
        t0 = time.perf_counter()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # The servers first (in parallel: both give running calls SHUTDOWN_GRACE_S), then what they
        # used. Every step is bounded and named (dspark_common.shutdown): CI teardowns of this
        # stack have hung twice, and a router told to stop must stop and say what overran.
        servers = []
        if self._grpc is not None:
            servers.append(self._grpc.stop(SHUTDOWN_GRACE_S))  # bounded inside, step by step
        if self._runner is not None:
            servers.append(bounded_step("router HTTP server", self._runner.cleanup(),
                                        SHUTDOWN_GRACE_S + STOP_STEP_LIMIT_S))
        await asyncio.gather(*servers)
        for name, step in (("registry", self.registry.stop), ("verifier pool", self.pool.close),
                           ("session store", self.store.close)):
            await bounded_step(f"router {name}", step(), STOP_STEP_LIMIT_S)
        log.info("router stopped in %.1f s", time.perf_counter() - t0)
