"""Draft-length control: per session, pick the number of draft tokens per round k that maximises
expected tokens per unit of time, from the acceptance observed so far and the verifier's cost
profile.

    E[tokens | k] = 1 + Σ_{j=1..k} Π_{i=1..j} α_i          (the +1 is the correction/bonus token)
    time(k)       = T(k+1) / T(1) + [k > 0] · (draft_cost + draft_cost_per_token · k)
    k*            = argmax_{0 ≤ k ≤ k_max} E[tokens | k] / time(k)

α_i is the position-wise conditional acceptance P(position i accepted | positions < i accepted).
Each position starts at a prior (`prior`) worth `prior_weight` observations; an observation moves
it by weight 1 / count, with count capped at 1 / smoothing: the posterior mean at first, an
exponential moving average later, so a session whose drafter drifts is followed. A round that
verified s drafts and accepted a of them observes positions 1..min(s, a + 1): accepted for i ≤ a,
rejected at a + 1. Positions a round did not observe forget: their count decays toward the prior
weight by `forget` per round, so the next observation of a stale position counts more. A session
that turned speculation off (k = 0) observes nothing, so every `probe_every` rounds it drafts one
token for one round (a probe) and lets that observation decide.

T(b) is the time of one target forward over b tokens: 1 / SPS(b) from the verifier's profiled
steps-per-second table when known (`--sps-table`, or the table VerifierStats publishes), else the
linear model T(b) = 1 + verify_cost_per_token · (b - 1). draft_cost is the configured constant
until the verifier publishes the round overhead it measured (VerifierStats.round_overhead_s:
drafting and messages, from its first drafted rounds); then that figure, relative to T(1).
Pure functions over plain numbers: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dspark_common.types import MAX_DRAFT_LENGTH


@dataclass(frozen=True)
class ControllerConfig:
    prior: float = 0.6
    prior_weight: float = 2.0
    smoothing: float = 0.05
    forget: float = 0.05
    probe_every: int = 32
    max_draft_length: int = MAX_DRAFT_LENGTH
    draft_cost: float = 0.1
    draft_cost_per_token: float = 0.01
    hysteresis: float = 0.01  # switch only when the new k is better by this fraction of throughput


class CostModel:
    """Relative time of a target forward over b tokens, T(b) / T(1), and, when the verifier has
    measured it, what a drafted round costs besides the forward (`round_overhead`, same unit),
    which then replaces the configured `draft_cost`."""

    def __init__(self, forward_time: Callable[[int], float], round_overhead: float | None = None) -> None:
        self._t = forward_time
        self._t1 = forward_time(1)
        self.round_overhead = round_overhead

    @classmethod
    def linear(cls, per_token: float) -> "CostModel":
        return cls(lambda b: 1.0 + per_token * (b - 1))

    @classmethod
    def from_sps(cls, points: Mapping[int, float], round_overhead_s: float = 0.0) -> "CostModel":
        """`round_overhead_s` in seconds (0: unknown); stored relative to one forward, T(1) = 1/SPS(1)."""
        from verifier_svc.scheduler import SpsTable

        table = SpsTable(points)
        overhead = round_overhead_s * table(1) if round_overhead_s > 0 else None
        return cls(lambda b: 1.0 / table(b), overhead)

    def __call__(self, tokens: int) -> float:
        return self._t(tokens) / self._t1


def parse_sps_table(text: str) -> dict[int, float]:
    """'1:100,4:95,9:85' -> {1: 100.0, 4: 95.0, 9: 85.0}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, _, s = part.partition(":")
        out[int(b)] = float(s)
    return out


def expected_tokens(alpha: Sequence[float], k: int) -> float:
    total, survival = 1.0, 1.0
    for a in alpha[:k]:
        survival *= a
        total += survival
    return total


@dataclass
class DraftLengthController:
    """One session's acceptance estimates and chosen draft length."""

    config: ControllerConfig
    cost: CostModel
    alpha: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    block_cap: int | None = None  # the drafter's block, once a round shows it is smaller than asked
    length: int = -1
    idle_rounds: int = 0  # rounds at k = 0 since the last probe

    def __post_init__(self) -> None:
        n = MAX_DRAFT_LENGTH
        self.alpha = (list(self.alpha) + [self.config.prior] * n)[:n]
        self.counts = (list(self.counts) + [self.config.prior_weight] * n)[:n]
        if self.length < 0:
            self.length = self.best()

    @property
    def k_max(self) -> int:
        cap = self.config.max_draft_length
        return min(cap, self.block_cap) if self.block_cap else cap

    def round_time(self, k: int) -> float:
        c = self.config
        if k == 0:
            return self.cost(1)
        fixed = self.cost.round_overhead if self.cost.round_overhead is not None else c.draft_cost
        return self.cost(k + 1) + fixed + c.draft_cost_per_token * k

    def throughput(self, k: int) -> float:
        return expected_tokens(self.alpha, k) / self.round_time(k)

    def best(self) -> int:
        return max(range(self.k_max + 1), key=lambda k: (self.throughput(k), -k))

    def observe(self, *, scheduled: int, accepted: int) -> int | None:
        """Record one verification round; return the new draft length when it changed."""
        c = self.config
        cap = 1.0 / c.smoothing
        seen = min(scheduled, accepted + 1)
        for i in range(MAX_DRAFT_LENGTH):
            if i < seen:
                self.counts[i] = min(self.counts[i] + 1, cap)
                self.alpha[i] += ((1.0 if i < accepted else 0.0) - self.alpha[i]) / self.counts[i]
            else:
                self.counts[i] -= c.forget * (self.counts[i] - c.prior_weight)
        if self.length == 0:
            self.idle_rounds += 1
            if c.probe_every and self.idle_rounds >= c.probe_every and self.k_max > 0:
                self.idle_rounds = 0
                self.length = 1
                return 1
        return self._choose()

    def note_block(self, asked: int, proposed: int, remaining: int) -> None:
        """The drafter offered fewer tokens than asked although more were wanted: its block size."""
        if 0 < proposed < asked and remaining > asked:
            self.block_cap = proposed

    def _choose(self) -> int | None:
        best = self.best()
        if best == self.length:
            return None
        if self.length <= self.k_max and (
                self.throughput(best) < self.throughput(self.length) * (1.0 + self.config.hysteresis)):
            return None
        self.length = best
        return best

    def state(self) -> dict:
        return {"alpha": [round(a, 6) for a in self.alpha], "counts": [round(n, 3) for n in self.counts],
                "block_cap": self.block_cap, "length": self.length}

    @classmethod
    def from_state(cls, config: ControllerConfig, cost: CostModel, state: dict | None) -> "DraftLengthController":
        if not state:
            return cls(config, cost)
        ctl = cls(config, cost, list(state.get("alpha", [])), list(state.get("counts", [])), state.get("block_cap"))
        if isinstance(state.get("length"), int) and 0 <= state["length"] <= ctl.k_max:
            ctl.length = state["length"]
        return ctl
