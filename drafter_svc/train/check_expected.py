"""The expected replay against the real decode loop, on the loop's own texts.

    python -m drafter_svc.train.check_expected --dataset ../shared/data/prompts/eval/humaneval.jsonl \
        --limit 20 --max-new-tokens 64 --seed 777 --drafter models/dspark-smollm2-135m

Per prompt: DecodeLoop at T > 0 with a fixed block (prompt i seeded seed + i, as `dspark eval`), then
the expected rounds given the text it produced (`expected_replay`). The two τ must agree up to the
accept/reject noise, which the per-prompt round differences measure (`mean_round_diff` ± `se`).
Also `nll_minus_entropy`: the mean over the texts' tokens of −log p(x) − H(p), 0 in expectation for
genuine samples of the target's distribution (a check of the lossless promise at T > 0)."""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    from dspark_common.settings import GenerateSettings
    from drafter_svc.loading import load_drafter
    from dspark_common.types import SamplingParams
    from drafter_svc.train.evaluate import load_prompts, outcome_of, summarize
    from drafter_svc.train.expected_replay import (
        acceptance_probabilities, expected_walk, paths_along, summarize_walks,
    )
    from verifier_svc.local_stack import build_local_loop

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=7)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--drafter", default="default")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    settings = GenerateSettings.from_sources(None, threads=1, drafter=args.drafter, ngram_lookup=False)
    stack = build_local_loop(settings, profile=False)
    target = stack.loop.target.model
    drafter, _ = load_drafter(args.drafter, target)  # the served one, loaded again for its training forward
    head = target.get_output_embeddings()
    layers = drafter.config.target_layer_ids
    outcomes, walks, diffs, gaps = [], [], [], []
    for i, prompt in enumerate(load_prompts(args.dataset, args.limit)):
        sampling = SamplingParams(temperature=args.temperature, seed=args.seed + i)
        ids = stack.encode(prompt)
        real = stack.generate(ids, max_new_tokens=args.max_new_tokens, sampling=sampling, draft_length=args.block_size)
        rounds = [outcome_of(r, stack.stop_ids) for r in real.rounds]
        (path,) = paths_along(target, [ids], [real.token_ids], layer_ids=layers)
        with torch.inference_mode():
            accept = acceptance_probabilities(drafter, head, path, sampling, args.block_size)
            logp = torch.log_softmax(head(path.target_hidden).float() / args.temperature, -1)
        walk = expected_walk(accept, path.tokens, block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                             stop_ids=stack.stop_ids)
        nll = -logp.gather(1, torch.tensor(path.tokens[1:])[:, None])[:, 0]
        gaps += (nll + (logp.exp() * logp).sum(-1)).tolist()
        outcomes += rounds
        walks.append(walk)
        diffs.append(len(rounds) - walk.rounds)
    d, g = torch.tensor(diffs), torch.tensor(gaps)
    print(json.dumps({
        "dataset": args.dataset, "prompts": len(diffs), "real_tau": round(summarize(outcomes, args.block_size)["tau"], 4),
        "expected_tau": round(summarize_walks(walks, args.block_size)["tau"], 4),
        "mean_round_diff": round(float(d.mean()), 3), "se": round(float(d.std()) / len(d) ** 0.5, 3),
        "nll_minus_entropy": round(float(g.mean()), 4), "nll_minus_entropy_se": round(float(g.std()) / len(g) ** 0.5, 4),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
