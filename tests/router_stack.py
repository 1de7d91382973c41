"""The router's test stack: a tiny byte-level tokenizer with a chat template (built in-process with
`tokenizers`, matching a tiny model's vocabulary), tiny target + drafter, real verifier/drafter
services, an in-process router, greedy references, and an oracle drafter whose drafts are right
(or wrong) on purpose."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import torch

from drafter_svc.server import DrafterService
from dspark_common.settings import RouterSettings
from dspark_common.types import Proposal
from router.app import RouterCore
from router.tokenizer import TargetTokenizer
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.target_engine import TargetEngine

REPO = Path(__file__).resolve().parents[1]
VOCAB = 260  # 256 byte tokens + 4 specials
IM_START, ENDOFTEXT, IM_END, MASK = 256, 257, 258, 259  # IM_END = eos = VOCAB - 2 (tiny_models' eos)
BLOCK = 8
MODEL_NAME = "tiny-llama"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REDIS_URL = "redis://127.0.0.1:6379/13"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_tokenizer():
    """A byte-level tokenizer: id b < 256 is byte b; 256..259 are <|im_start|>, <|endoftext|>,
    <|im_end|> (eos) and <|mask|>. Multi-byte characters span several tokens, so streaming must
    hold back incomplete UTF-8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    specials = ["<|im_start|>", "<|endoftext|>", "<|im_end|>", "<|mask|>"]
    vocab.update({s: 256 + i for i, s in enumerate(specials)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token=None)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def router_tokenizer(hf=None) -> TargetTokenizer:
    return TargetTokenizer(hf or tiny_tokenizer(), MODEL_NAME, frozenset({IM_END}))


def models(seed: int = 0):
    target = tiny_target("llama", seed=seed, vocab=VOCAB, hidden=64, layers=2)
    return target, tiny_drafter(target, seed=seed + 1, block_size=BLOCK)


def target_only(target, prompt: list[int], max_new: int) -> list[int]:
    loop = DecodeLoop(TargetEngine(target))
    return loop.generate(GenerationRequest(list(prompt), max_new, draft_length=0,
                                           stop_ids=frozenset({IM_END}))).token_ids


def save_model_dir(target, path: Path) -> Path:
    """The tiny target and its tokenizer as a model directory (`dspark verifier --model DIR`)."""
    target.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


async def start_router(tokenizer: TargetTokenizer, verifiers: list[str], **settings) -> RouterCore:
    s = RouterSettings.from_sources(None, env={}, **{
        "port": 0, "grpc_port": 0, "verifier": verifiers, "health_interval_s": 0.2, "failover_wait_s": 15.0,
        "model_name": MODEL_NAME, **settings})
    core = RouterCore(s, tokenizer)
    await core.start()
    return core


def store_settings(kind: str) -> dict:
    """Router settings for the embedded store or the real Redis (db 13, a prefix of its own)."""
    if kind == "memory":
        return {}
    return {"redis_url": REDIS_URL, "redis_prefix": f"dspark-test-{uuid.uuid4().hex[:8]}"}


async def clear_redis(prefix: str) -> None:
    import redis.asyncio as redis

    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def dspark_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dspark_common.cli", *args]


LISTENING = re.compile(r"listening on (?:http://)?([\d.]+):(\d+)")


class OracleDrafterService(DrafterService):
    """A real drafter service whose drafts are replaced, per session, by the target's own greedy
    continuation ("good") or by tokens that are certainly wrong ("bad"). `plans` maps a router
    session id to (mode, the full greedy sequence: prompt + continuation)."""

    plans: dict[str, tuple[str, list[int]]] = {}

    def _propose(self, requests):
        out = super()._propose(requests)
        for i, r in enumerate(requests):
            sid = r.session_id.split("/", 1)[-1].split(".", 1)[0]
            plan = self.plans.get(sid)
            if plan is None or not isinstance(out[i], Proposal):
                continue
            mode, seq = plan
            n = r.block_size
            want = seq[r.anchor_pos + 1 : r.anchor_pos + 1 + n]
            want += [0] * (n - len(want))
            if mode == "bad":
                want = [(t + 1) % 256 for t in want]
            tokens = torch.tensor(want, dtype=torch.long)
            out[i] = Proposal(tokens, tokens[:, None].clone(), torch.ones(n, 1), torch.full((n,), 0.9))
        return out


class ServiceProcess:
    """`dspark drafter|verifier|router ...` as a child process; `start` waits for its
    'listening on HOST:PORT' line."""

    def __init__(self, role: str, *args: str) -> None:
        self.role, self.args = role, list(args)
        self.proc = None
        self.address = ""

    async def start(self, timeout: float = 90.0) -> str:
        import asyncio

        self.proc = await asyncio.create_subprocess_exec(
            *dspark_cmd(self.role, *self.args), cwd=REPO, env=child_env(), stdout=asyncio.subprocess.PIPE)
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()
            if not line:
                raise AssertionError(f"{self.role} exited before listening (rc {await self.proc.wait()})")
            m = LISTENING.search(line)
            if m:
                self.address = f"{m.group(1)}:{m.group(2)}"
                return self.address

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
