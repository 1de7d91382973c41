"""Replica registration in Redis, shared by the services (which register themselves) and the
router (which reads the registrations). A replica writes `P:replica:{role}:{address}` with a short
TTL every second; one that stops heartbeating disappears when its key expires."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def advertise_address(host: str, port: int, advertise_host: str = "") -> str:
    """The address other replicas should dial: the configured one, else the listen host when it is
    a real address, else this machine's resolvable name (a container's IP under Compose)."""
    if advertise_host:
        return f"{advertise_host}:{port}"
    if host not in ("0.0.0.0", "::", "[::]", ""):
        return f"{host}:{port}"
    try:
        return f"{socket.gethostbyname(socket.gethostname())}:{port}"
    except OSError:
        return f"{socket.gethostname()}:{port}"


ROLES = ("verifier", "drafter")


def replica_key(prefix: str, role: str, address: str = "*") -> str:
    return f"{prefix}:replica:{role}:{address}"


async def _call(fn: Callable[[], Any] | None) -> Any:
    if fn is None:
        return None
    value = fn()
    return await value if inspect.isawaitable(value) else value


async def register_forever(
    redis_url: str,
    role: str,
    address: str,
    load_fn: Callable[[], Any] | None = None,
    *,
    interval_s: float = 1.0,
    ttl_s: float = 5.0,
    prefix: str = "dspark",
    client=None,
) -> None:
    """Keep `address` registered as a live `role` replica until cancelled (then deregister).

    `load_fn` (sync or async) returns the replica's load (a number, or a dict of numbers) and is
    published with every heartbeat. Redis errors are logged and retried; they never end the loop."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    import redis.asyncio as redis

    r = client if client is not None else redis.Redis.from_url(redis_url, decode_responses=True)
    key = replica_key(prefix, role, address)
    failing = False
    try:
        while True:
            try:
                load = await _call(load_fn)
                payload = {"role": role, "address": address, "load": load, "ts": time.time(),
                           "host": socket.gethostname(), "pid": os.getpid()}
                await r.set(key, json.dumps(payload), px=int(ttl_s * 1000))
                if failing:
                    log.info("registered %s %s in Redis again", role, address)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down, load_fn failing: keep trying
                if not failing:
                    log.warning("cannot register %s %s: %s", role, address, e)
                failing = True
            await asyncio.sleep(interval_s)
    finally:
        try:
            await asyncio.shield(r.delete(key))
        except BaseException:
            pass
        if client is None:
            await r.aclose()


async def registered(redis_client, prefix: str, role: str) -> dict[str, dict]:
    """address -> the payload of every live registration of `role`."""
    keys = [k async for k in redis_client.scan_iter(match=replica_key(prefix, role), count=200)]
    if not keys:
        return {}
    values = await redis_client.mget(keys)
    out = {}
    for v in values:
        if v:
            d = json.loads(v)
            out[d["address"]] = d
    return out
