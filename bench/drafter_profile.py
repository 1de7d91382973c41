"""What one drafter proposal costs on this machine, with and without the draft vocabulary
(docs/PERFORMANCE.md, "Drafter cost").

For block sizes 1..B, the median wall time of `DraftEngine.propose` (one greedy request, 256
context positions cached), and its parts: the backbone (`block_hidden`), the base logits over the
block, and the sequential head. The context features are random: the cost does not depend on them.

    OMP_NUM_THREADS=1 python -m bench.drafter_profile --out docs/perf/drafter_profile.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.report_json import emit
from drafter_svc.draft_engine import DraftEngine
from drafter_svc.loading import load_drafter
from dspark_common.types import DraftRequest, SamplingParams
from verifier_svc.target_loading import load_target


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, first-call dispatch)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 2)


def profile(engine: DraftEngine, context: int, repeats: int) -> dict[str, dict[int, float]]:
    cfg = engine.config
    g = torch.Generator().manual_seed(0)
    engine.open("p")
    engine.append_context("p", torch.randn(context, cfg.context_feature_size, generator=g), 0)
    out: dict[str, dict[int, float]] = {"propose": {}}
    anchor = 1  # any valid id: the cost does not depend on it
    for n in range(1, cfg.block_size + 1):
        req = DraftRequest("p", anchor, context, n, SamplingParams(), None)
        out["propose"][n] = _median_ms(lambda: engine.propose([req]), repeats)
    # The parts, at the full block.
    model, heads = engine._model, engine._heads
    kv = engine._sessions["p"].kv[:, :, :, :context]
    args = ([kv[i, 0][None] for i in range(cfg.num_hidden_layers)], [kv[i, 1][None] for i in range(cfg.num_hidden_layers)],
            torch.tensor([context]), torch.tensor([anchor]), torch.tensor([context]))
    with torch.inference_mode():
        h = model.block_hidden(*args)
        z, _ = model.markov_features(torch.tensor([anchor]), h[:, 0], None)
        out["parts_at_full_block"] = {
            "backbone": _median_ms(lambda: model.block_hidden(*args), repeats),
            "base_logits": _median_ms(lambda: heads.logits(h), repeats),
            "markov_bias_per_slot": _median_ms(lambda: heads.markov_bias(z), repeats) if z is not None else 0.0,
        }
    engine.release("p")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--drafter", default="default")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    target = load_target(a.model)
    drafter, name = load_drafter(a.drafter, target.model, small_batch_kernel=True)
    result: dict = {"drafter": name, "cpu_count": os.cpu_count(), "load": os.getloadavg()[0], "context": a.context}
    for label, use in (("full_vocab", False), ("draft_vocab", True)):
        if use and drafter.draft_vocab is None:
            continue
        engine = DraftEngine(drafter, drafter.config, use_draft_vocab=use)
        result[label] = {"vocab": engine.vocab_size, **profile(engine, a.context, a.repeats)}
    emit(result, a.out)


if __name__ == "__main__":
    main()
