"""Session stores (embedded and Redis: the same interface and behaviour), the replica registry
(`register_forever` heartbeats with a TTL; the router discovers verifiers from Redis), least-loaded
placement, and the release of KV kept for sessions that expired."""

from __future__ import annotations

import asyncio
import json
import uuid
from types import SimpleNamespace

import pytest
import redis.asyncio as redis
from openai import AsyncOpenAI

from dspark_common.proto import verifier_pb2
from router.registry import Registry, register_forever, registered, replica_key
from router.sessions import MemoryStore, RedisStore, SessionRecord
from tests.router_stack import REDIS_URL, MODEL_NAME, clear_redis, models, router_tokenizer, start_router
from tests.service_stack import start_drafter, start_verifier, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def prefix():
    p = f"dspark-test-{uuid.uuid4().hex[:8]}"
    yield p
    await clear_redis(p)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_store(kind, prefix):
    clock = Clock()
    store = MemoryStore(10, clock) if kind == "memory" else RedisStore(REDIS_URL, 1, prefix=prefix)
    try:
        assert await store.get("s") is None
        rec = SessionRecord("s", history=[1, 2, 3], verifier="v:1", controller={"alpha": [0.5]}, turns=1)
        await store.put(rec)
        await store.append_tokens("s", [4, 5])
        got = await store.get("s")
        assert got.history == [1, 2, 3, 4, 5] and got.verifier == "v:1" and got.controller == {"alpha": [0.5]}
        got.history.append(99)  # a copy, not the stored object
        assert (await store.get("s")).history == [1, 2, 3, 4, 5]
        assert await store.lock("s", "a", 5) and await store.lock("s", "a", 5)
        assert not await store.lock("s", "b", 5)
        await store.unlock("s", "b")  # not the owner: no effect
        assert not await store.lock("s", "b", 5)
        await store.unlock("s", "a")
        assert await store.lock("s", "b", 5)
        # Expiry: a session holding KV is reported once after its TTL; one without is just gone.
        await store.put(SessionRecord("k", [1], verifier="v:1", handle={"session_id": "k.1", "epoch": 1}))
        await store.put(SessionRecord("n", [1]))
        if kind == "memory":
            clock.now += 11
        else:
            await asyncio.sleep(1.2)
            store.clock = lambda: 1e12
        expired = await store.expired()
        assert [(e.session_id, e.verifier, e.handle["session_id"]) for e in expired] == [("k", "v:1", "k.1")]
        assert await store.expired() == []
        assert await store.get("k") is None and await store.get("n") is None
    finally:
        await store.close()


async def test_register_forever_heartbeats_and_leaves(prefix):
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    loads = iter(range(1000))
    task = asyncio.ensure_future(register_forever(REDIS_URL, "verifier", "10.0.0.1:5", lambda: next(loads),
                                                 interval_s=0.05, ttl_s=0.5, prefix=prefix))
    try:
        found = await wait_for(lambda: registered(r, prefix, "verifier"))
        assert list(found) == ["10.0.0.1:5"] and found["10.0.0.1:5"]["role"] == "verifier"
        ttl = await r.pttl(replica_key(prefix, "verifier", "10.0.0.1:5"))
        assert 0 < ttl <= 500
        await asyncio.sleep(0.2)
        assert json.loads(await r.get(replica_key(prefix, "verifier", "10.0.0.1:5")))["load"] > 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await registered(r, prefix, "verifier") == {}  # deregistered at once
        # A replica that dies without deregistering expires with its TTL.
        await r.set(replica_key(prefix, "drafter", "10.0.0.2:6"), json.dumps({"address": "10.0.0.2:6"}), px=200)
        assert list(await registered(r, prefix, "drafter")) == ["10.0.0.2:6"]
        await asyncio.sleep(0.3)
        assert await registered(r, prefix, "drafter") == {}
    finally:
        task.cancel()
        await r.aclose()


async def test_placement_least_loaded_and_mark_down():
    running = {"a:1": 3, "b:2": 1, "c:3": 0}
    down = {"c:3"}

    async def probe(address):
        if address in down:
            raise ConnectionError("refused")
        return SimpleNamespace(running=running[address], sessions=running[address], max_sessions=8,
                               replica_id=address[0])

    reg = Registry(list(running), probe, interval_s=0.05)
    await reg.refresh()
    assert [r.address for r in reg.live()] == ["a:1", "b:2"]
    assert reg.pick().address == "b:2"
    reg.get("b:2").inflight = 5  # this router's own streams count at once
    assert reg.pick().address == "a:1"
    reg.mark_down("a:1", "stream failed")
    assert reg.pick().address == "b:2" and reg.pick({"b:2"}) is None
    down.clear()
    await reg.start()
    try:
        rep = await reg.wait_pick({"a:1", "b:2"}, timeout_s=2)
        assert rep.address == "c:3"
    finally:
        await reg.stop()


async def test_router_discovers_verifiers_in_redis_and_releases_expired_kv(prefix):
    target, drafter = models()
    d = await start_drafter(drafter)
    v1, v2 = await start_verifier(target, [d.address]), await start_verifier(target, [d.address])

    def load_of(server):
        async def load():
            s = await server.service.Stats(verifier_pb2.VerifierStatsRequest(), None)
            return {"running": s.running, "sessions": s.sessions}
        return load

    beats = [asyncio.ensure_future(register_forever(REDIS_URL, "verifier", s.address, load_of(s), interval_s=0.1,
                                                    ttl_s=1.0, prefix=prefix)) for s in (v1, v2)]
    core = await start_router(router_tokenizer(), [], redis_url=REDIS_URL, redis_prefix=prefix, session_ttl_s=1)
    client = AsyncOpenAI(base_url=core.url + "/v1", api_key="none", max_retries=0)
    try:
        await wait_for(lambda: _live(core, 2))
        rs = await asyncio.gather(*(client.completions.create(
            model=MODEL_NAME, prompt=f"p{i}", max_tokens=16, temperature=0, extra_body={"session_id": f"s{i}"})
            for i in range(6)))
        assert all(r.usage.completion_tokens > 0 for r in rs)
        placed = {(await core.store.get(f"s{i}")).verifier for i in range(6)}
        assert placed == {v1.address, v2.address}  # spread by load
        kept = [(await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)).sessions for v in (v1, v2)]
        assert sum(kept) == 6
        # The sessions expire (TTL 1 s): the router's sweeper releases the KV their verifiers kept.
        async def none_kept():
            kept = [(await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)).sessions for v in (v1, v2)]
            return kept == [0, 0]
        await wait_for(none_kept, timeout=10)
        assert [await core.store.get(f"s{i}") for i in range(6)] == [None] * 6
        # A verifier that stops heartbeating leaves the registry.
        beats[0].cancel()
        await wait_for(lambda: _known(core, {v2.address}), timeout=5)
    finally:
        for b in beats:
            b.cancel()
        await client.close()
        await core.stop()
        await v1.stop()
        await v2.stop()
        await d.stop()


async def _live(core, n: int) -> bool:
    return len(core.registry.live()) == n


async def _known(core, addresses: set[str]) -> bool:
    return set(core.registry.replicas) == addresses
