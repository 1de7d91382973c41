"""`dspark eval`: acceptance of a drafter on a prompt file, in-process (reference §5 metrics).

Fixed block (draft length = --block-size every round, no confidence scheduler), batch size 1, the
first turn of every row rendered with the target's chat template. Reported, micro-averaged over
all rounds of all prompts:

- τ = Σ tokens committed in rounds / #rounds (accepted drafts + the correction/bonus token; the
  first token, sampled at prefill, belongs to no round). `tau_uncapped` counts every round as
  m + 1 (m for a round ended by an accepted stop token) even when the last round overshoots
  max_new_tokens, as DeepSpec does; the two differ only in a prompt's last round.
- conditional acceptance at draft position k (1-based) = P(m ≥ k | m ≥ k−1, n ≥ k) =
  #rounds with m ≥ k / #rounds with m ≥ k−1 that verified at least k drafts. With a fixed block
  this equals DeepSpec's accept_rate@(k−1) / accept_rate@(k−2) except for rounds shortened by the
  end of the generation, which are counted correctly here.
- prefix survival accept_rate@(k−1) = #rounds with m ≥ k / #rounds with n ≥ k (DeepSpec's print).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from dspark_common.types import RoundStats, SamplingParams


@dataclass(frozen=True)
class RoundOutcome:
    proposed: int  # n: draft tokens verified
    accepted: int  # m: accepted draft tokens (stop token included when it ended the round)
    committed: int  # tokens this round added to the output
    stopped_on_draft: bool = False  # an accepted draft token was a stop id (no bonus token)

    @property
    def acceptance_length(self) -> int:
        return self.accepted if self.stopped_on_draft else self.accepted + 1


def outcome_of(r: RoundStats, stop_ids: frozenset[int] | set[int] = frozenset()) -> RoundOutcome:
    stopped = any(t in stop_ids for t in r.tokens[: r.accepted]) and len(r.tokens) <= r.accepted
    return RoundOutcome(r.scheduled, r.accepted, len(r.tokens), stopped)


def summarize(outcomes: list[RoundOutcome], block_size: int) -> dict:
    """τ, conditional acceptance and prefix survival by draft position (1..block_size)."""
    rounds = len(outcomes)
    cond: list[float | None] = []
    survival: list[float | None] = []
    for k in range(1, block_size + 1):
        hit = sum(1 for o in outcomes if o.accepted >= k)
        reached = sum(1 for o in outcomes if o.accepted >= k - 1 and o.proposed >= k)
        offered = sum(1 for o in outcomes if o.proposed >= k)
        cond.append(hit / reached if reached else None)
        survival.append(hit / offered if offered else None)
    return {
        "tau": sum(o.committed for o in outcomes) / rounds if rounds else 0.0,
        "tau_uncapped": sum(o.acceptance_length for o in outcomes) / rounds if rounds else 0.0,
        "rounds": rounds,
        "conditional_acceptance": cond,
        "prefix_survival": survival,
        "mean_proposed": sum(o.proposed for o in outcomes) / rounds if rounds else 0.0,
    }


def load_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """First turn of the first `limit` rows (all when 0) of a {"turns": [...]} JSONL file."""
    out = []
    for line in Path(path).read_text().split("\n"):  # not splitlines: rows may hold U+2028
        if line.strip():
            out.append(json.loads(line)["turns"][0])
            if limit and len(out) >= limit:
                break
    return out


def evaluate(stack, prompts: list[str], *, block_size: int, max_new_tokens: int, temperature: float,
             seed: int = 980406, progress: bool = True) -> dict:
    """Generate every prompt with a fixed draft length and summarise its rounds."""
    from tqdm import tqdm

    outcomes: list[RoundOutcome] = []
    tokens = 0
    t0 = time.perf_counter()
    for i, prompt in enumerate(tqdm(prompts, desc="eval", unit="prompt", disable=not progress)):
        result = stack.generate(stack.encode(prompt), max_new_tokens=max_new_tokens,
                                sampling=SamplingParams(temperature=temperature, seed=seed + i),
                                draft_length=block_size)
        outcomes.extend(outcome_of(r, stack.stop_ids) for r in result.rounds)
        tokens += len(result.token_ids)
    summary = summarize(outcomes, block_size)
    summary.update(prompts=len(prompts), generated_tokens=tokens, seconds=round(time.perf_counter() - t0, 1))
    return summary


def plot_acceptance(results: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Conditional acceptance by draft position, one line per labelled result."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, res in results.items():
        ys = res["conditional_acceptance"]
        xs = [k + 1 for k, y in enumerate(ys) if y is not None]
        ax.plot(xs, [y for y in ys if y is not None], "o-", label=f"{label} (τ = {res['tau']:.2f})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(accept k | 1..k−1 accepted)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(1, 1 + max((len(r["conditional_acceptance"]) for r in results.values()), default=1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


# ------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark_common.settings import GenerateSettings

    p.add_argument("--dataset", required=True, nargs="+",
                   help='JSONL file(s) of {"turns": [...]} rows (first turn used); --json prints one line per file')
    p.add_argument("--limit", type=int, default=0, help="first N prompts (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=7, help="draft tokens per round (fixed)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=980406, help="prompt i is sampled with seed + i")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default="", help="write a PNG of conditional acceptance by position")
    p.add_argument("--replay", action="store_true",
                   help="instead of running the decode loop: at T=0 replay the rounds on the target's greedy path "
                   "(train/replay.py; ~40x cheaper, same rounds up to float near-ties); at T>0 the expected rounds "
                   "along one seeded target sample per prompt (train/expected_replay.py; no sampling noise)")
    p.add_argument("--replay-cache", default="",
                   help="directory to keep the target's paths + features in, reused across drafters")
    GenerateSettings.add_arguments(p)
    # τ here is the drafter's own unless asked: copies from the sequence (--ngram-lookup) are the
    # decode loop's, and mixing them in would hide what training bought.
    p.set_defaults(ngram_lookup=False)


def _cached_paths(cache_file: Path | None, key: dict, tokenizer, prompts: list[str], build) -> list:
    """The target's paths for `prompts`: from `cache_file` when it was written for the same `key`,
    else `build(prompt_ids, pad_id)` (then saved there), so every drafter is scored on one set."""
    import torch

    from verifier_svc.target_loading import chat_prompt_ids

    if cache_file is not None and cache_file.is_file():
        saved = torch.load(cache_file, weights_only=False)
        if saved["key"] == key:
            return saved["paths"]
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    paths = build(ids, pad)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "paths": paths}, cache_file)
    return paths


def evaluate_replay(target, tokenizer, drafter, prompts: list[str], *, block_size: int, max_new_tokens: int,
                    stop_ids, cache_file: Path | None = None, progress: bool = True, lookup=None) -> dict:
    """Greedy τ by replaying the rounds on the target's greedy paths (see train/replay.py);
    `lookup` (a LookupConfig) replays the decode loop's copies from the sequence as well."""
    from tqdm import tqdm

    from drafter_svc.train.replay import greedy_paths, replay_path

    t0 = time.perf_counter()
    layers = list(drafter.config.target_layer_ids)
    key = {"prompts": prompts, "max_new_tokens": max_new_tokens, "layers": layers}
    paths = _cached_paths(cache_file, key, tokenizer, prompts, lambda ids, pad: greedy_paths(
        target, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, layer_ids=layers, pad_id=pad))
    outcomes: list[RoundOutcome] = []
    for path in tqdm(paths, desc="replay", unit="prompt", disable=not progress):
        outcomes.extend(replay_path(drafter, path, block_size=block_size, max_new_tokens=max_new_tokens,
                                    stop_ids=stop_ids, lookup=lookup))
    summary = summarize(outcomes, block_size)
    summary.update(prompts=len(prompts), generated_tokens=sum(len(p.tokens) for p in paths),
                   path_mismatches=sum(p.path_mismatches for p in paths), method="replay",
                   seconds=round(time.perf_counter() - t0, 1))
    return summary


def evaluate_expected(target, tokenizer, drafter, prompts: list[str], *, block_size: int, max_new_tokens: int,
                      stop_ids, sampling, seed: int, cache_file: Path | None = None, progress: bool = True) -> dict:
    """τ at T > 0 as expected rounds along one seeded target sample per prompt (train/expected_replay.py)."""
    from tqdm import tqdm

    from drafter_svc.train.expected_replay import (
        acceptance_probabilities, expected_walk, sampled_paths, summarize_walks,
    )

    t0 = time.perf_counter()
    layers = list(drafter.config.target_layer_ids)
    key = {"prompts": prompts, "max_new_tokens": max_new_tokens, "layers": layers, "seed": seed,
           "sampling": [sampling.temperature, sampling.top_p, sampling.top_k], "kind": "loop-sampled/hidden"}
    paths = _cached_paths(cache_file, key, tokenizer, prompts, lambda ids, pad: sampled_paths(
        target, ids, sampling=sampling, seed=seed, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
        layer_ids=layers, pad_id=pad))
    walks = []
    for path in tqdm(paths, desc="expected replay", unit="prompt", disable=not progress):
        accept = acceptance_probabilities(drafter, target.get_output_embeddings(), path, sampling, block_size)
        walks.append(expected_walk(accept, path.tokens, block_size=block_size, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids))
    summary = summarize_walks(walks, block_size)
    summary.update(prompts=len(prompts), generated_tokens=sum(len(p.tokens) for p in paths), method="expected_replay",
                   seed=seed, seconds=round(time.perf_counter() - t0, 1))
    return summary


def run(args: argparse.Namespace) -> int:
    from dspark_common.settings import GenerateSettings

    settings = GenerateSettings.from_sources(args, threads=args.threads or 1)
    if args.replay:
        return _run_replay(args, settings)
    from verifier_svc.local_stack import build_local_loop

    # Fixed blocks need no cost table, but copies are sized by the scheduler, which reads one.
    stack = build_local_loop(settings, profile=settings.ngram_lookup)
    results: dict[str, dict] = {}
    for dataset in args.dataset:  # one target/drafter load for every file
        prompts = load_prompts(dataset, args.limit)
        res = evaluate(stack, prompts, block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, progress=not args.json)
        res.update(method="decode_loop")
        _report(args, results, dataset, stack.drafter_name, res)
    if args.plot:
        plot_acceptance(results, args.plot, f"{stack.drafter_name}, T={args.temperature}")
    return 0


def _report(args: argparse.Namespace, results: dict, dataset: str, drafter_name: str, res: dict) -> None:
    res.update(dataset=Path(dataset).stem, drafter=drafter_name, temperature=args.temperature,
               block_size=args.block_size, max_new_tokens=args.max_new_tokens)
    results[res["dataset"]] = res
    if args.json:
        print(json.dumps(res), flush=True)
    else:
        cond = " ".join("-" if c is None else f"{c:.3f}" for c in res["conditional_acceptance"])
        print(f"{res['dataset']}: τ = {res['tau']:.3f} over {res['rounds']} rounds, {res['prompts']} prompts "
              f"(T={args.temperature}, block {args.block_size}, {args.max_new_tokens} new tokens, {res['method']})")
        print(f"  conditional acceptance by position: {cond}", flush=True)


def _run_replay(args: argparse.Namespace, settings) -> int:
    import torch

    from dspark_common.types import SamplingParams
    from drafter_svc.loading import load_drafter
    from verifier_svc.target_loading import load_target, stop_token_ids

    sampling = SamplingParams(temperature=args.temperature).validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    target = load_target(settings.model)
    drafter, drafter_name = load_drafter(settings.drafter, target.model, draft_vocab=settings.draft_vocab)
    stops = stop_token_ids(target.model, target.tokenizer)
    results: dict[str, dict] = {}
    for dataset in args.dataset:
        prompts = load_prompts(dataset, args.limit)
        tag = "" if sampling.greedy else f"_t{args.temperature:g}_s{args.seed}"
        cache = (Path(args.replay_cache) / f"{Path(dataset).stem}_n{len(prompts)}_m{args.max_new_tokens}{tag}.pt"
                 if args.replay_cache else None)
        if not sampling.greedy:
            res = evaluate_expected(target.model, target.tokenizer, drafter, prompts, block_size=args.block_size,
                                    max_new_tokens=args.max_new_tokens, stop_ids=stops, sampling=sampling,
                                    seed=args.seed, cache_file=cache, progress=not args.json)
            _report(args, results, dataset, drafter_name, res)
            continue
        res = evaluate_replay(target.model, target.tokenizer, drafter, prompts, block_size=args.block_size,
                              max_new_tokens=args.max_new_tokens, stop_ids=stops, cache_file=cache,
                              progress=not args.json, lookup=settings.lookup_config())
        _report(args, results, dataset, drafter_name, res)
    if args.plot:
        how = "replay" if sampling.greedy else "expected replay"
        plot_acceptance(results, args.plot, f"{drafter_name}, T={args.temperature:g} ({how})")
    return 0
