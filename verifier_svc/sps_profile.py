"""Profiling SPS(B): target forward steps per second when B new tokens go through one forward on
a cached prefix. Measured once at start-up; the verification scheduler reads it."""

from __future__ import annotations

import time

import torch

from verifier_svc.scheduler import SpsTable
from verifier_svc.target_engine import TargetEngine

PROFILE_SESSION = "__sps_profile__"


def forward_times(engine: TargetEngine, sizes: list[int], *, prefix: int = 64, repeats: int = 3,
                  seed: int = 0) -> dict[int, float]:
    """Seconds of one forward of k tokens on a `prefix`-token cached context (lower quartile of
    `repeats`), per k.

    The sizes are timed in turn within every repeat (rotated), not one size after another: on a
    shared machine a slow spell then lands on every size alike instead of inflating one of them,
    which the scheduler would read as a cliff in the cost curve."""
    g = torch.Generator().manual_seed(seed)
    prefix = max(1, min(prefix, engine.max_context - max(sizes) - 1))
    ids = torch.randint(0, engine.vocab_size, (prefix + max(sizes),), generator=g).tolist()
    engine.open(PROFILE_SESSION)
    try:
        engine.extend(PROFILE_SESSION, ids[:prefix])
        engine.extend(PROFILE_SESSION, ids[prefix : prefix + 1])  # warm-up
        engine.rollback(PROFILE_SESSION, prefix)
        ts: dict[int, list[float]] = {k: [] for k in sizes}
        for r in range(repeats):
            for k in sizes[r % len(sizes):] + sizes[: r % len(sizes)]:
                t0 = time.perf_counter()
                engine.extend(PROFILE_SESSION, ids[prefix : prefix + k])
                ts[k].append(time.perf_counter() - t0)
                engine.rollback(PROFILE_SESSION, prefix)
        return {k: lower_quartile(v) for k, v in ts.items()}
    finally:
        engine.release(PROFILE_SESSION)


def lower_quartile(values: list[float]) -> float:
    """The lower quartile of the timings, not their median: contention only ever adds time, and
    the verifier profiles at start-up while the router and drafter start beside it on the same
    cores. The table is then frozen for the life of the service, so a slow spell that lifts some
    sizes' medians makes the scheduler cut blocks before a step that is not there, for good
    (copies from the sequence are sized by this table alone)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 4]


def non_decreasing(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit (pool adjacent violators). A forward never gets
    cheaper when tokens are added, so a measured dip is noise; pooling averages it with its
    neighbours, where a running maximum would let one slow outlier raise every later size (and
    the scheduler would then stop blocks before it)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def profile_sps(engine: TargetEngine, max_tokens: int = 8, *, prefix: int = 128, repeats: int = 9, **kw) -> SpsTable:
    """The table the scheduler reads: 1 / forward time of k tokens, made non-increasing in k."""
    sizes = sorted({1, 2, 4, max_tokens} | set(range(1, max_tokens + 1)))
    times = forward_times(engine, sizes, prefix=prefix, repeats=repeats, **kw)
    fitted = non_decreasing([times[k] for k in sizes])
    return SpsTable({k: 1.0 / t for k, t in zip(sizes, fitted)})
