"""Every bad input gets its status code and an OpenAI-style error object naming the field; auth,
admission (429 + Retry-After), body and prompt limits (413), busy sessions (409), no verifier
(503); a client that disconnects cancels its decode. None of it leaves a session or a KV slot
behind on the verifier or the drafter."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from dspark_common.proto import drafter_pb2, verifier_pb2
from tests.router_stack import MODEL_NAME, models, router_tokenizer, start_router
from tests.service_stack import start_drafter, start_verifier, wait_for

LIMITS = dict(max_body_kb=4, max_prompt_tokens=300, max_tokens_limit=512, max_sessions=2, retry_after_s=3)


@pytest.fixture
async def stack():
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address])
    core = await start_router(router_tokenizer(), [v.address], **LIMITS)
    http = aiohttp.ClientSession(base_url=core.url)
    yield core, v, d, http
    await http.close()
    await core.stop()
    await v.stop()
    await d.stop()


async def nothing_left(v, d) -> None:
    async def idle():
        vs = await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)
        ds = await d.service.Stats(drafter_pb2.DrafterStatsRequest(), None)
        return vs.sessions == vs.kv_slots_in_use == vs.running == 0 and ds.sessions == 0
    await wait_for(idle, timeout=10)


async def post(http, path: str, body, **kw) -> tuple[int, dict, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with http.post(path, data=data, headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                         **kw) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, "temperature": 0}
MSG = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}

BAD = [
    (C, b"{not json", 400, None, "not valid JSON"),
    (C, [1, 2], 400, None, "JSON object"),
    (C, {"model": MODEL_NAME}, 400, "prompt", "required"),
    (C, {**OK, "prompt": 5}, 400, "prompt", "prompt must be"),
    (C, {**OK, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    (C, {**OK, "prompt": ""}, 400, "prompt", "empty"),
    (C, {**OK, "prompt": [1, 2, 999]}, 400, "prompt", "vocabulary"),
    (C, {**OK, "model": "gpt-9"}, 404, None, "does not exist"),
    (C, {**OK, "max_tokens": 0}, 400, "max_tokens", "positive integer"),
    (C, {**OK, "max_tokens": "8"}, 400, "max_tokens", "positive integer"),
    (C, {**OK, "max_tokens": 100000}, 400, "max_tokens", "at most 512"),
    (C, {**OK, "temperature": -1}, 400, "temperature", "[0, 2]"),
    (C, {**OK, "temperature": "hot"}, 400, "temperature", "[0, 2]"),
    (C, {**OK, "top_p": 0}, 400, "top_p", "(0, 1]"),
    (C, {**OK, "top_k": -3}, 400, "top_k", ">= 0"),
    (C, {**OK, "seed": "x"}, 400, "seed", "integer"),
    (C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    (C, {**OK, "stop": [""]}, 400, "stop", "non-empty"),
    (C, {**OK, "stop": 7}, 400, "stop", "string"),
    (C, {**OK, "n": 2}, 400, "n", "not supported"),
    (C, {**OK, "logprobs": 3}, 400, "logprobs", "not supported"),
    (C, {**OK, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    (C, {**OK, "stream": "yes"}, 400, "stream", "boolean"),
    (C, {**OK, "speculative": {"draft_length": 17}}, 400, "speculative.draft_length", "0..16"),
    (C, {**OK, "speculative": {"draft_length": "fast"}}, 400, "speculative.draft_length", "auto"),
    (C, {**OK, "speculative": {"draft_length": True}}, 400, "speculative.draft_length", "0..16"),
    (C, {**OK, "speculative": {"foo": 1}}, 400, "speculative.foo", "unknown"),
    (C, {**OK, "speculative": 4}, 400, "speculative", "object"),
    (C, {**OK, "session_id": "no spaces!"}, 400, "session_id", "letters"),
    (C, {**OK, "prompt": "x" * 301}, 413, "prompt", "at most 300"),
    (C, {**OK, "prompt": "y" * 5000}, 413, None, "KiB"),
    (CHAT, {**MSG, "messages": []}, 400, "messages", "non-empty"),
    (CHAT, {**MSG, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "role must be"),
    (CHAT, {**MSG, "messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    (CHAT, {**MSG, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", "text"),
    (CHAT, {**MSG, "max_completion_tokens": -1}, 400, "max_completion_tokens", "positive"),
    (CHAT, {**MSG, "n": 3}, 400, "n", "not supported"),
]


async def test_bad_inputs(stack):
    core, v, d, http = stack
    for path, body, status, param, text in BAD:
        for stream in (False, True):
            b = {**body, "stream": True} if stream and isinstance(body, dict) and "stream" not in body else body
            got, err, _ = await post(http, path, b)
            assert got == status, (body, err)
            e = err["error"]
            assert set(e) == {"message", "type", "param", "code"} and text in e["message"], (body, e)
            assert e["param"] == param, (body, e)
    # Past the model's context window: the verifier refuses, the status still says why.
    got, err, _ = await post(http, C, {**OK, "prompt": list(range(256)) * 3})
    assert got == 413  # over max_prompt_tokens first
    core.limits.max_prompt_tokens = 10_000
    core.settings.max_body_kb = 64
    got, err, _ = await post(http, C, {**OK, "prompt": list(range(256)) * 3})
    assert got == 400 and "context window" in err["error"]["message"], err
    # Routes and methods.
    async with http.get("/v1/nothing") as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.get(C) as r:
        assert r.status == 405
    # The openai client surfaces the same errors.
    client = openai.AsyncOpenAI(base_url=core.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=4, n=2)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="hi", max_tokens=4)
    await client.close()
    await nothing_left(v, d)
    m = await (await http.get("/metrics")).text()
    assert 'dspark_router_rejected_total{reason="InvalidRequest"}' in m


async def test_auth():
    target, drafter = models()
    v = await start_verifier(target, [])
    core = await start_router(router_tokenizer(), [v.address], api_key="sekret")
    try:
        async with aiohttp.ClientSession(base_url=core.url) as http:
            assert (await post(http, C, OK))[0] == 401
            status, err, _ = await post(http, C, OK, headers={"Authorization": "Bearer wrong"})
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            assert (await post(http, C, OK, headers={"Authorization": "Bearer sekret"}))[0] == 200
            async with http.get("/v1/models") as r:
                assert r.status == 401
            async with http.get("/healthz") as r:
                assert r.status == 200
        client = openai.AsyncOpenAI(base_url=core.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
        await client.close()
    finally:
        await core.stop()
        await v.stop()


async def test_admission_busy_session_and_disconnects(stack):
    core, v, d, http = stack
    long = {**OK, "max_tokens": 400, "stream": True}

    async def open_stream(body):
        r = await http.post(C, json=body)
        assert r.status == 200
        await r.content.readline()  # the first event: it is running
        return r

    a = await open_stream({**long, "session_id": "s-1"})
    # The same session while it generates: 409.
    status, err, _ = await post(http, C, {**OK, "session_id": "s-1"})
    assert status == 409 and err["error"]["param"] == "session_id"
    b = await open_stream(long)
    # Two running = the limit: 429 with Retry-After.
    status, err, headers = await post(http, C, OK)
    assert status == 429 and headers["Retry-After"] == "3" and err["error"]["type"] == "rate_limit_error"
    # Both clients go away mid-stream: their decodes are cancelled and the KV freed.
    a.close()
    b.close()
    await nothing_left(v, d)
    await wait_for(lambda: _is(core.admission.running, 0))
    # A non-streaming client that gives up.
    task = asyncio.ensure_future(http.post(C, json={**OK, "max_tokens": 400}))
    await wait_for(lambda: _running(v, 1))
    task.cancel()
    await nothing_left(v, d)
    # The session lock went with the disconnected request.
    assert (await post(http, C, {**OK, "session_id": "s-1"}))[0] == 200
    assert (await post(http, C, OK))[0] == 200


async def _is(a, b) -> bool:
    return a == b


async def _running(v, n: int) -> bool:
    return (await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)).running == n


async def test_no_verifier_is_503():
    core = await start_router(router_tokenizer(), ["127.0.0.1:9"], failover_wait_s=0.3)
    try:
        async with aiohttp.ClientSession(base_url=core.url) as http:
            async with http.get("/healthz") as r:
                body = await r.json()
                assert r.status == 503 and body["verifiers"][0]["live"] is False
            status, err, _ = await post(http, C, OK)
            assert status == 503 and "no verifier" in err["error"]["message"]
    finally:
        await core.stop()
