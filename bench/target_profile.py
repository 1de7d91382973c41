"""Profile the target on this machine (issue 2's "Measure"): target-only decode tokens/s, the
verify cost curve T(k)/T(1) for k new tokens on a cached prefix, and model load time cold
(GGUF dequantization) and warm (cached safetensors).

    python -m bench.target_profile --out docs/perf/target_profile.json [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from bench.report_json import emit
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.sps_profile import forward_times
from verifier_svc.target_engine import TargetEngine
from verifier_svc.target_loading import chat_prompt_ids, load_target, stop_token_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--cold", action="store_true", help="also time a cold load (GGUF conversion) in a temp cache")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {"model": a.model, "threads": a.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if a.cold:
        tmp = tempfile.mkdtemp()
        os.environ["DSPARK_CACHE_DIR"] = tmp
        result["load_seconds_cold"] = round(load_target(a.model).load_seconds, 2)
        shutil.rmtree(tmp)
        os.environ.pop("DSPARK_CACHE_DIR")
    loads = [load_target(a.model).load_seconds for _ in range(3)]
    result["load_seconds_cached"] = round(statistics.median(loads), 3)
    target = load_target(a.model)
    engine = TargetEngine(target.model)
    times = forward_times(engine, [1, 2, 4, 8, 16], prefix=128, repeats=a.repeats)
    result["forward_ms"] = {k: round(v * 1e3, 2) for k, v in times.items()}
    result["verify_cost_ratio"] = {k: round(v / times[1], 3) for k, v in times.items()}
    prompt = chat_prompt_ids(target.tokenizer, "Explain how a hash map works, step by step.")
    loop = DecodeLoop(engine)
    rates = []
    for _ in range(3):
        r = loop.generate(GenerationRequest(prompt, a.new_tokens, draft_length=0))
        rates.append(len(r.token_ids) / r.seconds)
    result["target_only_tokens_per_s_median"] = round(statistics.median(rates), 2)
    emit(result, a.out)


if __name__ == "__main__":
    main()
