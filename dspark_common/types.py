"""Domain types exchanged between the drafter, the verifier and the router.

Plain dataclasses: they know nothing of protobuf or HTTP (the servicers convert)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dspark_common.errors import InvalidRequest

MAX_DRAFT_LENGTH = 16


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next-token distribution is processed. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> "SamplingParams":
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0, got {self.top_k!r}", "top_k")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}", "seed")
        return self

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def validate_draft_length(draft_length: int | str) -> int | str:
    """A draft length is an int in 0..16 or the string "auto"."""
    if draft_length == "auto":
        return draft_length
    if not isinstance(draft_length, int) or isinstance(draft_length, bool) or not 0 <= draft_length <= MAX_DRAFT_LENGTH:
        raise InvalidRequest(
            f"draft_length must be an integer in 0..{MAX_DRAFT_LENGTH} or \"auto\", got {draft_length!r}", "draft_length"
        )
    return draft_length


@dataclass
class DraftRequest:
    """Ask the drafter for one block after `anchor_token`, which sits at absolute `anchor_pos`.

    The drafter's context for the session must cover exactly positions [0, anchor_pos)."""

    session_id: str
    anchor_token: int
    anchor_pos: int
    block_size: int
    sampling: SamplingParams
    generator: torch.Generator | None = None


@dataclass
class Proposal:
    """A drafted block: tokens, the exact sparse draft distribution q each was sampled from,
    and the confidence (P(accepted | previous accepted)) of each position."""

    tokens: torch.Tensor  # [n] int64
    q_ids: torch.Tensor  # [n, K] int64
    q_probs: torch.Tensor  # [n, K] float32, rows sum to 1
    confidences: torch.Tensor  # [n] float32 in [0, 1]
    source: str = "drafter"  # "drafter" or "lookup" (verifier_svc/ngram_lookup.py)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def truncate(self, n: int) -> "Proposal":
        return Proposal(self.tokens[:n], self.q_ids[:n], self.q_probs[:n], self.confidences[:n], self.source)


@dataclass
class RoundStats:
    """What one verification round did."""

    proposed: int  # draft tokens the drafter offered
    scheduled: int  # draft tokens sent to the target
    accepted: int  # draft tokens accepted
    tokens: list[int]  # tokens committed this round (accepted drafts + correction/bonus)
    confidences: list[float] = field(default_factory=list)
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    fallback: str = ""  # non-empty when the round ran target-only because the drafter failed
    source: str = ""  # who drafted the block: "drafter", "lookup" (copied from the sequence), "" = nobody


@dataclass
class SpeculativeStats:
    """Running totals over a generation, in the shape the public APIs report."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    generated_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_LENGTH)
    proposed_by_position: list[int] = field(default_factory=lambda: [0] * MAX_DRAFT_LENGTH)
    fallback_rounds: int = 0
    lookup_rounds: int = 0

    def add(self, r: RoundStats, generated: int) -> None:
        self.rounds += 1
        self.draft_tokens += r.scheduled
        self.accepted_draft_tokens += r.accepted
        self.generated_tokens += generated
        for i in range(r.scheduled):
            self.proposed_by_position[i] += 1
        for i in range(r.accepted):
            self.accepted_by_position[i] += 1
        if r.fallback:
            self.fallback_rounds += 1
        if r.source == "lookup":
            self.lookup_rounds += 1

    @property
    def mean_accepted_length(self) -> float:
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict:
        n = max((i + 1 for i, c in enumerate(self.proposed_by_position) if c), default=0)
        return {
            "rounds": self.rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "accepted_by_position": self.accepted_by_position[:n],
            "proposed_by_position": self.proposed_by_position[:n],
            "fallback_rounds": self.fallback_rounds,
            "lookup_rounds": self.lookup_rounds,
        }
