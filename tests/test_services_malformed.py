"""Malformed, stale and oversized messages sent raw (generated stubs) to both services get
INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED with a clear message,
and the services keep serving every other session (and, on the Draft stream, the same stream)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from dspark_common.proto import common_pb2, drafter_pb2, drafter_pb2_grpc, tensor_pb2, verifier_pb2
from dspark_common.tensor_codec import encode_tensor
from tests.service_stack import (
    VOCAB,
    decode,
    models,
    open_msg,
    prompts,
    start_drafter,
    start_verifier,
    target_only,
    verifier_stub,
    wait_for,
)

INVALID, NOT_FOUND, PRECONDITION, EXHAUSTED = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


@pytest.fixture
async def drafter_stub():
    _, drafter = models()
    d = await start_drafter(drafter, max_sessions=3, max_context=64, max_message_mb=1)
    channel = grpc.aio.insecure_channel(d.address, options=[("grpc.max_send_message_length", 8 << 20)])
    yield drafter_pb2_grpc.DrafterStub(channel)
    await channel.close()
    await d.stop()


def tensor(dtype: str, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def draft_spec(anchor_pos: int, anchor_token: int = 3, block: int = 4) -> drafter_pb2.DraftSpec:
    return drafter_pb2.DraftSpec(anchor_token=anchor_token, anchor_pos=anchor_pos, block_size=block,
                                 sampling=common_pb2.SamplingParams())


async def exchange(call, msg: drafter_pb2.DraftMessage) -> drafter_pb2.DraftReply:
    await call.write(msg)
    reply = await asyncio.wait_for(call.read(), 10)
    assert reply.request_id == msg.request_id
    return reply


async def test_draft_stream_rejects_malformed_messages(drafter_stub):
    stub = drafter_stub
    info = await stub.Info(drafter_pb2.DrafterInfoRequest())
    width, d = info.hidden_size * len(info.target_layer_ids), info.hidden_size
    feats = torch.randn(5, width)
    call = stub.Draft()

    def opening(sid: str, features=None, **kw) -> drafter_pb2.DraftMessage:
        m = drafter_pb2.DraftMessage(request_id=1, handle=common_pb2.KvHandle(session_id=sid), open=True, **kw)
        m.context.start_pos = 0
        m.context.raw.CopyFrom(features if features is not None else encode_tensor(feats))
        return m

    ok = await exchange(call, opening("a", draft=draft_spec(5)))
    assert not ok.error.code and ok.handle.length == 5 and ok.handle.epoch
    assert list(ok.proposal.tokens.shape) == [4]
    handle = ok.handle

    def on_a(rid: int, **changes) -> drafter_pb2.DraftMessage:
        h = common_pb2.KvHandle()
        h.CopyFrom(handle)
        for k, v in changes.pop("handle", {}).items():
            setattr(h, k, v)
        return drafter_pb2.DraftMessage(request_id=rid, handle=h, **changes)

    good = encode_tensor(feats)
    nan = feats.clone()
    nan[2, 3] = float("nan")
    cases = [
        ("wrong dtype", opening("b", tensor("int64", [5, width], good.data)), INVALID, "dtype"),
        ("unknown dtype", opening("b", tensor("complex64", [5, width], good.data)), INVALID, "dtype"),
        ("wrong shape", opening("b", tensor("float32", [5, width + 1], good.data)), INVALID, "shape"),
        ("wrong byte size", opening("b", tensor("float32", [5, width], good.data[:-4])), INVALID, "bytes"),
        ("non-finite", opening("b", encode_tensor(nan)), INVALID, "non-finite"),
        ("token outside vocab", opening("b", draft=draft_spec(5, anchor_token=VOCAB)), INVALID, "vocabulary"),
        ("block too long", opening("b", draft=draft_spec(5, block=info.block_size + 1)), INVALID, "block_size"),
        ("anchor not after context", opening("b", draft=draft_spec(4)), PRECONDITION, "anchor_pos"),
        ("no session id", opening(""), INVALID, "session_id"),
        ("unknown session", on_a(2, handle={"session_id": "nope"}, draft=draft_spec(5)), NOT_FOUND, "unknown"),
        ("stale epoch", on_a(3, handle={"epoch": handle.epoch - 1}, draft=draft_spec(5)), PRECONDITION, "stale"),
        ("other replica", on_a(4, handle={"replica_id": "x"}, draft=draft_spec(5)), PRECONDITION, "replica"),
        ("wrong length", on_a(5, handle={"length": 6}, draft=draft_spec(6)), PRECONDITION, "holds 5"),
    ]
    bad_context = on_a(6, draft=draft_spec(7))
    bad_context.context.start_pos = 4
    bad_context.context.projected.CopyFrom(encode_tensor(torch.randn(3, d)))
    cases.append(("context not where it ends", bad_context, PRECONDITION, "start_pos"))
    overflow = on_a(7)
    overflow.context.start_pos = 5
    overflow.context.projected.CopyFrom(encode_tensor(torch.full((1, d), 1e30), torch.float16))  # inf in fp16
    cases.append(("fp16 overflow", overflow, INVALID, "non-finite"))
    for name, msg, code, word in cases:
        reply = await exchange(call, msg)
        assert reply.error.code == code.value[0], (name, reply.error)
        assert word in reply.error.message, (name, reply.error.message)
        assert not reply.HasField("proposal")
    # Nothing above disturbed session "a" or this stream; "b" was never left half-open.
    again = await exchange(call, on_a(10, draft=draft_spec(5)))
    assert not again.error.code and again.proposal.tokens.data == ok.proposal.tokens.data
    stats = await stub.Stats(drafter_pb2.DrafterStatsRequest())
    assert stats.sessions == 1 and stats.errors == len(cases)

    # Limits: sessions and context positions.
    for sid in ("b", "c"):
        assert not (await exchange(call, opening(sid))).error.code
    full = await exchange(call, opening("d"))
    assert full.error.code == EXHAUSTED.value[0] and "maximum of 3 sessions" in full.error.message
    long = on_a(8)
    long.context.start_pos = 5
    long.context.projected.CopyFrom(encode_tensor(torch.randn(60, d), torch.float16))
    reply = await exchange(call, long)
    assert reply.error.code == EXHAUSTED.value[0] and "max_context" in reply.error.message

    # An oversized message kills only the stream that sent it.
    other = stub.Draft()
    big = opening("e", encode_tensor(torch.randn(3000, width)))  # 1.5 MiB > the 1 MiB limit
    await other.write(big)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await other.read()
    assert e.value.code() == EXHAUSTED
    assert not (await exchange(call, on_a(9, draft=draft_spec(5)))).error.code
    call.cancel()


async def test_release_and_handles(drafter_stub):
    stub = drafter_stub
    info = await stub.Info(drafter_pb2.DrafterInfoRequest())
    call = stub.Draft()
    opened = await exchange(call, drafter_pb2.DraftMessage(request_id=1, handle=common_pb2.KvHandle(session_id="r"),
                                                           open=True))
    h = opened.handle
    assert h.replica_id == info.replica_id and h.length == 0
    for changes, code in [({"epoch": h.epoch + 1}, PRECONDITION), ({"session_id": "zz"}, NOT_FOUND),
                          ({"replica_id": "other"}, PRECONDITION)]:
        bad = common_pb2.KvHandle()
        bad.CopyFrom(h)
        for k, v in changes.items():
            setattr(bad, k, v)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Release(drafter_pb2.ReleaseDraftRequest(handle=bad))
        assert e.value.code() == code
    assert (await stub.Release(drafter_pb2.ReleaseDraftRequest(handle=h))).released
    # Re-opening gives a new epoch; the old handle is stale.
    reopened = await exchange(call, drafter_pb2.DraftMessage(request_id=2, handle=common_pb2.KvHandle(session_id="r"),
                                                             open=True))
    assert reopened.handle.epoch > h.epoch
    stale = await exchange(call, drafter_pb2.DraftMessage(request_id=3, handle=h, close=True))
    assert stale.error.code == PRECONDITION.value[0]
    # The stream's sessions go with it.
    call.cancel()
    await wait_for(lambda: _drafter_idle(stub))


async def _drafter_idle(stub) -> bool:
    return (await stub.Stats(drafter_pb2.DrafterStatsRequest())).sessions == 0


async def _verifier_idle(stub) -> bool:
    return (await stub.Stats(verifier_pb2.VerifierStatsRequest())).kv_slots_in_use == 0


async def test_decode_rejects_malformed_requests_while_serving():
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address], max_message_mb=1)
    channel, stub = verifier_stub(v.address)
    try:
        # A long generation runs through everything below and must come out intact.
        p = prompts(1, seed=21)[0]
        running = asyncio.ensure_future(decode(stub, open_msg(p, 120, 4)))
        first = await decode(stub, open_msg(p, 4, 2, keep=True))
        h = first.summary.handle

        def with_handle(**changes) -> common_pb2.KvHandle:
            out = common_pb2.KvHandle()
            out.CopyFrom(h)
            for k, val in changes.items():
                setattr(out, k, val)
            return out

        cancel = verifier_pb2.DecodeRequest(cancel=verifier_pb2.Cancel())
        cases = [
            ("first message not open", [cancel], INVALID, "first Decode message"),
            ("empty stream", [], INVALID, "ended before"),
            ("id outside vocab", [open_msg([1, VOCAB], 4)], INVALID, "vocabulary"),
            ("negative id", [open_msg([1, -5], 4)], INVALID, "vocabulary"),
            ("empty prompt", [open_msg([], 4)], INVALID, "prompt is empty"),
            ("prompt over window", [open_msg([1] * 600, 4)], INVALID, "context window"),
            ("draft length 17", [open_msg(p, 4, 17)], INVALID, "draft_length"),
            ("negative temperature", [open_msg(p, 4, temperature=-1.0)], INVALID, "temperature"),
            ("no tokens wanted", [open_msg(p, 0)], INVALID, "max_new_tokens"),
            ("unknown handle", [open_msg(p + [1], 4, handle=with_handle(session_id="nope"))], NOT_FOUND, "unknown"),
            ("stale epoch", [open_msg(p + [1], 4, handle=with_handle(epoch=h.epoch + 1))], PRECONDITION, "stale"),
            ("wrong length", [open_msg(p + [1], 4, handle=with_handle(length=2))], PRECONDITION, "cached"),
            ("other replica", [open_msg(p + [1], 4, handle=with_handle(replica_id="x"))], PRECONDITION, "replica"),
            ("second open", [open_msg(p, 400, 2), open_msg(p, 4)], INVALID, "unexpected open"),
            ("bad draft length later", [open_msg(p, 400, 2), verifier_pb2.DecodeRequest(
                set_draft_length=verifier_pb2.DraftLength(tokens=40))], INVALID, "draft_length"),
            ("oversized", [open_msg([200] * 600_000, 4)], EXHAUSTED, ""),  # 1.2 MB > the 1 MiB limit
        ]
        for name, msgs, code, word in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await decode(stub, *msgs) if len(msgs) == 1 else await _decode_all(stub, msgs)
            assert e.value.code() == code, (name, e.value.code(), e.value.details())
            assert word in (e.value.details() or ""), (name, e.value.details())
        # The kept session is intact and continues; the running one finished untouched.
        more = await decode(stub, open_msg(p + first.tokens + [9], 6, 2, handle=h))
        assert more.tokens == target_only(target, p + first.tokens + [9], 6)
        assert (await running).tokens == target_only(target, p, 120)
    finally:
        await channel.close()
        await v.stop()
        await d.stop()


async def _decode_all(stub, msgs):
    """Send several messages on one Decode stream (with a pause so the open is processed first)."""

    async def requests():
        for i, m in enumerate(msgs):
            if i:
                await asyncio.sleep(0.05)
            yield m

    async for _ in stub.Decode(requests(), timeout=30):
        pass


async def test_verifier_session_limit_and_eviction():
    target, _ = models()
    v = await start_verifier(target, [], max_sessions=2)
    channel, stub = verifier_stub(v.address)
    try:
        p = prompts(1, seed=22)[0]
        kept = (await decode(stub, open_msg(p, 4, keep=True))).summary.handle
        busy = [stub.Decode(iter([open_msg(p, 400, 0)])) for _ in range(2)]
        for call in busy:  # both running: the idle kept session was evicted for the second
            assert (await call.read()).WhichOneof("kind") == "opened"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await decode(stub, open_msg(p, 4))
        assert e.value.code() == EXHAUSTED and "maximum of 2 sessions" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await decode(stub, open_msg(p + [1], 4, handle=kept))
        assert e.value.code() == NOT_FOUND and "evicted" in e.value.details()
        for call in busy:
            call.cancel()
        await wait_for(lambda: _verifier_idle(stub))
        assert (await decode(stub, open_msg(p, 4))).tokens == target_only(target, p, 4)
    finally:
        await channel.close()
        await v.stop()
