"""Regenerate answers with the target for the training prompts (DeepSpec §7 step 2).

Batched HF generation with left padding, resumable: every finished answer is appended to
`answers.jsonl` with its prompt key, and a restart skips the keys already there. Only the
`train/` prompt sets may be used; `eval/` is refused."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_common.errors import InvalidRequest
from verifier_svc.target_loading import DEFAULT_TARGET, chat_prompt_ids, load_target

# DeepSpec's Qwen3 regeneration settings; "greedy" matches the answers the target gives at T = 0,
# which is what the default serving path (and the greedy floors) verify against.
SAMPLINGS = {
    "deepspec": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
    "greedy": {"do_sample": False},
}


def load_prompts(files: list[Path], max_prompt_tokens: int, tokenizer) -> list[tuple[str, list[int]]]:
    """(key, prompt ids) for the first turn of every row, interleaved across files so a partial
    run covers every domain."""
    per_file = []
    for f in files:
        if "eval" in f.parts:
            raise InvalidRequest(f"refusing to train on an eval prompt set: {f}", "prompts")
        rows = []
        for i, line in enumerate(f.read_text().split("\n")):  # not splitlines: rows hold U+2028
            if line.strip():
                turn = json.loads(line)["turns"][0]
                ids = chat_prompt_ids(tokenizer, turn)
                if len(ids) > max_prompt_tokens:  # keep the template's tail (the generation prompt)
                    ids = ids[: max_prompt_tokens // 2] + ids[-(max_prompt_tokens - max_prompt_tokens // 2):]
                rows.append((f"{f.stem}:{i}", ids))
        per_file.append(rows)
    out = []
    for i in range(max(len(r) for r in per_file)):
        out.extend(r[i] for r in per_file if i < len(r))
    return out


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (input_ids, attention_mask) [B, max len], padded on the left
    as batched `generate()` needs (every row's next token lands in the last column)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard, shards = (int(x) for x in args.shard.split("/"))
    # One file per shard, so shards run as separate processes; every shard's file counts as done.
    answers = out_dir / ("answers.jsonl" if shards == 1 else f"answers.{shard}.jsonl")
    done = set()
    for f in out_dir.glob("answers*.jsonl"):
        done |= {json.loads(l)["key"] for l in f.read_text().split("\n") if l.strip()}
    target = load_target(args.model)
    tok, model = target.tokenizer, target.model
    prompts = load_prompts([Path(p) for p in args.prompts], args.max_prompt_tokens, tok)
    if args.limit:
        prompts = prompts[: args.limit]
    prompts = prompts[args.skip:]  # a later slice: new prompts for continuing a trained drafter
    todo = [p for i, p in enumerate(prompts) if p[0] not in done and i % shards == shard]
    (out_dir / f"datagen_config{'' if shards == 1 else f'.{shard}'}.json").write_text(json.dumps({
        "model": args.model, "sampling": SAMPLINGS[args.sampling], "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens, "prompts": args.prompts, "seed": args.seed,
        "chat_template": "target tokenizer's own (SmolLM2 default system prompt)",
    }, indent=2))
    cache = None
    if args.cache:
        from drafter_svc.loading import default_layer_ids
        from drafter_svc.train.cache import (
            DATAGEN_SHARD_BASE,
            DEFAULT_TOP_K,
            completed_shards,
            next_shard_index,
            open_cache,
        )

        layer_ids = default_layer_ids(int(model.config.num_hidden_layers))
        cache = open_cache(args.cache, model, layer_ids, target_name=target.name, top_k=DEFAULT_TOP_K,
                           max_length=args.cache_max_length, answers=str(out_dir))
        lo = DATAGEN_SHARD_BASE * (shard + 1)
        shard_index = next_shard_index(completed_shards(cache), lo, lo + DATAGEN_SHARD_BASE)
        capture = GenerationCapture(model, layer_ids, DEFAULT_TOP_K)
    # Similar lengths in a batch waste less padding.
    todo.sort(key=lambda p: len(p[1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = tqdm(total=len(todo), desc="datagen", unit="answer")
    with answers.open("a") as fh:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b : b + args.batch_size]
            ids, mask = left_padded([x for _, x in batch], pad)
            width = ids.shape[1]
            torch.manual_seed(args.seed + b)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                    pad_token_id=pad, return_dict_in_generate=True, **SAMPLINGS[args.sampling],
                )
            dt = time.perf_counter() - t0
            rows = []
            for row in gen.sequences[:, width:].tolist():
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != pad]
                rows.append(row)
            if cache is not None:  # shard first: answers without a shard are cached later by `cache`
                write_generation_shard(cache, shard_index, capture, batch, rows, width, args.cache_max_length)
                capture.reset()
                shard_index += 1
            for (key, prompt), row in zip(batch, rows):
                fh.write(json.dumps({"key": key, "prompt_ids": prompt, "answer_ids": row}) + "\n")
            fh.flush()
            bar.set_postfix(tok_s=f"{gen.sequences[:, width:].numel() / dt:.0f}")
            bar.update(len(batch))
    if cache is not None:
        capture.close()  # the model may be used on without the capture (tests, callers)


class GenerationCapture:
    """Forward hooks that keep, for every forward of a `generate()` call, the outputs of the chosen
    target layers and the top-k of the next-token distribution (T = 1) at the last position.

    Why hooks: `output_hidden_states`/`output_logits` keep all 31 layers and a 49152-wide fp32 row
    per step and sequence, ~10 GB for a 64-prompt batch; this keeps ~0.3 GB."""

    def __init__(self, model, layer_ids: list[int], top_k: int) -> None:
        self.layer_ids, self.top_k = list(layer_ids), top_k
        self.steps: list[list[torch.Tensor]] = []  # per forward: per layer [B, T, d]
        self.tops: list[tuple[torch.Tensor, torch.Tensor]] = []  # per forward: ([B, K] ids, [B, K] probs)
        self._current: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        self._hooks = [layers[i].register_forward_hook(self._layer_hook(i)) for i in self.layer_ids]
        self._hooks.append(model.get_output_embeddings().register_forward_hook(self._head_hook))

    def _layer_hook(self, i: int):
        def hook(_module, _inputs, output):
            self._current[i] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def _head_hook(self, _module, _inputs, output) -> None:
        top = torch.softmax(output[:, -1].float(), dim=-1).topk(self.top_k, dim=-1)
        self.steps.append([self._current[i] for i in self.layer_ids])
        self.tops.append((top.indices.to(torch.int32), top.values.to(torch.float16)))
        self._current = {}

    def reset(self) -> None:
        self.steps, self.tops = [], []

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.inference_mode()
def write_generation_shard(cache_dir: Path, index: int, cap: GenerationCapture, batch, rows, width: int,
                           max_length: int) -> None:
    """The target cache of one generated batch from the generation's own forwards (no second pass):
    prompt features from the prefill forward, answer features from the decode forwards, top-k
    next-token probabilities from each forward's last position. The last answer token's features
    are never needed (no block's context reaches it) and may not exist (generation stopped): zeros."""
    from drafter_svc.train.cache import write_shard
    from drafter_svc.train.data import MIN_LOSS_TOKENS, Sequence

    steps, tops, k = cap.steps, cap.tops, cap.top_k
    seqs, outputs = [], []
    for b, ((key, prompt), row) in enumerate(zip(batch, rows)):
        p, n = len(prompt), len(row)
        if n < MIN_LOSS_TOKENS or (max_length and p + n > max_length):
            continue
        feats = []
        for li in range(len(cap.layer_ids)):
            dec = [steps[1 + j][li][b, -1] for j in range(n - 1) if 1 + j < len(steps)]
            x = torch.cat([steps[0][li][b, width - p:]] + ([torch.stack(dec)] if dec else []))
            feats.append(torch.cat([x, x.new_zeros(p + n - x.shape[0], x.shape[-1])]))
        feats = torch.cat(feats, dim=-1).clamp(-65504, 65504).to(torch.float16)
        k_ids = torch.zeros(p + n, k, dtype=torch.int32)
        k_probs = torch.zeros(p + n, k, dtype=torch.float16)
        k_ids[p - 1 : p - 1 + n] = torch.stack([tops[t][0][b] for t in range(n)])
        k_probs[p - 1 : p - 1 + n] = torch.stack([tops[t][1][b] for t in range(n)])
        seqs.append(Sequence(key, prompt + row, [0] * p + [1] * n))
        outputs.append((feats.contiguous(), k_ids, k_probs))
    if seqs:
        write_shard(cache_dir, index, seqs, outputs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    default_train = sorted(str(x) for x in Path("../shared/data/prompts/train").glob("*.jsonl"))
    p.add_argument("--model", default=DEFAULT_TARGET)
    p.add_argument("--prompts", nargs="+", default=default_train)
    p.add_argument("--out", default="runs/smollm2/data")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--skip", type=int, default=0, help="leave out the first N prompts of the interleaved "
                   "list (after --limit), e.g. those an earlier drafter was trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="", help="also write the target cache (features + top-k) from the "
                   "generation's own forwards into this directory, saving `dspark train cache` a second pass")
    p.add_argument("--cache-max-length", type=int, default=560, help="as `cache --max-length`")
    p.add_argument("--sampling", choices=sorted(SAMPLINGS), default="greedy")
    p.add_argument("--shard", default="0/1", help="I/N: this process takes prompts i with i %% N == I "
                   "and writes answers.I.jsonl (run N processes side by side)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    generate(parser.parse_args())
