"""`dspark up` (what `make up` runs): the whole local stack as supervised child processes —
drafter(s), verifier(s) and the router, each a `dspark <role> ...` command line (visible in `ps`).

Start order: with a GGUF target (the packaged default), drafters first — they load the target,
converting the GGUF to a cached safetensors copy on the very first run — then verifiers and the
router; with any other target, all at once (verifiers wait for their drafters). Each is waited for
until healthy (gRPC health
for drafters and verifiers, HTTP /healthz for the router), then the URL is printed. Internal gRPC
ports are chosen free unless given, and kept across restarts so peers reconnect. A child that dies
is restarted after a backoff (1 s, doubling to --max-backoff-s, reset after a minute of running)
while the others keep serving. SIGINT/SIGTERM stops everything: router first, then verifiers,
then drafters (SIGTERM, SIGKILL after 20 s). With --redis-url, the supervisor registers every
drafter and verifier in Redis (`router.registry.register_forever`) with the load from its Stats.

Children get --threads N and OMP_NUM_THREADS=N: 1 on machines with up to 4 cores (several
processes each spinning 2 OpenMP threads on 2 cores run many times slower), else cores / processes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dspark_common.settings import UpSettings

log = logging.getLogger("dspark.up")

STOP_GRACE_S = 20.0  # exiting a process that imported torch takes seconds on a busy machine
FIRST_DRAFTER_WAIT_S = 120.0  # at a concurrent start, how long verifiers wait for the drafters
HEALTHY_RESET_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dspark_command() -> list[str]:
    """How to run `dspark`: the console script next to this Python when installed, else the module."""
    script = Path(sys.executable).with_name("dspark")
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("dspark")
    return [sys.executable, found] if found else [sys.executable, "-m", "dspark_common.cli"]


def child_threads(settings: UpSettings) -> int:
    if settings.threads:
        return settings.threads
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else max(1, cores // (settings.verifiers + settings.drafters))


@dataclass
class Child:
    name: str  # "verifier-0"
    role: str  # "drafter" | "verifier" | "router"
    args: list[str]
    address: str  # what health checks and peers use
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff_s: float = 1.0
    tasks: list[asyncio.Task] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: UpSettings, *, command: list[str] | None = None, out=None) -> None:
        self.settings = settings
        self.command = command or dspark_command()
        self.out = out or sys.stdout
        self.threads = child_threads(settings)
        # A GGUF target may need its one-time conversion: let the drafters do it before the rest.
        self.staged = settings.model == "smollm2" or settings.model.endswith(".gguf")
        self.stopping = False
        self.children: list[Child] = []
        self._watchers: list[asyncio.Task] = []
        self._registrations: list[asyncio.Task] = []
        self._plan()

    def _plan(self) -> None:
        s, t = self.settings, str(self.threads)
        dports = list(s.drafter_ports) or [free_port() for _ in range(s.drafters)]
        vports = list(s.verifier_ports) or [free_port() for _ in range(s.verifiers)]
        if len(dports) != s.drafters or len(vports) != s.verifiers:
            from dspark_common.errors import InvalidRequest

            raise InvalidRequest("--drafter-ports/--verifier-ports must list one port per process", "verifier_ports")
        drafters = [f"127.0.0.1:{p}" for p in dports]
        for i, p in enumerate(dports):
            self.children.append(Child(f"drafter-{i}", "drafter", [
                "--host", "127.0.0.1", "--port", str(p), "--checkpoint", s.checkpoint, "--target", s.model,
                "--threads", t], drafters[i]))
        verifiers = [f"127.0.0.1:{p}" for p in vports]
        for i, p in enumerate(vports):
            self.children.append(Child(f"verifier-{i}", "verifier", [
                "--host", "127.0.0.1", "--port", str(p), "--model", s.model, "--drafter", ",".join(drafters),
                "--threads", t], verifiers[i]))
            if not self.staged and drafters:
                self.children[-1].args += ["--drafter-wait-s", str(FIRST_DRAFTER_WAIT_S)]
        router = ["--host", s.host, "--port", str(s.port), "--grpc-port", str(s.grpc_port), "--model", s.model,
                  "--verifier", ",".join(verifiers)]
        if s.redis_url:
            router += ["--redis-url", s.redis_url]
        self.children.append(Child("router", "router", router, f"{s.host}:{s.port}"))

    @property
    def url(self) -> str:
        host = self.settings.host if self.settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.settings.port}"

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ---- children ---------------------------------------------------------------------
    async def _spawn(self, c: Child) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        c.proc = await asyncio.create_subprocess_exec(
            *self.command, c.role, *c.args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        c.started_at = time.monotonic()
        log.info("started %s (pid %d): dspark %s %s", c.name, c.proc.pid, c.role, " ".join(c.args))
        asyncio.get_running_loop().create_task(self._relay(c, c.proc))

    async def _relay(self, c: Child, proc: asyncio.subprocess.Process) -> None:
        while line := await proc.stdout.readline():
            self._say(f"[{c.name}] {line.decode(errors='replace').rstrip()}")

    async def healthy(self, c: Child) -> bool:
        try:
            if c.role == "router":
                import aiohttp

                async with aiohttp.ClientSession() as http:
                    async with http.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        return r.status == 200
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            async with grpc.aio.insecure_channel(c.address) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
        except Exception:
            return False

    async def _wait_healthy(self, children: list[Child]) -> None:
        end = time.monotonic() + self.settings.startup_timeout_s
        pending = list(children)
        while pending:
            for c in list(pending):
                if c.proc.returncode is not None:
                    raise RuntimeError(f"{c.name} exited with code {c.proc.returncode} while starting")
                if await self.healthy(c):
                    log.info("%s is healthy", c.name)
                    pending.remove(c)
            if pending and time.monotonic() > end:
                raise TimeoutError(f"not healthy after {self.settings.startup_timeout_s:.0f} s: "
                                   f"{', '.join(c.name for c in pending)}")
            await asyncio.sleep(0.5)

    async def _watch(self, c: Child) -> None:
        """Restart `c` whenever it dies, with backoff, until the stack stops."""
        while True:
            code = await c.proc.wait()
            if self.stopping:
                return
            if time.monotonic() - c.started_at > HEALTHY_RESET_S:
                c.backoff_s = 1.0
            log.warning("%s exited with code %s; restarting in %.1f s", c.name, code, c.backoff_s)
            self._say(f"dspark up: {c.name} exited with code {code}; restarting in {c.backoff_s:.1f} s")
            await asyncio.sleep(c.backoff_s)
            if self.stopping:
                return
            c.backoff_s = min(c.backoff_s * 2, self.settings.max_backoff_s)
            c.restarts += 1
            await self._spawn(c)

    # ---- Redis registration ----------------------------------------------------------------
    def _register(self, c: Child) -> None:
        import grpc

        from dspark_common.proto import drafter_pb2, drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc
        from router.registry import register_forever

        channel = grpc.aio.insecure_channel(c.address)

        async def load() -> dict:
            if c.role == "verifier":
                s = await verifier_pb2_grpc.VerifierStub(channel).Stats(verifier_pb2.VerifierStatsRequest(), timeout=2)
                return {"running": s.running, "sessions": s.sessions, "max_sessions": s.max_sessions}
            s = await drafter_pb2_grpc.DrafterStub(channel).Stats(drafter_pb2.DrafterStatsRequest(), timeout=2)
            return {"sessions": s.sessions, "max_sessions": s.max_sessions}

        task = asyncio.get_running_loop().create_task(
            register_forever(self.settings.redis_url, c.role, c.address, load))
        self._registrations.append(task)

    # ---- the whole stack --------------------------------------------------------------------
    async def start(self) -> None:
        drafters = [c for c in self.children if c.role == "drafter"]
        rest = [c for c in self.children if c.role != "drafter"]
        if self.staged:
            for c in drafters:
                await self._spawn(c)
            await self._wait_healthy(drafters)
        for c in (rest if self.staged else self.children):
            await self._spawn(c)
        await self._wait_healthy(rest if self.staged else self.children)
        for c in self.children:
            if "--drafter-wait-s" in c.args:  # restarts use the verifier's default wait
                i = c.args.index("--drafter-wait-s")
                del c.args[i : i + 2]
            self._watchers.append(asyncio.get_running_loop().create_task(self._watch(c)))
            if self.settings.redis_url and c.role != "router":
                self._register(c)
        grpc = f"; gRPC dspark.v1.Router on {self.settings.host}:{self.settings.grpc_port}" \
            if self.settings.grpc_port > 0 else ""
        self._say(f"dspark up: serving {self.url} (OpenAI-compatible: {self.url}/v1{grpc}) with "
                  f"{self.settings.drafters} drafter(s), {self.settings.verifiers} verifier(s), "
                  f"{self.threads} thread(s) each; Ctrl-C stops")

    async def stop(self) -> None:
        self.stopping = True
        for t in self._watchers + self._registrations:
            t.cancel()
        for role in ("router", "verifier", "drafter"):
            group = [c for c in self.children if c.role == role and c.proc is not None and c.proc.returncode is None]
            for c in group:
                c.proc.send_signal(signal.SIGTERM)
            for c in group:
                try:
                    await asyncio.wait_for(c.proc.wait(), STOP_GRACE_S)
                except asyncio.TimeoutError:
                    log.warning("%s did not stop in %.0f s: killing it", c.name, STOP_GRACE_S)
                    c.proc.kill()
                    await c.proc.wait()
        self._say("dspark up: stopped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    UpSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = UpSettings.from_sources(args)

    async def main() -> int:
        sup = Supervisor(settings)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        starting = loop.create_task(sup.start())
        waiting = loop.create_task(done.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        rc = 0
        if starting.done() and starting.exception() is not None:
            log.error("the stack did not start: %s", starting.exception())
            rc = 1
        elif starting.done():
            await waiting
        else:
            starting.cancel()
        await sup.stop()
        return rc

    return asyncio.run(main())
