"""`dspark.v1.Router/Generate` over gRPC: the same generations and statistics as the HTTP API
(prompt, chat, token ids; greedy output identical to the target's own for any draft length),
errors as gRPC statuses naming the field, auth by metadata, and a cancelled call freeing its KV."""

from __future__ import annotations

import grpc
import pytest

from dspark_common.proto import common_pb2, verifier_pb2
from dspark_common._proto.dspark.v1 import router_pb2, router_pb2_grpc
from tests.router_stack import IM_END, models, router_tokenizer, start_router, target_only
from tests.service_stack import start_drafter, start_verifier, wait_for


@pytest.fixture
async def stack():
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address])
    tok = router_tokenizer()
    core = await start_router(tok, [v.address], api_key="k")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{core.grpc_port}")
    yield target, tok, core, v, router_pb2_grpc.RouterStub(channel)
    await channel.close()
    await core.stop()
    await v.stop()
    await d.stop()


AUTH = (("authorization", "Bearer k"),)


async def generate(stub, req):
    text, tokens, last = "", [], None
    async for r in stub.Generate(req, metadata=AUTH, timeout=30):
        text += r.text
        tokens += list(r.token_ids)
        last = r
    return text, tokens, last


async def test_generate(stack):
    target, tok, core, v, stub = stack
    chat = router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content="hello")])
    for field, value, ids in [("prompt", "a prompt", tok.encode("a prompt")),
                              ("chat", chat, tok.chat([{"role": "user", "content": "hello"}])),
                              ("prompt_ids", router_pb2.TokenIds(ids=[5, 6, 7]), [5, 6, 7])]:
        want = target_only(target, ids, 20)
        for spec in (router_pb2.Speculative(tokens=0), router_pb2.Speculative(auto=True), None):
            req = router_pb2.GenerateRequest(max_tokens=20, speculative=spec, **{field: value})
            text, tokens, last = await generate(stub, req)
            assert tokens == want and text == tok.decode(want)
            assert last.finish_reason == ("stop" if want[-1] == IM_END else "length")
            assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == len(want)
            assert last.speculative.rounds > 0
            if spec is not None and spec.WhichOneof("draft_length") == "tokens":
                assert last.speculative.draft_tokens == 0
    # Sampling parameters and stop strings travel too.
    req = router_pb2.GenerateRequest(prompt="x", max_tokens=8, sampling=common_pb2.SamplingParams(
        temperature=0.7, top_k=10, seed=3), stop=["\u2603"])
    a, b = await generate(stub, req), await generate(stub, req)
    assert a[0] == b[0] and a[2].usage.completion_tokens <= 8


async def test_errors_and_cancel(stack):
    target, tok, core, v, stub = stack
    bad = [
        (router_pb2.GenerateRequest(max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (router_pb2.GenerateRequest(prompt="x", max_tokens=100_000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (router_pb2.GenerateRequest(prompt="x", speculative=router_pb2.Speculative(tokens=40)),
         grpc.StatusCode.INVALID_ARGUMENT, "speculative.draft_length"),
        (router_pb2.GenerateRequest(prompt="x", sampling=common_pb2.SamplingParams(temperature=-1)),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (router_pb2.GenerateRequest(prompt_ids=router_pb2.TokenIds(ids=[1, 10_000])),
         grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids"),
        (router_pb2.GenerateRequest(prompt="x", session_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
        (router_pb2.GenerateRequest(prompt="x", model="other"), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ]
    for req, code, text in bad:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await generate(stub, req)
        assert exc.value.code() == code and text in exc.value.details(), exc.value
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Generate(router_pb2.GenerateRequest(prompt="x")):
            pass
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Cancel mid-stream: the verifier frees the session.
    call = stub.Generate(router_pb2.GenerateRequest(prompt="long", max_tokens=400), metadata=AUTH)
    await call.read()
    call.cancel()

    async def idle():
        s = await v.service.Stats(verifier_pb2.VerifierStatsRequest(), None)
        return s.sessions == s.kv_slots_in_use == 0 and core.admission.running == 0
    await wait_for(idle)
