"""The benchmark's arithmetic, as pure functions over plain numbers and dicts: percentiles, τ,
position-wise conditional acceptance, per-request timing figures, per-run summaries and speedup.
No I/O, no clocks; the harness and the baselines feed it what they measured.

Definitions (docs/PERFORMANCE.md and the architecture's "Performance vocabulary"):

- τ (mean accepted length): tokens produced per verification round, bonus token included,
  summed over requests before dividing (Σ generated / Σ rounds). Draft length 0 gives exactly 1.
- Conditional acceptance at position k: P(position k accepted | positions < k accepted),
  estimated from the summed `accepted_by_position` A and `proposed_by_position` P as
  A[k] / min(P[k], A[k-1]) (A[-1] := P[0]). A round accepts a prefix, so A[k-1] counts the rounds
  whose first k drafts were all accepted; min(P[k], ·) drops those that did not verify a (k+1)-th.
  Exact when each round verifies the same number of drafts; otherwise (the confidence scheduler
  cuts blocks, the last round is capped) the denominator can overcount, so it is a lower bound.
- TTFT: request sent → first streamed chunk with text.
- ITL (inter-token latency): the gaps between successive streamed chunks with text after the
  first. The router streams one chunk per verification round, so with speculation one gap
  delivers τ tokens on average; TPOT (decode seconds / decoded tokens) is the per-token mean.
- Per-user decode tokens/s of a request: (completion tokens − 1) / (end − first token), i.e. the
  tokens after the first over the time after the first; the run's figure is the median over
  requests.
- Aggregate tokens/s: Σ completion tokens / wall time of the run (first request sent → last done).
- Speedup: a run's median per-user decode tokens/s ÷ that of its reference run (draft length 0 of
  the same source, dataset, temperature, concurrency and token budget, from the same benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

PERCENTILES = (50, 95, 99)


# ---------------------------------------------------------------------------- statistics


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default, Hyndman-Fan type 7); None for no values."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


def mean(values: Iterable[float]) -> float | None:
    xs = [float(v) for v in values]
    return sum(xs) / len(xs) if xs else None


def distribution(values: Iterable[float]) -> dict:
    """{n, mean, p50, p95, p99} of some samples (None entries when there are none)."""
    xs = [float(v) for v in values if v is not None]
    out: dict = {"n": len(xs), "mean": mean(xs)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# ---------------------------------------------------------------------------- speculation


def add_vectors(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Element-wise sum of two count vectors of possibly different lengths."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def generated_in_rounds(spec: dict) -> int:
    """Tokens the verification rounds of one generation produced: `mean_accepted_length` is
    generated / rounds, so the product gives it back (rounded: the API rounds to 4 decimals)."""
    return int(round(float(spec.get("mean_accepted_length", 0.0)) * int(spec.get("rounds", 0))))


def sum_speculative(specs: Iterable[dict]) -> dict:
    """Sum the `speculative` objects of several generations (the router's response field, or
    `SpeculativeStats.to_dict()`)."""
    tot = {"rounds": 0, "draft_tokens": 0, "accepted_draft_tokens": 0, "generated_tokens": 0,
           "fallback_rounds": 0, "lookup_rounds": 0, "accepted_by_position": [], "proposed_by_position": []}
    for s in specs:
        if not s:
            continue
        tot["rounds"] += int(s.get("rounds", 0))
        tot["draft_tokens"] += int(s.get("draft_tokens", 0))
        tot["accepted_draft_tokens"] += int(s.get("accepted_draft_tokens", 0))
        tot["generated_tokens"] += generated_in_rounds(s)
        tot["fallback_rounds"] += int(s.get("fallback_rounds", 0) or 0)
        tot["lookup_rounds"] += int(s.get("lookup_rounds", 0) or 0)
        tot["accepted_by_position"] = add_vectors(tot["accepted_by_position"], s.get("accepted_by_position") or [])
        tot["proposed_by_position"] = add_vectors(tot["proposed_by_position"], s.get("proposed_by_position") or [])
    return tot


def tau(generated_tokens: int, rounds: int) -> float | None:
    """Mean accepted length: tokens per verification round, bonus token included."""
    return ratio(generated_tokens, rounds)


def conditional_acceptance(accepted_by_position: Sequence[int], proposed_by_position: Sequence[int]) -> list[float | None]:
    """P(position k accepted | positions < k accepted) for each position a draft was verified at
    (see the module docstring for the estimator); None where no round reached the position."""
    out: list[float | None] = []
    for k, proposed in enumerate(proposed_by_position):
        accepted = accepted_by_position[k] if k < len(accepted_by_position) else 0
        if k == 0:
            reached = proposed
        else:
            prev = accepted_by_position[k - 1] if k - 1 < len(accepted_by_position) else 0
            reached = min(proposed, prev)
        out.append(accepted / reached if reached else None)
    return out


# ---------------------------------------------------------------------------- one request


def request_figures(*, sent: float, content_times: Sequence[float], end: float, completion_tokens: int) -> dict:
    """Timing figures of one streamed request, from its clock readings (seconds): when it was
    sent, when each chunk with text arrived, and when the final chunk arrived."""
    first = content_times[0] if content_times else end
    decoded = completion_tokens - 1
    decode_s = end - first
    gaps = [(b - a) * 1e3 for a, b in zip(content_times, content_times[1:])]
    return {
        "ttft_ms": (first - sent) * 1e3,
        "latency_s": end - sent,
        "decode_s": decode_s,
        "decode_tokens_per_s": decoded / decode_s if decoded > 0 and decode_s > 0 else None,
        "tpot_ms": decode_s * 1e3 / decoded if decoded > 0 else None,
        "itl_ms": gaps,
    }


# ---------------------------------------------------------------------------- one run


def run_figures(requests: Sequence[dict], wall_s: float) -> dict:
    """The figures of one configuration from its request records (each with the keys of
    `request_figures` plus `ok`, `completion_tokens`, `prompt_tokens` and `speculative`)."""
    ok = [r for r in requests if r.get("ok")]
    spec = sum_speculative(r.get("speculative") or {} for r in ok)
    completion = sum(int(r["completion_tokens"]) for r in ok)
    cond = conditional_acceptance(spec["accepted_by_position"], spec["proposed_by_position"])
    rates = [r["decode_tokens_per_s"] for r in ok if r.get("decode_tokens_per_s") is not None]
    return {
        "requests": len(requests),
        "errors": len(requests) - len(ok),
        "prompt_tokens": sum(int(r.get("prompt_tokens") or 0) for r in ok),
        "completion_tokens": completion,
        "rounds": spec["rounds"],
        "draft_tokens": spec["draft_tokens"],
        "accepted_draft_tokens": spec["accepted_draft_tokens"],
        "generated_in_rounds": spec["generated_tokens"],
        "fallback_rounds": spec["fallback_rounds"],
        "lookup_rounds": spec["lookup_rounds"],
        "tau": tau(spec["generated_tokens"], spec["rounds"]),
        "draft_acceptance_rate": ratio(spec["accepted_draft_tokens"], spec["draft_tokens"]),
        "accepted_by_position": spec["accepted_by_position"],
        "proposed_by_position": spec["proposed_by_position"],
        "acceptance_by_position": cond,
        "decode_tokens_per_s": median(rates),
        "decode_tokens_per_s_mean": mean(rates),
        "ttft_ms": distribution(r["ttft_ms"] for r in ok),
        "itl_ms": distribution(g for r in ok for g in r.get("itl_ms", [])),
        "tpot_ms": distribution(r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None),
        "wall_s": wall_s,
        "aggregate_tokens_per_s": ratio(completion, wall_s),
    }


def speedup(value: float | None, reference: float | None) -> float | None:
    """Per-user decode tokens/s of a run ÷ that of its draft-length-0 reference."""
    return ratio(value, reference)


def group_key(run: dict) -> tuple:
    """Runs that share a reference: same source family, dataset, temperature, concurrency, budget."""
    return (run.get("family", run.get("source")), run["dataset"], float(run["temperature"]),
            int(run["concurrency"]), int(run["max_new_tokens"]))


def add_speedups(runs: list[dict]) -> None:
    """Set `metrics.speedup` (and `reference`) of every run from the reference run of its group
    (the one marked `reference: true`); None when the group has none."""
    refs = {group_key(r): r for r in runs if r.get("reference")}
    for r in runs:
        ref = refs.get(group_key(r))
        r["reference_run"] = ref["name"] if ref is not None else None
        r["metrics"]["speedup"] = (speedup(r["metrics"]["decode_tokens_per_s"], ref["metrics"]["decode_tokens_per_s"])
                                   if ref is not None else None)
        r["metrics"]["paired_speedup"] = paired_speedup(r, ref) if ref is not None else None


def paired_speedup(run: dict, ref: dict) -> float | None:
    """Median over prompts of a prompt's decode tokens/s ÷ the reference's on the same prompt.
    Pairing cancels what the prompts differ in (length, how well they draft); with interleaved
    runs the pair also ran minutes apart at most, so it shares the machine's state."""
    want = {q["prompt_index"]: q.get("decode_tokens_per_s") for q in ref.get("requests", []) if q.get("ok")}
    ratios = [ratio(q.get("decode_tokens_per_s"), want.get(q["prompt_index"]))
              for q in run.get("requests", []) if q.get("ok")]
    return median([x for x in ratios if x is not None])


def identical_outputs(runs: list[dict]) -> None:
    """Under greedy decoding the output must not depend on the draft length: set
    `metrics.identical_to_reference` to the fraction of requests whose text digest equals the
    reference run's for the same prompt (None for sampled runs or runs without a reference)."""
    by_name = {r["name"]: r for r in runs}
    for r in runs:
        ref = by_name.get(r.get("reference_run") or "")
        if ref is None or float(r["temperature"]) > 0:
            r["metrics"]["identical_to_reference"] = None
            continue
        want = {q["prompt_index"]: q.get("text_sha1") for q in ref["requests"] if q.get("ok")}
        pairs = [(q.get("text_sha1"), want.get(q["prompt_index"])) for q in r["requests"] if q.get("ok")]
        pairs = [(a, b) for a, b in pairs if b is not None]
        r["metrics"]["identical_to_reference"] = (sum(a == b for a, b in pairs) / len(pairs)) if pairs else None
