"""Sessions: what the router keeps about a conversation between (and during) its requests — the
token history (every prompt and output token so far), its placement (the verifier), the KV handle
of the prefix that verifier keeps, the controller's acceptance estimates and running statistics —
behind one store interface with two implementations: `RedisStore` (redis.asyncio; shared by
router replicas, TTL'd keys) and `MemoryStore` (embedded, the default).

A per-session lock makes one request at a time generate in a session. Sessions that expire while
a verifier still keeps their KV are remembered in an expiry index so the router can release that
KV (`expired`)."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass
class SessionRecord:
    session_id: str
    history: list[int] = field(default_factory=list)  # prompt + output tokens of every turn so far
    verifier: str = ""  # address of the verifier holding `handle`
    handle: dict | None = None  # KvHandle fields (replica_id, session_id, epoch, length) of the kept KV
    controller: dict | None = None  # DraftLengthController.state()
    stats: dict = field(default_factory=dict)  # totals over all turns
    turns: int = 0
    created: float = 0.0
    updated: float = 0.0

    def meta(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


@dataclass
class ExpiredKv:
    session_id: str
    verifier: str
    handle: dict


class SessionStore(ABC):
    """Where sessions live. Every write refreshes the session's TTL."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    async def put(self, record: SessionRecord) -> None:
        """Write the whole record (history included)."""

    @abstractmethod
    async def append_tokens(self, session_id: str, tokens: list[int]) -> None:
        """Add newly generated tokens to the stored history."""

    @abstractmethod
    async def delete(self, session_id: str) -> None: ...

    @abstractmethod
    async def lock(self, session_id: str, owner: str, ttl_s: float) -> bool:
        """Take the session's generation lock; False when another owner holds it."""

    @abstractmethod
    async def unlock(self, session_id: str, owner: str) -> None: ...

    @abstractmethod
    async def expired(self) -> list[ExpiredKv]:
        """Sessions that expired while a verifier kept their KV; each is returned once."""

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class MemoryStore(SessionStore):
    """The embedded store: a dict in this process."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        super().__init__(ttl_s, clock)
        self._records: dict[str, tuple[SessionRecord, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    def _copy(self, r: SessionRecord) -> SessionRecord:
        return SessionRecord(**json.loads(json.dumps(asdict(r))))

    def _live(self, session_id: str) -> SessionRecord | None:
        item = self._records.get(session_id)
        if item is None or item[1] <= self.clock():
            return None
        return item[0]

    async def get(self, session_id: str) -> SessionRecord | None:
        r = self._live(session_id)
        return self._copy(r) if r is not None else None

    async def put(self, record: SessionRecord) -> None:
        self._records[record.session_id] = (self._copy(record), self.clock() + self.ttl_s)

    async def append_tokens(self, session_id: str, tokens: list[int]) -> None:
        r = self._live(session_id)
        if r is not None:
            r.history.extend(int(t) for t in tokens)
            self._records[session_id] = (r, self.clock() + self.ttl_s)

    async def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    async def lock(self, session_id: str, owner: str, ttl_s: float) -> bool:
        held = self._locks.get(session_id)
        if held is not None and held[1] > self.clock() and held[0] != owner:
            return False
        self._locks[session_id] = (owner, self.clock() + ttl_s)
        return True

    async def unlock(self, session_id: str, owner: str) -> None:
        if self._locks.get(session_id, ("",))[0] == owner:
            del self._locks[session_id]

    async def expired(self) -> list[ExpiredKv]:
        now = self.clock()
        out = []
        for sid, (r, until) in list(self._records.items()):
            if until <= now:
                del self._records[sid]
                if r.handle:
                    out.append(ExpiredKv(sid, r.verifier, r.handle))
        return out

    def __len__(self) -> int:
        now = self.clock()
        return sum(until > now for _, until in self._records.values())


class RedisStore(SessionStore):
    """Sessions in Redis. Keys (prefix P):
    P:session:{id}         hash, field "meta": the record without its history (JSON)
    P:session:{id}:tokens  list: the token history
    P:session:{id}:lock    the generation lock (owner), with its own TTL
    P:kv-expiry            sorted set: session id -> when its kept KV should be released
    P:kv-handles           hash: session id -> {"verifier", "handle"} for that release"""

    def __init__(self, url: str, ttl_s: float, *, prefix: str = "dspark", clock: Callable[[], float] = time.time,
                 client=None) -> None:
        super().__init__(ttl_s, clock)
        import redis.asyncio as redis

        self.redis = client if client is not None else redis.Redis.from_url(url, decode_responses=True)
        self.prefix = prefix

    def _k(self, session_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:session:{session_id}{suffix}"

    @property
    def _expiry(self) -> str:
        return f"{self.prefix}:kv-expiry"

    @property
    def _handles(self) -> str:
        return f"{self.prefix}:kv-handles"

    async def get(self, session_id: str) -> SessionRecord | None:
        async with self.redis.pipeline(transaction=True) as p:
            meta, tokens = await p.hget(self._k(session_id), "meta").lrange(self._k(session_id, ":tokens"), 0, -1).execute()
        if meta is None:
            return None
        return SessionRecord(**json.loads(meta), history=[int(t) for t in tokens])

    async def put(self, record: SessionRecord) -> None:
        sid, ttl = record.session_id, int(self.ttl_s)
        key, tokens = self._k(sid), self._k(sid, ":tokens")
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(tokens)
            if record.history:
                p.rpush(tokens, *record.history)
                p.expire(tokens, ttl)
            p.hset(key, "meta", json.dumps(record.meta()))
            p.expire(key, ttl)
            if record.handle:
                p.hset(self._handles, sid, json.dumps({"verifier": record.verifier, "handle": record.handle}))
                p.zadd(self._expiry, {sid: self.clock() + self.ttl_s})
            else:
                p.hdel(self._handles, sid)
                p.zrem(self._expiry, sid)
            await p.execute()

    async def append_tokens(self, session_id: str, tokens: list[int]) -> None:
        if not tokens:
            return
        ttl = int(self.ttl_s)
        async with self.redis.pipeline(transaction=False) as p:
            p.rpush(self._k(session_id, ":tokens"), *tokens)
            p.expire(self._k(session_id, ":tokens"), ttl)
            p.expire(self._k(session_id), ttl)
            await p.execute()

    async def delete(self, session_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(self._k(session_id), self._k(session_id, ":tokens"))
            p.hdel(self._handles, session_id)
            p.zrem(self._expiry, session_id)
            await p.execute()

    async def lock(self, session_id: str, owner: str, ttl_s: float) -> bool:
        key = self._k(session_id, ":lock")
        if await self.redis.set(key, owner, nx=True, px=max(1, int(ttl_s * 1000))):
            return True
        return await self.redis.get(key) == owner

    _UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

    async def unlock(self, session_id: str, owner: str) -> None:
        await self.redis.eval(self._UNLOCK, 1, self._k(session_id, ":lock"), owner)

    async def expired(self) -> list[ExpiredKv]:
        out = []
        for sid in await self.redis.zrangebyscore(self._expiry, "-inf", self.clock()):
            if await self.redis.exists(self._k(sid)):
                continue  # refreshed by a write the index has not seen yet
            raw = await self.redis.hget(self._handles, sid)
            removed = await self.redis.zrem(self._expiry, sid)
            await self.redis.hdel(self._handles, sid)
            if raw and removed:  # another router may have taken it first
                d = json.loads(raw)
                out.append(ExpiredKv(sid, d["verifier"], d["handle"]))
        return out

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.redis.aclose()


def make_store(redis_url: str, ttl_s: float, *, prefix: str = "dspark") -> SessionStore:
    return RedisStore(redis_url, ttl_s, prefix=prefix) if redis_url else MemoryStore(ttl_s)
