"""Peer baselines on the same target, prompts and machine, in this process (concurrency 1):

- `hf`: transformers `generate()`, plain (greedy, or sampling at the run's temperature);
- `prompt-lookup`: transformers assisted generation with `prompt_lookup_num_tokens=N`;
- `inprocess`: our own DecodeLoop (`build_local_loop`: target + DSpark drafter, no services) at
  every draft length of the benchmark (0 and auto by default).

Tokens are timestamped as they are produced (a streamer for `generate()`, each round for the
DecodeLoop), so the figures are those of the HTTP runs: TTFT, per-user decode tokens/s, ITL per
step, τ (tokens per target forward after the first; prompt lookup's acceptance by position is not
observable and left empty). Speedup is against the family's own reference: `hf` for prompt lookup,
draft length 0 for the in-process loop.

    python -m bench.baselines --dataset A.jsonl B.jsonl --limit 20 --max-new-tokens 128 --out DIR
    (the same as `dspark bench --baselines hf,prompt-lookup,inprocess ...` without --url/--start)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from bench.metrics import request_figures, run_figures

Clock = Callable[[], float]


@dataclass
class BaselineConfig:
    target: str = "smollm2"
    drafter: str = "default"
    prompt_lookup_tokens: int = 10
    threads: int = 1
    dtype: str = "float32"


def _record(prompt_index: int, prompt_len: int, ids: list[int], text: str, sent: float, step_times: list[float],
            end: float, spec: dict, stop_ids: frozenset[int]) -> dict:
    finish = "stop" if ids and ids[-1] in stop_ids else "length"
    rec = {"prompt_index": prompt_index, "ok": True, "error": None, "finish_reason": finish,
           "prompt_tokens": prompt_len, "completion_tokens": len(ids), "chunks": len(step_times),
           "speculative": spec, "text_sha1": hashlib.sha1(text.encode()).hexdigest()}
    rec.update(request_figures(sent=sent, content_times=step_times, end=end, completion_tokens=len(ids)))
    return rec


# ---------------------------------------------------------------------------- transformers generate()


class _TimingStreamer(BaseStreamer):
    """A transformers streamer that timestamps every `put` after the prompt's."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.prompt_seen = False
        self.steps: list[tuple[float, int]] = []  # (time, tokens in this put)
        self.ended: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.append((self.clock(), int(value.numel())))

    def end(self) -> None:
        self.ended = self.clock()


def hf_generate(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                stop_ids: set[int] | frozenset[int], pad_id: int, prompt_lookup_tokens: int | None = None,
                clock: Clock = time.perf_counter) -> tuple[list[int], float, list[float], float, dict]:
    """One `generate()`: (new ids, sent, step times, end, speculative-shaped stats). Each streamer
    step is one target forward; the first is the prefill."""
    streamer = _TimingStreamer(clock)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    kw: dict = {"do_sample": temperature > 0}
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    if prompt_lookup_tokens:
        kw["prompt_lookup_num_tokens"] = prompt_lookup_tokens
    sent = clock()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad_id, streamer=streamer, **kw)
    new = out[0, len(prompt_ids):].tolist()
    end = streamer.ended or clock()
    steps = streamer.steps
    rounds = max(len(steps) - 1, 0)  # forwards after the prefill, as the stack counts rounds
    after_first = len(new) - (steps[0][1] if steps else 0)
    spec = {"rounds": rounds, "mean_accepted_length": after_first / rounds if rounds else 0.0}
    return new, sent, [t for t, _ in steps], end, spec


# ---------------------------------------------------------------------------- our DecodeLoop in-process


def inprocess_generate(loop, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
                       draft_length: int | str, stop_ids: frozenset[int], clock: Clock = time.perf_counter):
    """One generation through `DecodeLoop` driven round by round so each round is timestamped:
    (new ids, sent, round times (the prefill first), end, SpeculativeStats.to_dict())."""
    from dspark_common.types import SamplingParams
    from verifier_svc.decode_loop import GenerationRequest

    sampling = SamplingParams(temperature, seed=seed if temperature > 0 else None)
    req = GenerationRequest(list(prompt_ids), max_new_tokens, sampling, draft_length, frozenset(stop_ids))
    sent = clock()
    s = loop.start(req)
    times = [clock()]
    try:
        while not s.done:
            loop.round([s])
            times.append(clock())
    finally:
        loop.release(s)
    return list(s.output), sent, times, times[-1], s.stats.to_dict()


# ---------------------------------------------------------------------------- runs


def baseline_runs(names: list[str], prompts_by_dataset: dict[str, list[list[int]]], *, temperatures: list[float],
                  max_new_tokens: int, draft_lengths: list, seed: int, hf_model=None, loop=None,
                  stop_ids: frozenset[int], pad_id: int, prompt_lookup_tokens: int,
                  text_of: Callable[[list[int]], str], progress=None, warmup: bool = True) -> list[dict]:
    """Run the named baselines over tokenized prompts (dataset -> prompts) on already loaded
    models; the run dicts of results.json (figures via bench.metrics, speedups added later)."""
    from bench.harness import loadavg, new_run

    methods: list[tuple[str, str, object, bool, str]] = []  # (source, family, variant, reference, label)
    if "hf" in names:
        methods.append(("hf", "hf", None, True, "generate"))
    if "prompt-lookup" in names:
        methods.append(("prompt-lookup", "hf", prompt_lookup_tokens, False, f"pl={prompt_lookup_tokens}"))
    if "inprocess" in names:
        methods += [("inprocess", "inprocess", dl, dl == 0, f"dl={dl}") for dl in draft_lengths]

    def one(source, variant, prompt, temperature, i, budget=max_new_tokens):
        if source == "inprocess":
            return inprocess_generate(loop, prompt, max_new_tokens=budget, temperature=temperature,
                                      seed=seed + i, draft_length=variant, stop_ids=stop_ids)
        return hf_generate(hf_model, prompt, max_new_tokens=budget, temperature=temperature, seed=seed + i,
                           stop_ids=stop_ids, pad_id=pad_id, prompt_lookup_tokens=variant)

    if warmup:  # first-call costs (allocations, lazy inits) stay out of the figures
        first = next(iter(prompts_by_dataset.values()))[0]
        for source, _, variant, _, _ in methods:
            one(source, variant, first, 0.0, 0, budget=min(8, max_new_tokens))
    runs = []
    for dataset, prompts in prompts_by_dataset.items():
        for t in temperatures:
            for source, family, variant, reference, label in methods:
                run = new_run(source, family, dataset, t, 1, variant if source == "inprocess" else 0, max_new_tokens,
                              reference, label)
                if progress is not None:
                    progress.set_postfix_str(run["name"], refresh=True)
                t0 = time.perf_counter()
                requests = []
                for i, prompt in enumerate(prompts):
                    ids, sent, steps, end, spec = one(source, variant, prompt, t, i)
                    requests.append(_record(i, len(prompt), ids, text_of(ids), sent, steps, end, spec, stop_ids))
                    if progress is not None:
                        progress.update(1)
                wall = time.perf_counter() - t0
                run["loadavg_after"] = loadavg()
                run["requests"] = requests
                run["metrics"] = run_figures(requests, wall)
                runs.append(run)
    return runs


def run_baselines(names: list[str], plan, cfg: BaselineConfig, *, progress: bool = True) -> tuple[list[dict], dict]:
    """Load the target (and the drafter for `inprocess`), tokenize the plan's prompts with the
    chat template, run the baselines. Returns the runs and what was loaded."""
    from tqdm import tqdm

    from dspark_common.settings import GenerateSettings
    from verifier_svc.target_loading import chat_prompt_ids, load_target, stop_token_ids

    torch.set_num_threads(cfg.threads)
    target = load_target(cfg.target, dtype=getattr(torch, cfg.dtype))
    tok = target.tokenizer
    stop = frozenset(stop_token_ids(target.model, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(stop)
    prompts = {d.name: [chat_prompt_ids(tok, p) for p in d.prompts] for d in plan.datasets}
    loop = None
    notes = {"target": target.name, "stop_ids": sorted(stop), "threads": cfg.threads}
    if "inprocess" in names:
        from verifier_svc.local_stack import build_local_loop

        stack = build_local_loop(GenerateSettings(model=cfg.target, drafter=cfg.drafter, threads=cfg.threads,
                                                  dtype=cfg.dtype))
        loop = stack.loop
        notes["drafter"] = stack.drafter_name
        notes["sps"] = {str(b): round(s, 2) for b, s in loop.sps.to_dict().items()}
    per_method = (("hf" in names) + ("prompt-lookup" in names)
                  + (len(plan.draft_lengths) if "inprocess" in names else 0))
    total = sum(len(p) for p in prompts.values()) * len(plan.temperatures) * per_method
    bar = tqdm(total=total, unit="gen", desc="baselines", disable=not progress)
    try:
        runs = baseline_runs(
            names, prompts, temperatures=plan.temperatures, max_new_tokens=plan.max_new_tokens,
            draft_lengths=plan.draft_lengths, seed=plan.seed, hf_model=target.model, loop=loop, stop_ids=stop,
            pad_id=pad, prompt_lookup_tokens=cfg.prompt_lookup_tokens,
            text_of=lambda ids: tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            progress=bar,
        )
    finally:
        bar.close()
    return runs, notes


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.baselines`: `dspark bench` with only --baselines (default: all three)."""
    import argparse
    import logging

    from bench import harness

    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(p)
    p.set_defaults(baselines=",".join(harness.BASELINES))
    args = p.parse_args(argv)
    if args.url or args.start:
        p.error("python -m bench.baselines runs only the in-process baselines; use dspark bench for --url/--start")
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return harness.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
