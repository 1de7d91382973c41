"""The GPU check (`compose/gpu_check.sh` runs it): a real drafter and a real verifier gRPC service
on one device (CUDA, or the CPU for a dry run) around tiny randomly initialised models, driven
over loopback gRPC. It checks greedy losslessness — every prompt's output with speculation
(fixed draft lengths and "auto") must be token-identical to draft length 0 through the same
verifier — and reports decode tokens/s, one session at a time and `--concurrency` at once.

    python -m bench.gpu_check --device cuda --dtype bfloat16 --out gpu_check.json
    python -m bench.gpu_check --device cpu --dtype float32          # the same check on the CPU

Two model worlds (see `tiny_models`): "random" (the untrained drafter is almost never right:
every round rejects and rolls back) and "bigram" (the drafter knows most of the target's
next-token map: drafts are accepted for a few tokens, then rejected). Speculation is not meant to
be faster with models this small: the point is the service path on the device (features,
projection, batched verify, acceptance, KV rollback), not the speedup.
Exit status 0 = lossless, 1 = a mismatch, 2 = it could not run.

bfloat16 note: a block verify and a one-token forward run different kernels, so their logits
differ in the last bits; a greedy tie that flips is a property of the arithmetic, not of the
algorithm. Each mismatch is reported with the target-only logit margin (top-1 minus top-2) at
the first differing position, so a near-tie is told apart from a real bug."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field

import grpc
import torch
from transformers import LlamaConfig, PreTrainedModel

from drafter_svc.loading import random_drafter
from drafter_svc.server import DrafterServer
from dspark_common.proto import common_pb2, verifier_pb2, verifier_pb2_grpc
from dspark_common.settings import DrafterSettings, VerifierSettings
from verifier_svc.server import VerifierServer
from verifier_svc.target_loading import load_target

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- models


def tiny_models(*, vocab: int, hidden: int, layers: int, block_size: int, seed: int, device: str,
                dtype: torch.dtype, world: str = "random",
                corrupt: float = 0.3) -> tuple[PreTrainedModel, torch.nn.Module]:
    """A random Llama target and a random DSpark drafter built for it, on `device` in `dtype`.

    world "random": every weight random (output embeddings sharpened, so greedy choices are not
    near-ties); the untrained drafter is almost never right, so every round rejects and rolls
    back. world "bigram": the target's layers write nothing to the residual stream, so its greedy
    next token is a fixed random permutation of the current one, and the drafter's Markov head
    knows that permutation except for a `corrupt` fraction of tokens: drafts are accepted for a
    few tokens and then rejected, which exercises partial acceptance, the bonus token and rollback
    after a partial accept."""
    heads = max(hidden // 64, 2)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                         max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=vocab - 2,
                         bos_token_id=0)
    target = load_target(config, seed=seed).model
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(8.0)
    rank = hidden if world == "bigram" else 16
    drafter = random_drafter(target, seed=seed + 1, block_size=block_size, layers=1, markov_rank=rank)
    if world == "bigram":
        _make_bigram(target, drafter, corrupt=corrupt, seed=seed + 2)
    elif world != "random":
        raise ValueError(f"unknown world {world!r}")
    return target.to(device=device, dtype=dtype), drafter.to(device=device, dtype=dtype)


@torch.no_grad()
def _make_bigram(target: PreTrainedModel, drafter: torch.nn.Module, *, corrupt: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in target.model.layers:  # the residual stream stays the current token's embedding
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    emb = target.get_input_embeddings().weight.float()
    unit = emb / emb.norm(dim=-1, keepdim=True)
    vocab, hidden = unit.shape
    nxt = torch.randperm(vocab, generator=g)  # target: greedy successor of t is nxt[t]
    scale = 4.0 / hidden ** 0.5  # logits ~ 4 at the successor, ~0.25 elsewhere
    head = torch.zeros_like(unit).index_add_(0, nxt, unit * scale)
    target.get_output_embeddings().weight.copy_(head)
    drafter.lm_head.weight.copy_(head)
    wrong = torch.rand(vocab, generator=g) < corrupt
    guess = nxt.clone()
    guess[wrong] = torch.randint(0, vocab, (int(wrong.sum()),), generator=g)
    markov = drafter.markov_head
    markov.markov_w1.weight.copy_(unit)  # bias_j(prev) = 16 * <unit[j's source], unit[prev]>
    markov.markov_w2.weight.copy_(torch.zeros_like(unit).index_add_(0, guess, unit * 16.0))


def random_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab - 2, (int(torch.randint(8, 32, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# ---------------------------------------------------------------------------- client


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    fallback_rounds: int = 0
    seconds: float = 0.0


def _draft_length(dl: int | str) -> verifier_pb2.DraftLength:
    return verifier_pb2.DraftLength(auto=True) if dl == "auto" else verifier_pb2.DraftLength(tokens=int(dl))


async def decode(stub: verifier_pb2_grpc.VerifierStub, prompt: list[int], max_new: int, dl: int | str,
                 timeout_s: float) -> Generation:
    """One greedy Decode stream to its Summary (no stop ids: exactly `max_new` tokens)."""
    open_ = verifier_pb2.OpenSession(prompt_ids=prompt, max_new_tokens=max_new, draft_length=_draft_length(dl),
                                     sampling=common_pb2.SamplingParams(temperature=0.0))
    out, t0 = Generation(), time.perf_counter()
    async for ev in stub.Decode(iter([verifier_pb2.DecodeRequest(open=open_)]), timeout=timeout_s):
        if ev.WhichOneof("kind") == "round":
            r = ev.round
            out.tokens.extend(r.tokens)
            if not r.prefill:
                out.rounds += 1
                out.proposed += r.proposed
                out.accepted += r.accepted
                out.fallback_rounds += bool(r.fallback)
    out.seconds = time.perf_counter() - t0
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def greedy_margin(target: PreTrainedModel, prompt: list[int], generated: list[int], position: int) -> float:
    """Target-only logit margin (top-1 minus top-2) for the token at `position` of the output."""
    ids = torch.tensor([prompt + generated[:position]], device=target.device)
    logits = target(input_ids=ids).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


# ---------------------------------------------------------------------------- the check


def summarize(gens: list[Generation], wall_s: float) -> dict:
    tokens = sum(len(g.tokens) for g in gens)
    rounds = sum(g.rounds for g in gens)
    return {
        "sessions": len(gens), "tokens": tokens, "wall_s": round(wall_s, 4),
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "per_session_tokens_per_s": round(sum(len(g.tokens) / g.seconds for g in gens) / len(gens), 2),
        "rounds": rounds, "proposed": sum(g.proposed for g in gens), "accepted": sum(g.accepted for g in gens),
        "mean_accepted_length": round(tokens / rounds, 3) if rounds else None,
        "fallback_rounds": sum(g.fallback_rounds for g in gens),
    }


async def run_world(a: argparse.Namespace, world: str) -> dict:
    """Drafter + verifier services around one world's models; every mode on the same prompts."""
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    target, drafter = tiny_models(vocab=a.vocab, hidden=a.hidden, layers=a.layers, block_size=a.block_size,
                                  seed=a.seed, device=a.device, dtype=dtype, world=world, corrupt=a.corrupt)
    load_s = time.perf_counter() - t0
    drafter_server = DrafterServer(drafter, DrafterSettings.from_sources(
        None, env={}, host="127.0.0.1", port=0, device=a.device, dtype=a.dtype))
    await drafter_server.start()
    verifier_server = VerifierServer(target, VerifierSettings.from_sources(
        None, env={}, host="127.0.0.1", port=0, device=a.device, dtype=a.dtype, drafter=[drafter_server.address],
        drafter_wait_s=30.0, profile_sps=True, max_sessions=max(a.concurrency, 1) + 2))
    channel = None
    result: dict = {
        "model": {"vocab": a.vocab, "hidden": a.hidden, "layers": a.layers, "block_size": a.block_size,
                  "target_params": sum(p.numel() for p in target.parameters()),
                  "drafter_params": sum(p.numel() for p in drafter.parameters())},
        "load_s": round(load_s, 3), "modes": {}, "mismatches": [],
    }
    try:
        t1 = time.perf_counter()
        await verifier_server.start()  # connects to the drafter, profiles SPS on the device
        result["verifier_start_s"] = round(time.perf_counter() - t1, 3)
        channel = grpc.aio.insecure_channel(verifier_server.address)
        stub = verifier_pb2_grpc.VerifierStub(channel)
        prompts = random_prompts(a.prompts, a.vocab, a.seed + 3)
        modes: list[int | str] = [0, *a.draft_lengths]
        await decode(stub, prompts[0], 4, modes[-1], a.timeout_s)  # warm-up: kernels, allocator, streams
        outputs: dict[str, list[list[int]]] = {}
        for dl in modes:
            gens = []
            t = time.perf_counter()
            for p in prompts:  # one session at a time: per-user decode speed
                gens.append(await decode(stub, p, a.new_tokens, dl, a.timeout_s))
            sequential = summarize(gens, time.perf_counter() - t)
            outputs[str(dl)] = [g.tokens for g in gens]
            batch = [prompts[i % len(prompts)] for i in range(a.concurrency)]
            t = time.perf_counter()
            cgens = await asyncio.gather(*(decode(stub, p, a.new_tokens, dl, a.timeout_s) for p in batch))
            concurrent = summarize(list(cgens), time.perf_counter() - t)
            for i, g in enumerate(cgens):  # sessions verified together must match sessions alone
                ref = outputs[str(dl)][i % len(prompts)]
                if g.tokens != ref:
                    result["mismatches"].append(_mismatch(target, batch[i], ref, g.tokens, f"{dl} alone",
                                                          f"{dl} with {a.concurrency} at once"))
            result["modes"][str(dl)] = {"sequential": sequential, "concurrent": concurrent}
            log.info("%s world, draft length %s: %.1f tok/s one at a time, %.1f tok/s with %d at once, "
                     "%d of %d drafted tokens accepted", world, dl, sequential["tokens_per_s"],
                     concurrent["tokens_per_s"], a.concurrency, sequential["accepted"], sequential["proposed"])
        for dl in modes[1:]:
            for p, ref, got in zip(prompts, outputs["0"], outputs[str(dl)]):
                if got != ref:
                    result["mismatches"].append(_mismatch(target, p, ref, got, "0", str(dl)))
        base = result["modes"]["0"]["sequential"]["tokens_per_s"]
        for dl in modes[1:]:
            m = result["modes"][str(dl)]["sequential"]
            m["speedup_vs_draft_length_0"] = round(m["tokens_per_s"] / base, 3) if base else None
        result["lossless"] = not result["mismatches"]
    finally:
        if channel is not None:
            await channel.close()
        await verifier_server.stop()
        await drafter_server.stop()
    return result


async def run_check(a: argparse.Namespace) -> dict:
    result: dict = {
        "device": a.device,
        "device_name": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else platform.machine(),
        "dtype": a.dtype, "torch": torch.__version__, "python": platform.python_version(),
        "max_new_tokens": a.new_tokens, "prompts": a.prompts, "concurrency": a.concurrency, "worlds": {},
    }
    for world in a.worlds:
        result["worlds"][world] = await run_world(a, world)
    result["lossless"] = all(w["lossless"] for w in result["worlds"].values())
    return result


def _mismatch(target, prompt, reference, got, ref_mode: str, got_mode: str) -> dict:
    i = first_difference(reference, got)
    return {"prompt_len": len(prompt), "reference": ref_mode, "compared": got_mode, "first_difference": i,
            "reference_token": reference[i] if i is not None and i < len(reference) else None,
            "compared_token": got[i] if i is not None and i < len(got) else None,
            "target_only_margin": round(greedy_margin(target, prompt, reference, i), 5)
            if i is not None and i < len(reference) else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=8, help="drafter block size (longest draft)")
    p.add_argument("--draft-lengths", default="2,4,7,auto", help="speculative draft lengths compared with 0")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8, help="sessions decoding at once in the batch run")
    p.add_argument("--worlds", default="random,bigram", help="model worlds to check (see tiny_models)")
    p.add_argument("--corrupt", type=float, default=0.3, help="bigram world: share of tokens the drafter gets wrong")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline of one Decode stream")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.worlds = [w for w in a.worlds.split(",") if w]
    a.draft_lengths = [x if x == "auto" else int(x) for x in a.draft_lengths.split(",") if x]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_check(a))
    except Exception as e:  # report what broke, as data, then fail
        log.exception("gpu check failed")
        result = {"device": a.device, "dtype": a.dtype, "error": f"{type(e).__name__}: {e}", "lossless": False}
        code = 2
    else:
        code = 0 if result["lossless"] else 1
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
