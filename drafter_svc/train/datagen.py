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

SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}  # DeepSpec's Qwen3 regeneration settings


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


def generate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = out_dir / "answers.jsonl"
    done = set()
    if answers.exists():
        done = {json.loads(l)["key"] for l in answers.read_text().split("\n") if l.strip()}
    target = load_target(args.model)
    tok, model = target.tokenizer, target.model
    prompts = load_prompts([Path(p) for p in args.prompts], args.max_prompt_tokens, tok)
    if args.limit:
        prompts = prompts[: args.limit]
    todo = [p for p in prompts if p[0] not in done]
    (out_dir / "datagen_config.json").write_text(json.dumps({
        "model": args.model, "sampling": SAMPLING, "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": args.max_prompt_tokens, "prompts": args.prompts, "seed": args.seed,
        "chat_template": "target tokenizer's own (SmolLM2 default system prompt)",
    }, indent=2))
    # Similar lengths in a batch waste less padding.
    todo.sort(key=lambda p: len(p[1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="datagen", unit="answer")
    with answers.open("a") as fh:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b : b + args.batch_size]
            width = max(len(ids) for _, ids in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for _, x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x in batch])
            torch.manual_seed(args.seed + b)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=True,
                    pad_token_id=pad, **SAMPLING,
                )
            dt = time.perf_counter() - t0
            for (key, prompt), row in zip(batch, gen[:, width:].tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != pad]
                fh.write(json.dumps({"key": key, "prompt_ids": prompt, "answer_ids": row}) + "\n")
            fh.flush()
            bar.set_postfix(tok_s=f"{gen[:, width:].numel() / dt:.0f}")
            bar.update(len(batch))


def add_arguments(p: argparse.ArgumentParser) -> None:
    default_train = sorted(str(x) for x in Path("../shared/data/prompts/train").glob("*.jsonl"))
    p.add_argument("--model", default=DEFAULT_TARGET)
    p.add_argument("--prompts", nargs="+", default=default_train)
    p.add_argument("--out", default="runs/smollm2/data")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    generate(parser.parse_args())
