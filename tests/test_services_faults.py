"""Drafter failures never fail a generation: a drafter process killed mid-generation (SIGKILL),
one that stops answering (past the deadline), one that sends invalid proposals, one of two
drafters going away. Each time the output stays token-identical to target-only greedy decoding,
the Round events say why a round ran target-only, and speculation resumes once a drafter is back
(resyncing the session's context)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from drafter_svc.checkpoint import save_checkpoint
from drafter_svc.server import DrafterService
from dspark_common.proto import verifier_pb2
from tests.service_stack import (
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

REPO = Path(__file__).resolve().parents[1]
FAST_RECONNECT = dict(reconnect_min_ms=20.0, reconnect_max_ms=200.0)


class DrafterProcess:
    """A drafter child process (tests/drafter_process.py) serving a checkpoint: `spawn` starts it
    loading, `serve(port)` makes it listen."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self) -> "DrafterProcess":
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "tests" / "drafter_process.py"), "--checkpoint", str(self.checkpoint),
            "--threads", "1", "--batch-window-ms", "0",
            cwd=REPO, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        return self

    async def serve(self, port: int = 0) -> int:
        self.proc.stdin.write(f"{port}\n".encode())
        await self.proc.stdin.drain()
        line = (await asyncio.wait_for(self.proc.stdout.readline(), 90)).decode()
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        assert m, f"drafter did not start: {line!r}"
        return int(m.group(1))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
def checkpoint(tmp_path):
    target, drafter = models()
    save_checkpoint(drafter, drafter.config, tmp_path / "drafter", include_frozen=True)
    return target, tmp_path / "drafter"


async def _stats(stub) -> verifier_pb2.VerifierStats:
    return await stub.Stats(verifier_pb2.VerifierStatsRequest())


async def test_drafter_process_stalls_dies_and_comes_back(checkpoint):
    target, ckpt = checkpoint
    proc = await DrafterProcess(ckpt).spawn()
    replacement = await DrafterProcess(ckpt).spawn()  # loads while the first one serves
    port = await proc.serve()
    v = await start_verifier(target, [f"127.0.0.1:{port}"], draft_deadline_ms=500.0, **FAST_RECONNECT)
    channel, stub = verifier_stub(v.address)
    try:
        # 1. Alive but silent (SIGSTOP): rounds past the deadline run target-only.
        prompt = prompts(1, seed=13)[0]
        proc.signal(signal.SIGSTOP)
        slow = await decode(stub, open_msg(prompt, 12, 4))
        assert slow.tokens == target_only(target, prompt, 12)
        reasons = {r.fallback for r in slow.rounds if r.fallback}
        assert "drafter_timeout" in reasons and reasons <= {"drafter_timeout", "drafter_unavailable"}
        assert not any(r.proposed for r in slow.rounds)
        proc.signal(signal.SIGCONT)
        await wait_for(lambda: _link_ready(stub, reconnects=1), timeout=20)
        ok = await decode(stub, open_msg(prompt, 12, 4))
        assert ok.tokens == slow.tokens and not any(r.fallback for r in ok.rounds)

        # 2. Killed (SIGKILL) in the middle of a generation: it completes, token-identical.
        prompt = prompts(1, seed=11)[0]
        want = target_only(target, prompt, 160)
        tokens, rounds, summary = [], [], None
        async for ev in stub.Decode(iter([open_msg(prompt, 160, 4, keep=True)])):
            kind = ev.WhichOneof("kind")
            if kind == "round":
                rounds.append(ev.round)
                tokens.extend(ev.round.tokens)
                if sum(r.proposed > 0 for r in rounds) == 3 and proc.proc.returncode is None:
                    await proc.kill()
            elif kind == "summary":
                summary = ev.summary
        assert tokens == want and summary.finish_reason == "length"
        fallbacks = [r.fallback for r in rounds if r.fallback]
        assert fallbacks and all(f.startswith(("drafter_unavailable", "drafter_error")) for f in fallbacks)
        assert summary.stats.fallback_rounds == len(fallbacks)

        # 3. A new drafter process on the same port: the verifier reconnects and new rounds
        # speculate again. The old process took the continued session's draft context with it, so
        # the verifier re-opens it from its own feature history (resync) in the first round.
        assert await replacement.serve(port) == port
        await wait_for(lambda: _link_ready(stub, reconnects=2), timeout=20)
        history = prompt + tokens + [3, 4]
        again = await decode(stub, open_msg(history, 16, 4, handle=summary.handle))
        assert again.opened.reused_tokens == summary.handle.length
        assert again.tokens == target_only(target, history, 16)
        assert again.rounds[1].proposed == 4 and not any(r.fallback for r in again.rounds)
        fresh = await decode(stub, open_msg(prompts(1, seed=12)[0], 12, "auto"))
        assert any(r.proposed for r in fresh.rounds) and not any(r.fallback for r in fresh.rounds)
    finally:
        await channel.close()
        await v.stop()
        await proc.kill()
        await replacement.kill()


async def _link_ready(stub, reconnects: int) -> bool:
    s = await _stats(stub)
    return all(d.ready for d in s.drafters) and s.drafters[0].reconnects >= reconnects


class CorruptingDrafter(DrafterService):
    """Drafts for real, then breaks every proposal in one of several ways."""

    breakage = 0

    def _run_batch(self, batch):
        replies = super()._run_batch(batch)
        for r in replies:
            if r.HasField("proposal"):
                CorruptingDrafter.breakage += 1
                p = r.proposal
                kind = CorruptingDrafter.breakage % 4
                if kind == 0:  # a token outside the vocabulary
                    p.tokens.data = torch.full((p.tokens.shape[0],), 10**6, dtype=torch.int64).numpy().tobytes()
                elif kind == 1:  # q rows that do not sum to 1
                    q = torch.frombuffer(bytearray(p.q_probs.data), dtype=torch.float32)
                    p.q_probs.data = (q * 0.5).numpy().tobytes()
                elif kind == 2:  # confidences outside [0, 1]
                    p.confidences.data = torch.full((p.confidences.shape[0],), 1.5).numpy().tobytes()
                else:  # the wrong number of slots
                    p.tokens.shape[0] += 1
        return replies


async def test_invalid_proposals_fall_back(monkeypatch):
    target, drafter = models()
    monkeypatch.setattr("drafter_svc.server.DrafterService", CorruptingDrafter)
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address])
    channel, stub = verifier_stub(v.address)
    try:
        for i, p in enumerate(prompts(4, seed=14)):
            g = await decode(stub, open_msg(p, 10, 1 + i))
            assert g.tokens == target_only(target, p, 10)
            reasons = [r.fallback for r in g.rounds if r.fallback]
            assert reasons and all(r.startswith("invalid_proposal: ") for r in reasons), reasons
            assert not any(r.proposed for r in g.rounds)  # a refused proposal is not counted as offered
        s = await _stats(stub)
        assert s.fallbacks_by_reason["invalid_proposal"] == s.fallback_rounds > 0
    finally:
        await channel.close()
        await v.stop()
        await d.stop()


async def test_failover_between_drafters():
    target, drafter = models()
    d1, d2 = await start_drafter(drafter), await start_drafter(drafter)
    v = await start_verifier(target, [d1.address, d2.address], **FAST_RECONNECT)
    channel, stub = verifier_stub(v.address)
    try:
        ps = prompts(4, seed=15)
        gens = await asyncio.gather(*(decode(stub, open_msg(p, 8, 4)) for p in ps))
        assert {g.opened.drafter for g in gens} == {d1.address, d2.address}  # spread by load
        await d1.stop(grace=None)
        await wait_for(lambda: _one_down(stub))
        after = await asyncio.gather(*(decode(stub, open_msg(p, 8, 4)) for p in ps))
        for p, g in zip(ps, after):
            assert g.tokens == target_only(target, p, 8)
            assert g.opened.drafter == d2.address and not any(r.fallback for r in g.rounds)
    finally:
        await channel.close()
        await v.stop()
        await d2.stop()


async def _one_down(stub) -> bool:
    return [d.ready for d in (await _stats(stub)).drafters] == [False, True]
