"""Losing a service mid-stream never breaks a client's stream: with two verifiers registered,
SIGKILL the one serving a streaming generation — the router re-places it on the other and rebuilds
it from the token history, and the streamed text equals the uninterrupted greedy output (nothing
lost or repeated). SIGKILL the drafter — the verifier falls back to target-only rounds and the
output is again unchanged. Services run as separate processes."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI

from drafter_svc.checkpoint import save_checkpoint
from tests.router_stack import (
    MODEL_NAME,
    ServiceProcess,
    free_port,
    models,
    router_tokenizer,
    save_model_dir,
    start_router,
    target_only,
)
from tests.service_stack import wait_for

MAX_NEW = 160


@pytest.fixture
async def processes(tmp_path):
    target, drafter = models()
    model_dir = save_model_dir(target, tmp_path / "target")
    save_checkpoint(drafter, drafter.config, tmp_path / "drafter", include_frozen=True)
    port = free_port()  # all three start at once: the verifiers wait for the drafter
    d = ServiceProcess("drafter", "--port", str(port), "--checkpoint", str(tmp_path / "drafter"), "--threads", "1",
                       "--batch-window-ms", "0")
    vs = [ServiceProcess("verifier", "--port", "0", "--model", str(model_dir), "--drafter", f"127.0.0.1:{port}",
                         "--threads", "1", "--no-profile-sps", "--reconnect-max-ms", "200",
                         "--draft-deadline-ms", "500", "--drafter-wait-s", "120",
                         "--no-ngram-lookup")  # every round asks the drafter: its death must show
          for _ in range(2)]
    await asyncio.gather(*(p.start() for p in [d, *vs]))
    yield target, d, vs
    for p in [d, *vs]:
        await p.kill()


async def stream_text(client, prompt: str, on_chunk=None):
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                             stream=True)
    parts, last, n = [], None, 0
    async for chunk in stream:
        parts.append(chunk.choices[0].text if chunk.choices else "")
        last, n = chunk, n + 1
        if on_chunk is not None:
            await on_chunk(n)
    return "".join(parts), last


async def test_verifier_and_drafter_killed_mid_stream(processes):
    target, d, vs = processes
    tok = router_tokenizer()
    core = await start_router(tok, [v.address for v in vs], failover_wait_s=10)
    client = AsyncOpenAI(base_url=core.url + "/v1", api_key="none", max_retries=0)
    try:
        await wait_for(lambda: _live(core, 2), timeout=30)
        # 1. Kill the verifier serving the stream after a few chunks.
        prompt = "a long story about failover"
        want = tok.decode(target_only(target, tok.encode(prompt), MAX_NEW))
        killed = []

        async def kill_serving_verifier(n: int) -> None:
            if n == 3 and not killed:
                serving = [a for a, r in core.registry.replicas.items() if r.inflight]
                assert len(serving) == 1
                victim = next(v for v in vs if v.address == serving[0])
                await victim.kill()
                killed.append(victim)

        text, last = await stream_text(client, prompt, kill_serving_verifier)
        assert killed and text == want
        assert last.model_extra["speculative"]["failovers"] == 1
        assert last.usage.completion_tokens == MAX_NEW
        survivor = next(v for v in vs if v not in killed)
        await wait_for(lambda: _live(core, 1), timeout=10)

        # 2. Kill the drafter mid-stream: the surviving verifier falls back to target-only rounds.
        prompt = "the drafter goes away"
        want = tok.decode(target_only(target, tok.encode(prompt), MAX_NEW))

        async def kill_drafter(n: int) -> None:
            if n == 3:
                await d.kill()

        text, last = await stream_text(client, prompt, kill_drafter)
        assert text == want
        spec = last.model_extra["speculative"]
        assert spec["failovers"] == 0 and spec["fallback_rounds"] > 0
        assert core.registry.get(survivor.address).live
    finally:
        await client.close()
        await core.stop()


async def _live(core, n: int) -> bool:
    return len(core.registry.live()) == n
