"""Verification-length scheduling: how many draft tokens of each request the target verifies.

Owns the paper's hardware-aware prefix scheduler (DSpark, Algorithm 1), the profiled cost table it
reads (`SpsTable`: target steps/s as a function of tokens per forward), and the two simple rules it
is compared with (a fixed length; DeepSpec's per-slot confidence threshold).

Losslessness: the confidence of slot j+1 depends on the sampled draft token x_j (the confidence head
reads the Markov embedding of the previous token). A rule that looks at c_{j+1} before deciding to
admit x_j therefore selects on x_j itself and biases the output (paper, Appendix A). Algorithm 1's
early stop makes each admission depend only on confidences up to that token's own slot, which is
why it is on by default; `early_stop=False` exists only to demonstrate the bias in tests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence

import torch


class SpsTable:
    """Profiled target throughput: steps per second at a forward of `btok` tokens.

    Linear interpolation between measured points; below the smallest point the first value (a
    forward never gets faster than the smallest one measured); beyond the largest, time grows in
    proportion to tokens, so SPS(b) = SPS(b_last) · b_last / b."""

    def __init__(self, points: Mapping[int, float]) -> None:
        if not points:
            raise ValueError("an SPS table needs at least one measured point")
        items = sorted((int(b), float(s)) for b, s in points.items())
        for b, s in items:
            if b < 1 or not math.isfinite(s) or s <= 0:
                raise ValueError(f"SPS points must map batch tokens >= 1 to steps/s > 0, got {b}: {s}")
        self._btoks = [b for b, _ in items]
        self._sps = [s for _, s in items]

    def __call__(self, btok: int) -> float:
        bs, ss = self._btoks, self._sps
        if btok <= bs[0]:
            return ss[0]
        if btok >= bs[-1]:
            return ss[-1] * bs[-1] / btok
        i = bisect.bisect_right(bs, btok)  # bs[i-1] <= btok < bs[i]
        frac = (btok - bs[i - 1]) / (bs[i] - bs[i - 1])
        return ss[i - 1] + frac * (ss[i] - ss[i - 1])

    def to_dict(self) -> dict[int, float]:
        """{batch_tokens: steps_per_second}; json.dumps turns the keys into strings, from_dict
        accepts either."""
        return dict(zip(self._btoks, self._sps))

    @classmethod
    def from_dict(cls, d: Mapping[int | str, float]) -> "SpsTable":
        return cls({int(b): float(s) for b, s in d.items()})

    def __repr__(self) -> str:
        return f"SpsTable({self.to_dict()!r})"


def schedule_prefix(
    confidences: Sequence[torch.Tensor], sps: Callable[[int], float], *, early_stop: bool = True,
    round_overhead_s: float = 0.0,
) -> list[int]:
    """Algorithm 1: per-request verified draft lengths ℓ_r ∈ 0..γ_r maximising expected tokens/s.

    confidences[r] holds c_{r,1..γ_r} (P(slot accepted | earlier slots accepted)); sps(btok) is the
    target's steps/s for a forward of btok tokens. Every request always verifies its anchor.

    `round_overhead_s`: what a round costs besides the target forward (drafting, messages). The
    paper's rule scores 1/SPS alone, which is right when the drafter is nearly free next to the
    target; where it is not (a 135M target on a CPU: ~10 of ~40 ms), scoring the forward alone
    overstates what one more verified token costs and cuts blocks too early."""
    if not (round_overhead_s >= 0.0 and math.isfinite(round_overhead_s)):
        raise ValueError(f"round_overhead_s must be a finite number >= 0, got {round_overhead_s}")
    num_requests = len(confidences)
    # Candidates (r, j) with prefix survival a_{r,j} = Π_{i≤j} c_{r,i} > 0, j 1-based. Python floats:
    # float64 products, and the same numbers on every platform.
    candidates: list[tuple[float, int, int]] = []
    for r, conf in enumerate(confidences):
        survival = 1.0
        for j, c in enumerate(_as_confidences(conf, r), start=1):
            survival *= c  # c ≤ 1 keeps a_{r,j} ≤ a_{r,j-1} even after rounding
            if survival <= 0.0:
                break  # every later a_{r,j} is 0 too
            candidates.append((survival, r, j))
    # Descending a; ties by (r, j) so the order is deterministic and, within a request, a prefix.
    candidates.sort(key=lambda cand: (-cand[0], cand[1], cand[2]))

    lengths = [0] * num_requests
    best = list(lengths)
    btok = num_requests  # the anchors
    expected = float(num_requests)  # each anchor yields one token (correction or bonus)

    def throughput(expected_tokens: float, batch_tokens: int) -> float:
        return expected_tokens / (1.0 / sps(batch_tokens) + round_overhead_s)

    best_throughput = throughput(expected, btok) if num_requests else 0.0
    for survival, r, j in candidates:
        lengths[r] = j
        btok += 1
        expected += survival
        tps = throughput(expected, btok)
        if tps > best_throughput:
            best_throughput = tps
            best = list(lengths)
        elif early_stop:
            # Stop before looking at any later candidate: whether x_{r,j} is verified must not
            # depend on c_{r,j+1}, which depends on x_{r,j} (paper, Appendix A).
            break
    return best


def schedule_fixed(lengths: Sequence[int], k: int) -> list[int]:
    """Verify min(γ_r, k) draft tokens of every request."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return [min(int(n), k) for n in lengths]


def schedule_threshold(confidences: Sequence[torch.Tensor], threshold: float) -> list[int]:
    """DeepSpec's rule: cut each request at its first slot whose own confidence (not the cumulative
    product) is below `threshold`. Threshold 0 keeps every block whole."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    out = []
    for r, conf in enumerate(confidences):
        values = _as_confidences(conf, r)
        out.append(next((j for j, c in enumerate(values) if c < threshold), len(values)))
    return out


def _as_confidences(conf: torch.Tensor, r: int) -> list[float]:
    values = conf.reshape(-1).tolist()
    for c in values:
        if not 0.0 <= c <= 1.0:  # also rejects NaN
            raise ValueError(f"confidences of request {r} must lie in [0, 1], got {c}")
    return values
