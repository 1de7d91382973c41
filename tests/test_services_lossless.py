"""Drafter and verifier as real gRPC services on loopback: greedy output through them is
token-identical to target-only decoding, for every draft length, alone and concurrently; a later
turn reuses the cached prefix; cancelling frees the KV on both services; the drafter's context
crosses the wire intact."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from drafter_svc.draft_engine import DraftEngine
from dspark_common.proto import drafter_pb2, drafter_pb2_grpc, verifier_pb2
from dspark_common.types import DraftRequest, SamplingParams
from tests.service_stack import (
    BLOCK,
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
from verifier_svc.drafter_client import RemoteProposer
from verifier_svc.target_engine import TargetEngine

MAX_NEW = 16


@pytest.fixture
async def stack():
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address], max_sessions=32)
    channel, stub = verifier_stub(v.address)
    dchannel = grpc.aio.insecure_channel(d.address)
    yield target, d, v, stub, drafter_pb2_grpc.DrafterStub(dchannel)
    await channel.close()
    await dchannel.close()
    await v.stop()
    await d.stop()


async def test_greedy_identical_for_every_draft_length(stack):
    target, d, v, stub, _ = stack
    ps = prompts(20, seed=1)
    want = [target_only(target, p, MAX_NEW) for p in ps]
    lengths = [0, 1, 2, 3, 4, 5, 6, 7, 8, "auto"]
    gens = []
    for dl in lengths:  # the 20 prompts of one draft length concurrently
        gens += await asyncio.gather(*(decode(stub, open_msg(p, MAX_NEW, dl)) for p in ps))
    for i, g in enumerate(gens):
        dl, p, w = lengths[i // len(ps)], ps[i % len(ps)], want[i % len(ps)]
        assert g.tokens == w, (dl, p)
        assert g.summary.finish_reason == "length" and g.summary.generated_tokens == MAX_NEW
        assert not any(r.fallback for r in g.rounds)
        assert sum(r.accepted for r in g.rounds) == g.summary.stats.accepted_draft_tokens
        if dl == 0:
            assert not any(r.proposed for r in g.rounds)
        else:
            assert g.opened.drafter == d.address
            assert max(r.proposed for r in g.rounds) == (BLOCK if dl == "auto" else dl)
    proposed = sum(g.summary.stats.draft_tokens for g in gens)
    accepted = sum(g.summary.stats.accepted_draft_tokens for g in gens)
    assert proposed > 1000 and 0.3 * proposed < accepted < proposed  # long prefixes and rejections
    stats = await stub.Stats(verifier_pb2.VerifierStatsRequest())
    assert stats.sessions == 0 and stats.kv_slots_in_use == 0 and stats.fallback_rounds == 0
    # What a router prices draft lengths with: the SPS table (given here) and the round overhead
    # (0 with a given table: only a profiled one learns it).
    assert dict(stats.sps) and all(v > 0 for v in stats.sps.values()) and stats.round_overhead_s == 0.0


async def test_health_and_info(stack):
    target, d, v, stub, dstub = stack
    for address, name in [(d.address, "dspark.v1.Drafter"), (v.address, "dspark.v1.Verifier")]:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = await dstub.Info(drafter_pb2.DrafterInfoRequest())
    assert info.block_size == BLOCK and info.vocab_size == target.config.vocab_size
    assert list(info.fc_weight.shape) == [info.hidden_size, info.hidden_size * len(info.target_layer_ids)]
    stats = await stub.Stats(verifier_pb2.VerifierStatsRequest())
    links = [(link.address, link.ready, link.replica_id) for link in stats.drafters]
    assert links == [(d.address, True, info.replica_id)]


async def test_concurrent_sessions_match_alone(stack):
    target, d, v, stub, dstub = stack
    ps = prompts(8, seed=2)
    opens = [open_msg(p, MAX_NEW, dl, temperature=t, seed=i)
             for i, p in enumerate(ps) for dl, t in [(5, 0.0), ("auto", 0.9)]]
    alone = [await decode(stub, o) for o in opens]
    together = await asyncio.gather(*(decode(stub, o) for o in opens))
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens
    for o, a in zip(opens[::2], alone[::2]):
        assert a.tokens == target_only(target, list(o.open.prompt_ids), MAX_NEW)
    dstats = await dstub.Stats(drafter_pb2.DrafterStatsRequest())
    assert dstats.max_batch > 1  # concurrent sessions were drafted in one batched forward


async def test_multi_turn_reuses_cached_prefix(stack):
    target, d, v, stub, dstub = stack
    p = prompts(1, seed=3)[0]
    first = await decode(stub, open_msg(p, 10, 4, keep=True))
    h = first.summary.handle
    assert h.session_id and h.length == len(p) + 10 - 1
    history = p + first.tokens + [7, 8, 9]
    second = await decode(stub, open_msg(history, 12, 4, handle=h, keep=True))
    assert second.opened.reused_tokens == h.length
    assert second.tokens == target_only(target, history, 12)
    assert any(r.proposed for r in second.rounds) and not any(r.fallback for r in second.rounds)
    # The old handle is now stale (its length moved on); a history that does not extend is refused.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(stub, open_msg(history + second.tokens, 4, handle=h))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    h2 = second.summary.handle
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await decode(stub, open_msg([1, 2, 3] + history, 4, handle=h2))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "extend" in e.value.details()
    # Release frees it on both services.
    await wait_for(lambda: _sessions(stub, dstub, (1, 1)))
    await stub.Release(verifier_pb2.ReleaseSessionRequest(handle=h2))
    await wait_for(lambda: _sessions(stub, dstub, (0, 0)))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Release(verifier_pb2.ReleaseSessionRequest(handle=h2))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def _sessions(stub, dstub, want):
    v = await stub.Stats(verifier_pb2.VerifierStatsRequest())
    d = await dstub.Stats(drafter_pb2.DrafterStatsRequest())
    return (v.kv_slots_in_use, d.sessions) == want


async def test_cancel_frees_kv_on_both_services(stack):
    target, d, v, stub, dstub = stack
    # Client-side cancel of the stream, mid-generation.
    call = stub.Decode(iter([open_msg(prompts(1, seed=4)[0], 400, 6)]))
    n = 0
    async for ev in call:
        n += ev.WhichOneof("kind") == "round"
        if n == 4:
            break
    busy = await stub.Stats(verifier_pb2.VerifierStatsRequest())
    assert busy.kv_slots_in_use == 1 and busy.kv_positions > 0
    call.cancel()
    await wait_for(lambda: _sessions(stub, dstub, (0, 0)))
    # A Cancel message: the stream ends with a "cancelled" Summary, kept or not.
    queue: asyncio.Queue = asyncio.Queue()
    await queue.put(open_msg(prompts(1, seed=5)[0], 400, 6, keep=True))

    async def requests():
        while (m := await queue.get()) is not None:
            yield m

    rounds, summary = 0, None
    async for ev in stub.Decode(requests()):
        if ev.WhichOneof("kind") == "round":
            rounds += 1
            if rounds == 3:
                await queue.put(verifier_pb2.DecodeRequest(cancel=verifier_pb2.Cancel()))
        elif ev.WhichOneof("kind") == "summary":
            summary = ev.summary
            await queue.put(None)
    assert summary.finish_reason == "cancelled" and not summary.handle.session_id
    await wait_for(lambda: _sessions(stub, dstub, (0, 0)))


async def test_control_write_after_the_summary_leaves_the_status_ok(stack):
    """A router may send a draft-length change just as the verifier sends its last round: the
    verifier keeps the call open until the client half-closes, so such a write still lands and
    the call ends OK. (Ending first made grpc.aio fail the write with INTERNAL and report that
    as the call's status, grpc/grpc#36066: the router took it for a lost verifier.)"""
    target, d, v, stub, dstub = stack
    prompt = prompts(1, seed=6)[0]
    call = stub.Decode()
    await call.write(open_msg(prompt, MAX_NEW, 4))
    tokens, summary = [], None
    while summary is None:
        ev = await call.read()
        assert ev is not grpc.aio.EOF
        if ev.WhichOneof("kind") == "round":
            tokens += ev.round.tokens
        elif ev.WhichOneof("kind") == "summary":
            summary = ev.summary
    await asyncio.sleep(0.2)  # long enough for a verifier that does not wait to have ended the call
    await call.write(verifier_pb2.DecodeRequest(set_draft_length=verifier_pb2.DraftLength(tokens=2)))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert tokens == target_only(target, prompt, MAX_NEW) and summary.finish_reason == "length"


async def test_remote_proposals_match_the_in_process_drafter():
    """The context crosses the wire intact: projected fp16 features appended through the Draft
    stream (riding on draft requests, and resent in full after the drafter restarts) give the
    same draft tokens as the in-process DraftEngine fed the raw features."""
    target, drafter = models(aligned=False)
    layers = drafter.config.target_layer_ids
    d = await start_drafter(drafter)
    remote = RemoteProposer([d.address], replica_id="t", backoff_s=(0.02, 0.2))
    assert await remote.start(10)
    local = DraftEngine(drafter, drafter.config)
    engine = TargetEngine(target, feature_layer_ids=layers)
    try:
        for i, p in enumerate(prompts(4, seed=6)):
            sid, tokens = f"s{i}", p + [5, 6, 7, 8, 9]
            engine.open(sid)
            feats = engine.extend(sid, tokens).features
            for proposer in (remote, local):
                proposer.open(sid)
                proposer.append_context(sid, feats[: len(p)], 0)
            for start, end in [(len(p), len(p)), (len(p), len(tokens))]:
                if end > start:
                    remote.append_context(sid, feats[start:end], start)
                    local.append_context(sid, feats[start:end], start)
                r = DraftRequest(sid, 3, end, BLOCK, SamplingParams())
                got = await remote.propose_one(r)
                assert got.proposal.tokens.tolist() == local.propose([r])[0].tokens.tolist(), (i, end)
        # A new drafter process on the same port knows nothing: the next draft resyncs.
        port = d.port
        await d.stop(grace=None)
        d = await start_drafter(drafter, port=port)
        await wait_for(lambda: _ready(remote), timeout=10)
        for i, p in enumerate(prompts(4, seed=6)):
            r = DraftRequest(f"s{i}", 4, len(p) + 5, BLOCK, SamplingParams())
            got = await remote.propose_one(r)
            assert not got.fallback and got.proposal.tokens.tolist() == local.propose([r])[0].tokens.tolist()
    finally:
        await remote.stop()
        await d.stop()


async def _ready(remote: RemoteProposer) -> bool:
    return remote.links[0].ready and remote.links[0].generation == 2


async def test_copies_from_the_sequence_keep_the_drafter_in_step():
    """With n-gram lookup on, rounds alternate between copies (no drafter call) and drafter blocks;
    the drafter must receive every position it missed on the next call: output stays identical and
    no round falls back."""
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address], ngram_lookup=True)
    channel, stub = verifier_stub(v.address)
    try:
        ps = [[5, 6, 7, 8] * 3, [9, 3, 9, 3, 4, 9, 3], [11, 12, 13, 14, 15, 11, 12, 13]] + prompts(3, seed=4)
        gens = [await decode(stub, open_msg(p, 40, dl)) for p in ps for dl in (4, "auto")]
        sources = [r.source for g in gens for r in g.rounds if not r.prefill]
        for i, g in enumerate(gens):
            assert g.tokens == target_only(target, ps[i // 2], 40), ps[i // 2]
            assert not any(r.fallback for r in g.rounds)
            assert g.summary.stats.lookup_rounds == sum(r.source == "lookup" for r in g.rounds)
        assert sources.count("lookup") > 0 and sources.count("drafter") > 0
        # a copied round is marked as such and costs no drafter call
        assert all(r.draft_ms == 0 for g in gens for r in g.rounds if r.source == "lookup")
    finally:
        await channel.close()
        await v.stop()
        await d.stop()
