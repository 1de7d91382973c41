"""Replicas and placement.

Verifiers (and drafters) become known to the router in two ways: fixed addresses from flags
(`--verifier HOST:PORT,...`), and registration in Redis — a service (or the process that
supervises it, like `dspark up`) runs `register_forever(redis_url, role, address, load_fn)`,
which writes `P:replica:{role}:{address}` with a short TTL every second; a replica that stops
heartbeating disappears when its key expires.

The router's `Registry` merges both sources, probes every verifier with `Stats` every
`interval_s` (live = the last probe answered), and places a new session on the least-loaded live
verifier: load = max(its running Decode streams, this router's own streams on it) / its session
limit; the verifier then picks its drafter. A verifier that fails a stream is marked down at once
and skipped until a probe answers again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

from dspark_common.registry import ROLES, register_forever, registered, replica_key  # noqa: F401  (re-exported)


@dataclass
class Replica:
    address: str
    sources: set[str] = field(default_factory=set)  # "flag" | "redis"
    live: bool = False
    running: int = 0  # Decode streams the verifier reports
    sessions: int = 0
    max_sessions: int = 1
    inflight: int = 0  # this router's streams on it
    replica_id: str = ""
    last_ok: float = 0.0
    last_error: str = ""
    stats: Any = None  # the last VerifierStats

    @property
    def load(self) -> float:
        return max(self.running, self.inflight) / max(self.max_sessions, 1)

    def describe(self) -> dict:
        return {"address": self.address, "live": self.live, "load": round(self.load, 4), "running": self.running,
                "inflight": self.inflight, "sessions": self.sessions, "max_sessions": self.max_sessions,
                "replica_id": self.replica_id, "sources": sorted(self.sources), "last_error": self.last_error}


class Registry:
    """The verifiers this router can place sessions on."""

    def __init__(self, fixed: list[str], probe: Callable[[str], Awaitable[Any]], *, redis_client=None,
                 prefix: str = "dspark", interval_s: float = 1.0, probe_timeout_s: float = 2.0,
                 on_removed: Callable[[str], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._redis = redis_client
        self._prefix = prefix
        self.interval_s = interval_s
        self._probe_timeout_s = probe_timeout_s
        self._on_removed = on_removed
        self._clock = clock
        self.replicas: dict[str, Replica] = {a: Replica(a, {"flag"}) for a in fixed}
        self.drafters: dict[str, dict] = {}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("registry refresh failed")

    async def refresh(self) -> None:
        """Discover (Redis) and probe every verifier once."""
        if self._redis is not None:
            try:
                found = await registered(self._redis, self._prefix, "verifier")
                self.drafters = await registered(self._redis, self._prefix, "drafter")
            except Exception as e:
                log.warning("cannot read the replica registry from Redis: %s", e)
                found = None
            if found is not None:
                for address in found:
                    self.replicas.setdefault(address, Replica(address)).sources.add("redis")
                for address, rep in list(self.replicas.items()):
                    if "redis" in rep.sources and address not in found:
                        rep.sources.discard("redis")
                        if not rep.sources and rep.inflight == 0:
                            del self.replicas[address]
                            log.info("verifier %s left the registry", address)
                            if self._on_removed is not None:
                                await self._on_removed(address)
        await asyncio.gather(*(self._probe_one(r) for r in list(self.replicas.values())))
        self._changed.set()
        self._changed = asyncio.Event()

    async def _probe_one(self, rep: Replica) -> None:
        try:
            s = await asyncio.wait_for(self._probe(rep.address), self._probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if rep.live:
                log.warning("verifier %s is down: %s", rep.address, _short(e))
            rep.live, rep.last_error = False, _short(e)
            return
        if not rep.live:
            log.info("verifier %s is live (replica %s)", rep.address, s.replica_id)
        rep.live, rep.last_ok, rep.last_error, rep.stats = True, self._clock(), "", s
        rep.running, rep.sessions, rep.max_sessions, rep.replica_id = (
            int(s.running), int(s.sessions), max(int(s.max_sessions), 1), s.replica_id)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.live]

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        candidates = [r for r in self.live() if r.address not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.load, r.inflight, r.address))

    def get(self, address: str) -> Replica | None:
        return self.replicas.get(address)

    def mark_down(self, address: str, reason: str) -> None:
        rep = self.replicas.get(address)
        if rep is not None and rep.live:
            log.warning("verifier %s marked down: %s", address, reason)
            rep.live, rep.last_error = False, reason

    async def wait_pick(self, exclude: set[str], timeout_s: float) -> Replica | None:
        """A live verifier not in `exclude`, waiting up to `timeout_s` for one to appear; when
        every known verifier is excluded, any live one will do (it may have come back)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            rep = self.pick(exclude) or (self.pick() if all(a in exclude for a in self.replicas) else None)
            if rep is not None or loop.time() >= end:
                return rep
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, min(self.interval_s, end - loop.time())))
            except asyncio.TimeoutError:
                pass


def _short(e: BaseException) -> str:
    details = getattr(e, "details", None)
    text = details() if callable(details) else str(e)
    return f"{type(e).__name__}: {text}"[:200]
