"""The official `openai` client against the router (real drafter + verifier services on loopback,
tiny models), with the embedded session store and with the real Redis: completions and chat
completions, streaming and not, are the target's own greedy output for draft length 0 and "auto";
stop strings, the speculative statistics, sessions continuing on their kept KV, 16 concurrent
streams."""

from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI

from dspark_common.proto import verifier_pb2
from tests.router_stack import (
    IM_END,
    MODEL_NAME,
    clear_redis,
    models,
    router_tokenizer,
    start_router,
    store_settings,
    target_only,
)
from tests.service_stack import start_drafter, start_verifier, wait_for

MAX_NEW = 24


@pytest.fixture(params=["memory", "redis"])
async def stack(request):
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address])
    tok = router_tokenizer()
    extra = store_settings(request.param)
    if extra:
        await clear_redis(extra["redis_prefix"])
    core = await start_router(tok, [v.address], **extra)
    client = AsyncOpenAI(base_url=core.url + "/v1", api_key="unused", max_retries=0)
    yield target, tok, core, v, client
    await client.close()
    await core.stop()
    await v.stop()
    await d.stop()
    if extra:
        await clear_redis(extra["redis_prefix"])


def reference(target, tok, prompt_ids: list[int], max_new: int = MAX_NEW) -> tuple[str, str]:
    out = target_only(target, prompt_ids, max_new)
    return tok.decode(out), "stop" if out[-1] == IM_END else "length"


async def collect(stream) -> tuple[str, object]:
    parts, last = [], None
    async for chunk in stream:
        for c in chunk.choices:
            parts.append(getattr(c, "text", None) or (c.delta.content if hasattr(c, "delta") else "") or "")
        last = chunk
    return "".join(parts), last


async def _zero(n: int) -> bool:
    return n == 0


async def verifier_idle(v, kept: int = 0):
    async def check():
        s = await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)
        return s.running == 0 and s.sessions == kept and s.kv_slots_in_use == kept
    await wait_for(check, timeout=10)


async def test_completions_and_chat(stack):
    target, tok, core, v, client = stack
    prompt = "Once upon a time"
    want, finish = reference(target, tok, tok.encode(prompt))
    for dl in (0, "auto", 3):
        body = {"speculative": {"draft_length": dl}}
        r = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                            extra_body=body)
        assert r.choices[0].text == want and r.choices[0].finish_reason == finish
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == MAX_NEW
        spec = r.model_extra["speculative"]
        assert set(spec) >= {"rounds", "draft_tokens", "accepted_draft_tokens", "mean_accepted_length",
                             "accepted_by_position", "proposed_by_position"}
        assert spec["mean_accepted_length"] == pytest.approx((MAX_NEW - 1) / spec["rounds"], abs=1e-3)
        if dl == 0:
            assert spec["draft_tokens"] == 0 and spec["rounds"] == MAX_NEW - 1
        else:
            assert spec["draft_tokens"] > 0 and sum(spec["proposed_by_position"]) == spec["draft_tokens"]
            assert sum(spec["accepted_by_position"]) == spec["accepted_draft_tokens"]
        text, last = await collect(await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True, extra_body=body))
        assert text == want and last.choices[0].finish_reason == finish
        assert last.model_extra["speculative"]["rounds"] > 0 and last.usage.completion_tokens == MAX_NEW

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    want, finish = reference(target, tok, tok.chat(messages))
    for dl in (0, "auto"):
        body = {"speculative": {"draft_length": dl}}
        r = await client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_NEW,
                                                 temperature=0, extra_body=body)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == finish and r.object == "chat.completion"
        text, last = await collect(await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True, extra_body=body))
        assert text == want and last.choices[0].finish_reason == finish
        assert "speculative" in last.model_extra
    models_list = await client.models.list()
    assert [m.id for m in models_list.data] == [MODEL_NAME]
    await verifier_idle(v)


async def test_stop_strings_and_sampling(stack):
    target, tok, core, v, client = stack
    prompt = "A stop string test"
    full, _ = reference(target, tok, tok.encode(prompt), 40)
    # A stop string that occurs in the greedy text (no replacement characters in it).
    i = next(i for i in range(4, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[i : i + 2]
    expect = full[: full.index(stop)]
    r = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0,
                                        stop=[stop, "never-there"])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    text, last = await collect(await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert text == expect and last.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible and the draft length does not change it in distribution
    # (here: both run and finish).
    a = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0.8, seed=7,
                                        top_p=0.9, extra_body={"top_k": 20, "speculative": {"draft_length": 0}})
    b = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0.8, seed=7,
                                        top_p=0.9, extra_body={"top_k": 20, "speculative": {"draft_length": 0}})
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == 16
    await verifier_idle(v)


async def test_session_continues_on_its_kept_kv(stack):
    target, tok, core, v, client = stack
    turn1 = [{"role": "user", "content": "Hi there"}]
    r1 = await client.chat.completions.create(model=MODEL_NAME, messages=turn1, max_tokens=12, temperature=0,
                                              extra_body={"session_id": "chat-1"})
    want1, _ = reference(target, tok, tok.chat(turn1), 12)
    assert r1.choices[0].message.content == want1 and r1.model_extra["session_id"] == "chat-1"
    await verifier_idle(v, kept=1)  # the verifier keeps the session's KV for the next turn
    record = await core.store.get("chat-1")
    assert record.handle and record.verifier == v.address and record.turns == 1
    assert record.history[: len(tok.chat(turn1))] == tok.chat(turn1)
    # The next turn sends the whole conversation (as token ids: the tiny model's random bytes do
    # not survive a decode/encode round trip); it extends the cached tokens, so the verifier only
    # runs the new ones.
    ids2 = record.history + tok.encode("\n<|im_start|>user\nMore<|im_end|>\n")
    r2 = await client.completions.create(model=MODEL_NAME, prompt=ids2, max_tokens=12, temperature=0,
                                         extra_body={"session_id": "chat-1"})
    want2, _ = reference(target, tok, ids2, 12)
    assert r2.choices[0].text == want2
    assert r2.usage.prompt_tokens_details.cached_tokens == record.handle["length"] > 0
    # A prompt that does not extend the history: a fresh prefill (and the old KV is freed).
    r3 = await client.completions.create(model=MODEL_NAME, prompt="something else", max_tokens=8, temperature=0,
                                         extra_body={"session_id": "chat-1"})
    assert r3.usage.prompt_tokens_details.cached_tokens == 0
    assert r3.choices[0].text == reference(target, tok, tok.encode("something else"), 8)[0]
    await verifier_idle(v, kept=1)
    record = await core.store.get("chat-1")
    assert record.turns == 3 and record.controller is not None and record.stats["rounds"] > 0


async def test_sixteen_concurrent_streams(stack):
    target, tok, core, v, client = stack
    prompts = [f"client {i}: hello" for i in range(16)]
    wants = [reference(target, tok, tok.encode(p), 20)[0] for p in prompts]

    async def one(i: int) -> str:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompts[i], max_tokens=20, temperature=0, stream=True,
            extra_body={"speculative": {"draft_length": "auto" if i % 2 else 4}})
        text, last = await collect(stream)
        assert last.usage.completion_tokens == 20 or last.choices[0].finish_reason == "stop"
        return text

    got = await asyncio.gather(*(one(i) for i in range(16)))
    assert got == wants
    await wait_for(lambda: _zero(core.admission.running))
    await verifier_idle(v)
