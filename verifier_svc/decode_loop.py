"""The in-process speculative decode loop: draft → schedule → verify → accept → rollback →
update the drafter's context, for one or more sessions.

Draft length 0 runs the same verify path with an empty block, so target-only decoding (the
baseline and the fallback) and speculation share every line that decides a token.

A round's block comes from the sequence itself when a suffix n-gram recurs (`lookup`,
verifier_svc/ngram_lookup.py) and from the proposer otherwise; both are verified alike.

`generate`/`generate_many` drive whole generations synchronously. The pieces they use — `start` /
`resume`, `planned_length` / `draft_request`, `schedule`, `verify`, `release` — are public so the
verifier service can drive each session from its own async task, drafting over the network
between two `verify` calls on its target worker thread."""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field

import torch

from dspark_common.errors import FailedPrecondition, InvalidRequest
from dspark_common.sampling import processed_probs, sample
from dspark_common.types import (
    DraftRequest,
    Proposal,
    RoundStats,
    SamplingParams,
    SpeculativeStats,
    validate_draft_length,
)
from verifier_svc.acceptance import accept_block
from verifier_svc.ngram_lookup import LookupConfig, NgramIndex
from verifier_svc.proposer import Proposer
from verifier_svc.scheduler import SpsTable, schedule_prefix
from verifier_svc.target_engine import TargetEngine


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    draft_length: int | str = "auto"  # 0..16 or "auto" (full block + confidence scheduler)
    stop_ids: frozenset[int] = frozenset()

    def validate(self, target: TargetEngine) -> "GenerationRequest":
        target.validate_tokens(self.prompt_ids, "prompt")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}", "max_new_tokens")
        if len(self.prompt_ids) >= target.max_context:
            raise InvalidRequest(
                f"prompt of {len(self.prompt_ids)} tokens does not fit the context window of {target.max_context}",
                "prompt",
            )
        self.sampling.validate()
        validate_draft_length(self.draft_length)
        return self


@dataclass
class DecodeSession:
    session_id: str
    request: GenerationRequest
    generator: torch.Generator
    draft_generator: torch.Generator
    anchor: int = -1  # last committed token, not yet run through the target
    anchor_pos: int = 0
    output: list[int] = field(default_factory=list)
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    draft_length: int | str = "auto"
    finish_reason: str | None = None
    drafting: bool = True  # the proposer holds this session's context
    ngram: NgramIndex | None = None  # prompt + output, for drafts copied from the sequence

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    stats: SpeculativeStats
    rounds: list[RoundStats]
    seconds: float


class DecodeLoop:
    """Runs decode rounds for sessions over a target engine and an optional proposer.

    With `track_context`, the proposer receives every session's context even at draft length 0,
    so a session's draft length can be raised later and a later turn can draft (the services)."""

    def __init__(
        self,
        target: TargetEngine,
        proposer: Proposer | None = None,
        *,
        sps: SpsTable | None = None,
        track_context: bool = False,
        round_overhead_s: float | None = 0.0,
        lookup: LookupConfig | None = None,
    ) -> None:
        """`lookup`: draft from the sequence when a suffix n-gram recurs (None = never).
        `round_overhead_s`: the cost of a round besides the target forward, for the "auto"
        scheduler (see `schedule_prefix`). None learns it: the median over the first
        `OVERHEAD_ROUNDS` drafted rounds of this loop, then frozen, so that after warm-up a seeded
        request schedules (and samples) the same whenever it runs."""
        self.target = target
        self.proposer = proposer
        self.sps = sps or SpsTable({1: 1.0})
        self.track_context = track_context
        self.lookup = lookup
        self._learn_overhead = round_overhead_s is None
        self._overhead_s = round_overhead_s or 0.0
        self._overhead_samples: list[float] = []

    OVERHEAD_ROUNDS = 16

    @property
    def round_overhead_s(self) -> float:
        return self._overhead_s

    def _observe_overhead(self, seconds: float) -> None:
        if not self._learn_overhead or len(self._overhead_samples) >= self.OVERHEAD_ROUNDS:
            return
        self._overhead_samples.append(seconds)
        self._overhead_s = statistics.median(self._overhead_samples)

    # ---- session lifecycle ------------------------------------------------------------
    def start(self, request: GenerationRequest, session_id: str | None = None) -> DecodeSession:
        request.validate(self.target)
        s = self._new_session(request, session_id or uuid.uuid4().hex)
        self.target.open(s.session_id)
        try:
            self._prefill(s, list(request.prompt_ids), 0)
        except BaseException:
            self.release(s)
            raise
        return s

    def resume(self, request: GenerationRequest, session_id: str) -> DecodeSession:
        """A later turn of a session whose target KV is still cached (a kept session after its
        generation ended). `request.prompt_ids` is the full history; it must extend the cached
        tokens, and only the new tokens run through the target. The session drafts again if the
        proposer still holds its context; on failure the session is released."""
        request.validate(self.target)
        cached = self.target.tokens(session_id)
        if len(request.prompt_ids) <= len(cached) or list(request.prompt_ids[: len(cached)]) != cached:
            raise FailedPrecondition(
                f"the history ({len(request.prompt_ids)} tokens) does not extend the {len(cached)} tokens "
                f"cached for session {session_id!r}"
            )
        s = self._new_session(request, session_id)
        try:
            self._prefill(s, list(request.prompt_ids[len(cached) :]), len(cached))
        except BaseException:
            self.release(s)
            raise
        return s

    def _new_session(self, request: GenerationRequest, session_id: str) -> DecodeSession:
        gen = request.sampling.make_generator()
        draft_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        ngram = NgramIndex(self.lookup, list(request.prompt_ids)) if self.lookup is not None else None
        return DecodeSession(session_id, request, gen, draft_gen, draft_length=request.draft_length, ngram=ngram)

    def _prefill(self, s: DecodeSession, tokens: list[int], start: int) -> None:
        """Run `tokens` at positions [start, ...), sample the first token, feed the proposer."""
        sid = s.session_id
        fwd = self.target.extend(sid, tokens)
        first = sample(processed_probs(fwd.logits[-1], s.request.sampling), s.generator)
        s.drafting = self.proposer is not None and (s.request.draft_length != 0 or self.track_context)
        if s.drafting:
            if start == 0:
                self.proposer.open(sid)
            elif not self._proposer_holds(sid, start):
                s.drafting = False
        if s.drafting:
            self.proposer.append_context(sid, fwd.features, start)
        s.anchor, s.anchor_pos = first, start + len(tokens)
        self._commit(s, [first])

    def _proposer_holds(self, session_id: str, length: int) -> bool:
        try:
            return self.proposer.context_length(session_id) == length
        except KeyError:  # NotFound: the proposer released or never had the session
            return False

    def release(self, s: DecodeSession | str) -> None:
        """Free a session (or a session id) on the target and the proposer; idempotent."""
        sid = s if isinstance(s, str) else s.session_id
        self.target.release(sid)
        if self.proposer is not None:
            self.proposer.release(sid)

    def _commit(self, s: DecodeSession, tokens: list[int]) -> None:
        self._commit_tokens(s, tokens)
        if not s.done and s.anchor_pos >= self.target.max_context:
            s.finish_reason = "length"  # the window is full: the anchor cannot be run anymore

    @staticmethod
    def _commit_tokens(s: DecodeSession, tokens: list[int]) -> None:
        for t in tokens:
            s.output.append(t)
            if t in s.request.stop_ids:
                s.finish_reason = "stop"
                return
            if len(s.output) >= s.request.max_new_tokens:
                s.finish_reason = "length"
                return

    # ---- one round --------------------------------------------------------------------
    # A copy may be as long as the drafter's block; without a drafter, this long.
    LOOKUP_BLOCK = 7

    def planned_length(self, s: DecodeSession) -> int:
        """How many draft tokens to ask the proposer for: the session's draft length, capped by
        the drafter's block, the tokens still wanted and the context window (the anchor needs a
        slot too)."""
        if not s.drafting or self.proposer is None:
            return 0
        block = self.proposer.block_size
        return self._room(s, block if s.draft_length == "auto" else min(int(s.draft_length), block))

    def _room(self, s: DecodeSession, want: int) -> int:
        """`want` draft tokens capped by the tokens still wanted and the context window."""
        remaining = s.request.max_new_tokens - len(s.output) - 1
        room = self.target.max_context - s.anchor_pos - 1
        return max(0, min(want, remaining, room))

    def lookup_proposal(self, s: DecodeSession) -> Proposal | None:
        """This round's block copied from the sequence, or None (no recurring suffix, lookup off,
        or draft length 0). Works without a proposer too.

        A session's draft length k sizes the drafter's blocks, not copies: a copy is offered up
        to the full block and the scheduler cuts it by its own confidences and the SPS table.
        Only a request opened with draft length 0 (target-only decoding, the baseline) never
        copies; a later change to 0 (the router's controller when the drafter does not pay) stops
        the drafter calls and keeps the copies, which cost nothing to propose.
        Why: a copy that is right is right for many tokens in a row (conditional acceptance
        0.7-0.9 past the first position), so capping it at a k chosen for the drafter's decaying
        acceptance (the router's controller picks 2-4 here) threw most of a copy away."""
        if s.ngram is None or s.draft_length == 0 and s.request.draft_length == 0:
            return None
        n = self._room(s, self.proposer.block_size if self.proposer is not None else self.LOOKUP_BLOCK)
        if n == 0:
            return None
        seen = len(s.ngram.tokens) - len(s.request.prompt_ids)
        s.ngram.extend(s.output[seen:])
        return s.ngram.proposal(n)

    def draft_request(self, s: DecodeSession) -> DraftRequest | None:
        """This round's draft request for the session, or None when it drafts nothing."""
        n = self.planned_length(s)
        if n == 0:
            return None
        return DraftRequest(s.session_id, s.anchor, s.anchor_pos, n, s.request.sampling, s.draft_generator)

    def draft(self, sessions: list[DecodeSession]) -> tuple[list[Proposal | None], float]:
        """One batched draft for every session that drafts this round."""
        t0 = time.perf_counter()
        reqs, owners = [], []
        out: list[Proposal | None] = [None] * len(sessions)
        for i, s in enumerate(sessions):
            out[i] = self.lookup_proposal(s)
            r = self.draft_request(s) if out[i] is None else None
            if r is not None:
                reqs.append(r)
                owners.append(i)
        if reqs:
            for i, p in zip(owners, self.proposer.propose(reqs)):
                out[i] = p
        return out, (time.perf_counter() - t0) * 1e3

    def schedule(self, s: DecodeSession, proposal: Proposal | None) -> int:
        if proposal is None or len(proposal) == 0:
            return 0
        if s.draft_length == "auto" or proposal.source == "lookup":
            return schedule_prefix([proposal.confidences], self.sps, round_overhead_s=self._overhead_s)[0]
        return len(proposal)

    def verify(
        self, s: DecodeSession, proposal: Proposal | None, scheduled: int, draft_ms: float = 0.0, fallback: str = ""
    ) -> RoundStats:
        """Verify the first `scheduled` draft tokens in one target forward, accept, roll back,
        and hand the drafter the features of what was accepted. `fallback` says why a round that
        wanted a draft runs without one (the drafter failed)."""
        t0 = time.perf_counter()
        block = proposal.truncate(scheduled) if proposal is not None else None
        drafts = block.tokens.tolist() if block is not None else []
        fwd = self.target.extend(s.session_id, [s.anchor] + drafts)
        p = processed_probs(fwd.logits, s.request.sampling)
        if block is not None and scheduled:
            res = accept_block(block.tokens, block.q_ids, block.q_probs, p, greedy=s.request.sampling.greedy, generator=s.generator)
        else:
            empty = torch.zeros(0, dtype=torch.long)
            res = accept_block(empty, empty[:, None], torch.zeros(0, 1), p, greedy=s.request.sampling.greedy, generator=s.generator)
        m = res.num_accepted
        committed = drafts[:m] + [res.next_token]
        for i, t in enumerate(drafts[:m]):  # an accepted stop token ends the round, no correction
            if t in s.request.stop_ids:
                m, committed = i + 1, drafts[: i + 1]
                break
        self.target.rollback(s.session_id, s.anchor_pos + m + 1)
        if s.drafting:
            self.proposer.append_context(s.session_id, fwd.features[: m + 1], s.anchor_pos)
        s.anchor, s.anchor_pos = committed[-1], s.anchor_pos + m + 1
        before = len(s.output)
        self._commit(s, committed)
        r = RoundStats(
            proposed=len(proposal) if proposal is not None else 0,
            scheduled=scheduled,
            accepted=m,
            tokens=s.output[before:],
            confidences=proposal.confidences.tolist() if proposal is not None else [],
            draft_ms=draft_ms,
            verify_ms=fwd.seconds * 1e3,
            fallback=fallback,
            source=proposal.source if proposal is not None and len(proposal) else "",
        )
        s.stats.add(r, len(r.tokens))
        if r.source == "drafter":  # the overhead prices drafter rounds; a copy costs ~nothing
            self._observe_overhead(draft_ms / 1e3 + (time.perf_counter() - t0) - fwd.seconds)
        return r

    def round(self, sessions: list[DecodeSession]) -> list[RoundStats]:
        live = [s for s in sessions if not s.done]
        proposals, draft_ms = self.draft(live)
        return [self.verify(s, p, self.schedule(s, p), draft_ms) for s, p in zip(live, proposals)]

    # ---- whole generations ----------------------------------------------------------------
    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        t0 = time.perf_counter()
        sessions: list[DecodeSession] = []
        rounds: dict[str, list[RoundStats]] = {}
        try:
            for r in requests:
                sessions.append(self.start(r))
                rounds[sessions[-1].session_id] = []
            while any(not s.done for s in sessions):
                live = [s for s in sessions if not s.done]
                for s, r in zip(live, self.round(live)):
                    rounds[s.session_id].append(r)
        finally:
            for s in sessions:
                self.release(s)
        dt = time.perf_counter() - t0
        return [GenerationResult(s.output, s.finish_reason or "length", s.stats, rounds[s.session_id], dt) for s in sessions]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_many([request])[0]
