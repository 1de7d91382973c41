"""What the small-batch linear kernel buys on this machine (docs/PERFORMANCE.md, "CPU kernel").

Two measurements, each BLAS (F.linear) against the kernel, medians of `--repeats`:
1. all of the target's linear layers (weights streamed from memory, as in a decode step) applied
   to k rows, k = 1..16;
2. the target forward T(k) of k new tokens on a 256-token cached context (what a decode step, k=1,
   and a verify block, k = draft length + 1, cost), through TargetEngine;
3. the largest logit difference between 8 tokens verified as a block and one at a time.

    OMP_NUM_THREADS=1 python -m bench.kernel_profile --out docs/perf/kernel_profile.json --plot docs/img/kernel_profile.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report_json import emit
from dspark_common import small_batch_linear as sbl
from verifier_svc.sps_profile import forward_times
from verifier_svc.target_engine import TargetEngine
from verifier_svc.target_loading import load_target


def linear_times(model, rows: list[int], repeats: int) -> dict[str, dict[int, float]]:
    weights = [m.weight for m in model.modules() if type(m) is torch.nn.Linear]
    out: dict[str, dict[int, float]] = {"blas": {}, "kernel": {}}
    with torch.inference_mode():
        for k in rows:
            x = {w.shape[1]: torch.randn(k, w.shape[1]) for w in weights}
            for name, fn in (("blas", F.linear), ("kernel", sbl.linear)):
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for w in weights:
                        fn(x[w.shape[1]], w)
                    ts.append(time.perf_counter() - t0)
                out[name][k] = statistics.median(ts)
    return out


def block_vs_one_by_one(model, context: int = 90, k: int = 8) -> float:
    """Largest |logit| difference between k tokens verified as one block and one at a time."""
    ids = list(range(2000, 2000 + context + k))
    engine = TargetEngine(model)
    engine.open("block")
    engine.extend("block", ids[:context])
    block = engine.extend("block", ids[context:]).logits
    engine.open("single")
    engine.extend("single", ids[:context])
    single = torch.cat([engine.extend("single", [t]).logits for t in ids[context:]])
    engine.release("block")
    engine.release("single")
    return float((block - single).abs().max())


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    for name in ("blas", "kernel"):
        lin = result["linear_ms"][name]
        a.plot([int(k) for k in lin], list(lin.values()), marker="o", label=name)
        fwd = result["forward_ms"][name]
        b.plot([int(k) for k in fwd], list(fwd.values()), marker="o", label=name)
    a.set_title("all linear layers of the target, k rows", fontsize=9)
    b.set_title("target forward of k new tokens (256 cached)", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("k")
        ax.set_ylabel("ms (median)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    if not sbl.available():
        raise SystemExit("the small-batch kernel is not available on this machine")
    target = load_target(a.model)
    rows = [1, 2, 3, 4, 6, 8, 12, 16]
    result: dict = {"model": a.model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load": os.getloadavg()[0]}
    lin = linear_times(target.model, rows, a.repeats)
    result["linear_ms"] = {n: {k: round(v * 1e3, 2) for k, v in t.items()} for n, t in lin.items()}
    result["forward_ms"] = {}
    result["block_vs_one_by_one"] = {}
    for name in ("blas", "kernel"):
        if name == "kernel":
            sbl.install(target.model)
        result["block_vs_one_by_one"][name] = block_vs_one_by_one(target.model)
        times = forward_times(TargetEngine(target.model), rows, prefix=256, repeats=a.repeats)
        result["forward_ms"][name] = {k: round(v * 1e3, 2) for k, v in times.items()}
    result["forward_ratio_to_k1"] = {n: {k: round(v / t[1], 3) for k, v in t.items()}
                                     for n, t in result["forward_ms"].items()}
    emit(result, a.out)
    if a.plot:
        plot(result, a.plot)


if __name__ == "__main__":
    main()
