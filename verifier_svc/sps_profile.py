"""Profiling SPS(B): target forward steps per second when B new tokens go through one forward on
a cached prefix. Measured once at start-up; the verification scheduler reads it."""

from __future__ import annotations

import statistics
import time

import torch

from verifier_svc.scheduler import SpsTable
from verifier_svc.target_engine import TargetEngine

PROFILE_SESSION = "__sps_profile__"


def forward_times(engine: TargetEngine, sizes: list[int], *, prefix: int = 64, repeats: int = 3,
                  seed: int = 0) -> dict[int, float]:
    """Median seconds of one forward of k tokens on a `prefix`-token cached context, per k."""
    g = torch.Generator().manual_seed(seed)
    prefix = max(1, min(prefix, engine.max_context - max(sizes) - 1))
    ids = torch.randint(0, engine.vocab_size, (prefix + max(sizes),), generator=g).tolist()
    engine.open(PROFILE_SESSION)
    try:
        engine.extend(PROFILE_SESSION, ids[:prefix])
        engine.extend(PROFILE_SESSION, ids[prefix : prefix + 1])  # warm-up
        engine.rollback(PROFILE_SESSION, prefix)
        out = {}
        for k in sizes:
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.extend(PROFILE_SESSION, ids[prefix : prefix + k])
                ts.append(time.perf_counter() - t0)
                engine.rollback(PROFILE_SESSION, prefix)
            out[k] = statistics.median(ts)
        return out
    finally:
        engine.release(PROFILE_SESSION)


def profile_sps(engine: TargetEngine, max_tokens: int = 8, *, prefix: int = 128, repeats: int = 7, **kw) -> SpsTable:
    """The table the scheduler reads. Forward time never falls when tokens are added, so the
    measured times are made non-decreasing (a running maximum): a noisy dip (k = 4 measured below
    k = 3) would otherwise make the early-stopping rule end blocks at the step before it."""
    sizes = sorted({1, 2, 4, max_tokens} | set(range(1, max_tokens + 1)))
    times = forward_times(engine, sizes, prefix=prefix, repeats=repeats, **kw)
    worst, table = 0.0, {}
    for k in sizes:
        worst = max(worst, times[k])
        table[k] = 1.0 / worst
    return SpsTable(table)
