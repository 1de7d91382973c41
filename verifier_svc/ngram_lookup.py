"""Drafts copied from the sequence itself: when the last n tokens (n = max_n .. min_n) occurred
earlier in the prompt or the output, propose the tokens that followed their latest occurrence
(prompt lookup decoding, Saxena 2023; vLLM's n-gram proposer).

Why beside a trained drafter: answers repeat their prompt and themselves — numbers restated in a
maths answer, identifiers and signatures in code — and on those spans a copy is right for many
tokens in a row, where a small drafter's acceptance decays by position. Measured by replaying the
target's greedy rounds (docs/PERFORMANCE.md, "Drafting from the sequence"), taking the copy when a
2..3-gram matches and the DSpark block otherwise raises τ well above either alone. A copy also
costs no drafter call: the drafter's context is brought up to date on the next round that needs it
(the remote client ships every position appended since its last call).

Lossless like any other proposal: a copied token is a draft whose q is a point mass, so greedy
verification commits the target's argmax as always and sampled verification accepts it with
probability p(x) and otherwise samples the residual, p without x (verifier_svc/acceptance.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_common.types import Proposal


@dataclass(frozen=True)
class LookupConfig:
    """min_n..max_n: suffix lengths tried, longest first. `confidence`: the conditional acceptance
    by position that the "auto" scheduler assumes for a copy (the last value holds for every later
    position). A copy carries no score of its own; the defaults are what 2..3-gram copies reached
    on the target's greedy answers to 40 training prompts (20 gsm8k, 20 livecodebench; eval sets
    untouched), where a copy's first token is right ~63 % of the time and later ones ~80 %."""

    min_n: int = 2
    max_n: int = 3
    confidence: tuple[float, ...] = (0.63, 0.70, 0.77, 0.79, 0.80, 0.81)

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram lookup needs 1 <= min_n <= max_n, got {self.min_n}..{self.max_n}")
        if not self.confidence or not all(0.0 < c < 1.0 for c in self.confidence):
            raise ValueError(f"lookup confidences must lie in (0, 1), got {self.confidence}")

    def confidences(self, n: int) -> torch.Tensor:
        c = list(self.confidence[:n]) + [self.confidence[-1]] * max(0, n - len(self.confidence))
        return torch.tensor(c, dtype=torch.float32)


class NgramIndex:
    """The latest occurrence of every n-gram of one sequence, kept up to date as it grows.

    `_latest[gram]` is the end (exclusive) of the latest occurrence whose continuation is known,
    i.e. that ends before the sequence's last token; the suffix itself is therefore never its own
    match. Indexing is incremental, O(max_n) per token, so a lookup costs O(max_n) whatever the
    length of the context."""

    def __init__(self, config: LookupConfig, tokens: list[int] | None = None) -> None:
        self.config = config
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # ends e < _indexed are in _latest
        if tokens:
            self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def _catch_up(self) -> None:
        toks, last = self.tokens, len(self.tokens) - 1  # an end e needs tokens[e] as continuation: e <= last
        lo, hi = self.config.min_n, self.config.max_n
        for e in range(max(self._indexed, lo), last + 1):
            for n in range(lo, min(hi, e) + 1):
                self._latest[tuple(toks[e - n : e])] = e
        self._indexed = max(self._indexed, last + 1)

    def lookup(self, max_tokens: int) -> tuple[list[int], int]:
        """(the continuation of the longest matching suffix, capped at max_tokens; its n), or ([], 0)."""
        if max_tokens <= 0:
            return [], 0
        self._catch_up()
        toks, size = self.tokens, len(self.tokens)
        for n in range(min(self.config.max_n, size - 1), self.config.min_n - 1, -1):
            e = self._latest.get(tuple(toks[size - n :]))
            if e is not None:
                return toks[e : e + max_tokens], n
        return [], 0

    def proposal(self, max_tokens: int) -> Proposal | None:
        """The copy as a proposal (point-mass q, the configured confidence), or None."""
        cont, _ = self.lookup(max_tokens)
        if not cont:
            return None
        ids = torch.tensor(cont, dtype=torch.long)
        return Proposal(ids, ids[:, None].clone(), torch.ones(len(cont), 1),
                        self.config.confidences(len(cont)), source="lookup")
