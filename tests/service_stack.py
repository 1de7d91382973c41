"""Real drafter and verifier gRPC services on loopback ports around tiny seeded models, and a
small Decode client, for the service tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import torch

from drafter_svc.server import DrafterServer
from dspark_common.proto import common_pb2, verifier_pb2, verifier_pb2_grpc
from dspark_common.settings import DrafterSettings, VerifierSettings
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.scheduler import SpsTable
from verifier_svc.server import VerifierServer
from verifier_svc.target_engine import TargetEngine

VOCAB = 256
BLOCK = 8
# Verifying more tokens is almost free but not quite, so "auto" admits long blocks and still cuts.
SPS = SpsTable({1: 100.0, 4: 95.0, 9: 85.0})


@torch.no_grad()
def models(seed: int = 0, *, aligned: bool = True):
    """A 2-layer tiny Llama target and a DSpark drafter for it (DSparkConfig.from_target).

    Aligned (default): the target's layers are damped, so it is mostly a bigram model, and the
    drafter's Markov head is given exactly those bigram logits (W1 = final_norm(embed), W2 =
    lm_head) with a damped backbone, so drafts are often but not always right: long accepted
    prefixes, partial acceptance and rollback in every test, and far fewer rounds. Otherwise the
    drafter is random (almost never right)."""
    target = tiny_target("llama", seed=seed, vocab=VOCAB, hidden=64, layers=2)
    if not aligned:
        return target, tiny_drafter(target, seed=seed + 1, block_size=BLOCK)
    for layer in target.model.layers:
        layer.self_attn.o_proj.weight.mul_(0.3)
        layer.mlp.down_proj.weight.mul_(0.3)
    drafter = tiny_drafter(target, seed=seed + 1, block_size=BLOCK, markov_rank=64)
    drafter.markov_head.markov_w1.weight.copy_(target.model.norm(target.get_input_embeddings().weight))
    drafter.markov_head.markov_w2.weight.copy_(target.get_output_embeddings().weight)
    drafter.norm.weight.mul_(0.05)
    return target, drafter


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 2, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def target_only(target, prompt: list[int], max_new: int, stop_ids=frozenset()) -> list[int]:
    loop = DecodeLoop(TargetEngine(target))
    return loop.generate(GenerationRequest(prompt, max_new, draft_length=0, stop_ids=stop_ids)).token_ids


async def start_drafter(drafter, **settings) -> DrafterServer:
    server = DrafterServer(drafter, DrafterSettings.from_sources(None, env={}, **{"port": 0, **settings}))
    await server.start()
    return server


async def start_verifier(target, drafters: list[str], **settings) -> VerifierServer:
    """Copies from the sequence are off unless asked (`ngram_lookup=True`): most service tests
    script the drafter's proposals (oracles, faults) and need every round to go to it."""
    s = VerifierSettings.from_sources(None, env={}, **{"port": 0, "drafter": drafters, "profile_sps": False,
                                                       "drafter_wait_s": 10.0, "ngram_lookup": False, **settings})
    server = VerifierServer(target, s, sps=SPS)
    await server.start()
    return server


def draft_length_msg(dl: int | str) -> verifier_pb2.DraftLength:
    return verifier_pb2.DraftLength(auto=True) if dl == "auto" else verifier_pb2.DraftLength(tokens=dl)


def open_msg(prompt, max_new, dl: int | str = "auto", *, temperature: float = 0.0, seed: int | None = None,
             stop_ids=(), handle: common_pb2.KvHandle | None = None, keep: bool = False) -> verifier_pb2.DecodeRequest:
    sampling = common_pb2.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return verifier_pb2.DecodeRequest(open=verifier_pb2.OpenSession(
        prompt_ids=prompt, max_new_tokens=max_new, draft_length=draft_length_msg(dl), sampling=sampling,
        stop_ids=list(stop_ids), handle=handle, keep_session=keep,
    ))


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    rounds: list[verifier_pb2.Round] = field(default_factory=list)
    opened: verifier_pb2.Opened | None = None
    summary: verifier_pb2.Summary | None = None


async def decode(stub: verifier_pb2_grpc.VerifierStub, open_request, *, timeout: float = 30.0) -> Generation:
    """Run one Decode stream to its Summary."""
    out = Generation()
    async for ev in stub.Decode(iter([open_request]), timeout=timeout):
        kind = ev.WhichOneof("kind")
        if kind == "opened":
            out.opened = ev.opened
        elif kind == "round":
            out.rounds.append(ev.round)
            out.tokens.extend(ev.round.tokens)
        else:
            out.summary = ev.summary
    return out


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll an async predicate until it returns something truthy."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)


def verifier_stub(address: str) -> tuple[grpc.aio.Channel, verifier_pb2_grpc.VerifierStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, verifier_pb2_grpc.VerifierStub(channel)
