"""`dspark generate`: one generation in-process (target engine + DSpark drafter, no services)."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dspark_common.settings import GenerateSettings
from dspark_common.types import SamplingParams
from verifier_svc.local_stack import build_local_loop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the target's chat template")
    p.add_argument("--draft-length", default="auto", help="0..16 or auto (default)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the text")
    GenerateSettings.add_arguments(p)


def parse_draft_length(value: str) -> int | str:
    return value if value == "auto" else int(value)


def run(args: argparse.Namespace) -> int:
    settings = GenerateSettings.from_sources(args)
    stack = build_local_loop(settings)
    if not args.json:
        print(f"[target {stack.target_name}; drafter: {stack.drafter_name}]", file=sys.stderr)
    prompt_ids = stack.encode(args.prompt, chat=args.chat)
    result = stack.generate(
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(args.temperature, args.top_p, args.top_k, args.seed),
        draft_length=parse_draft_length(args.draft_length),
    )
    text = stack.decode(result.token_ids)
    if args.json:
        print(json.dumps({
            "token_ids": result.token_ids, "text": text, "finish_reason": result.finish_reason,
            "speculative": result.stats.to_dict(), "drafter": stack.drafter_name,
            "seconds": round(result.seconds, 3),
        }))
    else:
        print(text)
        s = result.stats
        print(f"[{len(result.token_ids)} tokens in {result.seconds:.2f}s, {s.rounds} rounds, "
              f"mean accepted length {s.mean_accepted_length:.2f}]", file=sys.stderr)
    return 0
