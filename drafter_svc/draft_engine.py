"""`DraftEngine`: the drafter's per-session context cache and its batched proposals.

Owns, per session, the rotated context K/V of every draft layer for positions [0, length) (the
draft cache of reference §5; block K/V are never cached), its rollback (`truncate`), and
`propose`: one batched backbone forward for all requests, then the sequential head slot by slot
(§2, §5 step 3), sampling each slot exactly from the sparse distribution q it reports.

Thread-compatible: every public method holds one lock, so the service may call it from an executor
thread while another thread appends context."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from drafter_svc.confidence_head import calibrated_confidence
from drafter_svc.config import DSparkConfig
from drafter_svc.draft_vocab import DraftHeads
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted
from dspark_common.sampling import processed_probs, sample
from dspark_common.types import DraftRequest, Proposal

_INITIAL_CAPACITY = 256


@dataclass
class _SessionCache:
    kv: torch.Tensor  # [layers, 2 (K, V), KV heads, capacity, head_dim]; positions >= length are stale
    length: int = 0


class DraftEngine:
    def __init__(
        self,
        model: DSparkDrafter,
        config: DSparkConfig,
        *,
        max_sessions: int = 256,
        max_context: int = 32768,
        proposal_top_k: int = 8,
        device: torch.device | str | None = None,
        use_draft_vocab: bool = True,
    ) -> None:
        """`use_draft_vocab`: propose from the model's draft vocabulary when it has one
        (drafter_svc/draft_vocab.py); False drafts over the full vocabulary."""
        if config.to_dict() != model.config.to_dict():
            raise InvalidRequest("config does not match the model's config", "config")
        for name, value in (("max_sessions", max_sessions), ("max_context", max_context),
                            ("proposal_top_k", proposal_top_k)):
            if not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}", name)
        self._device = torch.device(device) if device is not None else model.device
        self._model = model.to(self._device).eval()
        self._config = config
        self._dtype = model.dtype
        self._max_sessions = max_sessions
        self._max_context = max_context
        self._heads = DraftHeads(self._model, self._model.draft_vocab if use_draft_vocab else None)
        self._top_k = min(proposal_top_k, self._heads.size)
        self._sts = (
            torch.tensor(config.sts_temperatures, dtype=torch.float32, device=self._device)
            if config.sts_temperatures is not None
            else None
        )
        self._sessions: dict[str, _SessionCache] = {}
        self._lock = threading.Lock()

    @property
    def config(self) -> DSparkConfig:
        return self._config

    @property
    def block_size(self) -> int:
        return self._config.block_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def vocab_size(self) -> int:
        """How many tokens a proposal may draw from (the draft vocabulary's size, or V)."""
        return self._heads.size

    # ------------------------------------------------------------------ sessions

    def open(self, session_id: str) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidRequest(f"session_id must be a non-empty string, got {session_id!r}", "session_id")
        with self._lock:
            if session_id in self._sessions:
                raise FailedPrecondition(f"draft session {session_id!r} is already open")
            if len(self._sessions) >= self._max_sessions:
                raise ResourceExhausted(
                    f"the drafter holds its maximum of {self._max_sessions} sessions; release one first"
                )
            self._sessions[session_id] = _SessionCache(kv=self._new_buffer(min(_INITIAL_CAPACITY, self._max_context)))

    def release(self, session_id: str) -> bool:
        """Free a session's cache; idempotent (False when it was not held), so cleanup paths
        never fail on a session that a failed open never created."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def context_length(self, session_id: str) -> int:
        with self._lock:
            return self._get(session_id).length

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "sessions": len(self._sessions),
                "cached_positions": sum(s.length for s in self._sessions.values()),
                "cache_bytes": sum(s.kv.numel() * s.kv.element_size() for s in self._sessions.values()),
                "max_sessions": self._max_sessions,
                "max_context": self._max_context,
            }

    # ------------------------------------------------------------------ context

    def append_context(self, session_id: str, features: torch.Tensor, start_pos: int) -> None:
        """Append target features [n, T*d] for positions [start_pos, start_pos + n)."""
        width = self._config.context_feature_size
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != width:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise InvalidRequest(f"features must be [n, {width}] (T*d), got {shape}", "features")
        with self._lock:
            session = self._check_append(session_id, features.shape[0], start_pos)
            with torch.inference_mode():
                h_ctx = self._model.project_context(features.to(self._device, self._dtype))
                self._append(session, h_ctx, start_pos)

    def append_projected(self, session_id: str, h_ctx: torch.Tensor, start_pos: int) -> None:
        """Append already projected context H_ctx [n, d] (the verifier ran fc + hidden_norm)."""
        d = self._config.hidden_size
        if not isinstance(h_ctx, torch.Tensor) or h_ctx.ndim != 2 or h_ctx.shape[1] != d:
            shape = list(h_ctx.shape) if isinstance(h_ctx, torch.Tensor) else type(h_ctx).__name__
            raise InvalidRequest(f"projected context must be [n, {d}], got {shape}", "h_ctx")
        with self._lock:
            session = self._check_append(session_id, h_ctx.shape[0], start_pos)
            with torch.inference_mode():
                self._append(session, h_ctx.to(self._device, self._dtype), start_pos)

    def truncate(self, session_id: str, length: int) -> None:
        """Roll the context back to positions [0, length)."""
        with self._lock:
            session = self._get(session_id)
            if not isinstance(length, int) or length < 0:
                raise InvalidRequest(f"length must be an integer >= 0, got {length!r}", "length")
            if length > session.length:
                raise FailedPrecondition(
                    f"cannot truncate session {session_id!r} to {length}: it holds {session.length} positions"
                )
            session.length = length

    # ------------------------------------------------------------------ proposals

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        """One block per request, in order. Each request's session must hold exactly the
        positions [0, anchor_pos)."""
        with self._lock:
            sessions = [self._check_request(r) for r in requests]
            proposals: list[Proposal | None] = [None] * len(requests)
            active = [i for i, r in enumerate(requests) if r.block_size > 0]
            for i, r in enumerate(requests):
                if r.block_size == 0:
                    proposals[i] = self._empty_proposal(r)
            if active:
                with torch.inference_mode():
                    drafted = self._draft([requests[i] for i in active], [sessions[i] for i in active])
                for i, p in zip(active, drafted):
                    proposals[i] = p
            return proposals  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals

    def _get(self, session_id: str) -> _SessionCache:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown draft session {session_id!r}")
        return session

    def _new_buffer(self, capacity: int) -> torch.Tensor:
        c = self._config
        return torch.empty(
            c.num_hidden_layers, 2, c.num_key_value_heads, capacity, c.head_dim, dtype=self._dtype, device=self._device
        )

    def _check_append(self, session_id: str, n: int, start_pos: int) -> _SessionCache:
        session = self._get(session_id)
        if start_pos != session.length:
            raise FailedPrecondition(
                f"session {session_id!r} holds context positions [0, {session.length}); "
                f"cannot append at start_pos {start_pos}"
            )
        if session.length + n > self._max_context:
            raise ResourceExhausted(
                f"session {session_id!r} would hold {session.length + n} context positions; "
                f"the drafter's max_context is {self._max_context}"
            )
        return session

    def _append(self, session: _SessionCache, h_ctx: torch.Tensor, start_pos: int) -> None:
        n = h_ctx.shape[0]
        if n == 0:
            return
        positions = torch.arange(start_pos, start_pos + n, device=self._device)
        kv = torch.stack([torch.stack(pair) for pair in self._model.context_kv(h_ctx, positions)])
        end = session.length + n
        capacity = session.kv.shape[3]
        if end > capacity:
            # Geometric growth keeps appends amortised O(n).
            grown = self._new_buffer(min(max(end, 2 * capacity), self._max_context))
            grown[:, :, :, : session.length] = session.kv[:, :, :, : session.length]
            session.kv = grown
        session.kv[:, :, :, session.length : end] = kv
        session.length = end

    def _check_request(self, r: DraftRequest) -> _SessionCache:
        session = self._get(r.session_id)
        max_block = self._config.block_size
        if not isinstance(r.block_size, int) or isinstance(r.block_size, bool) or not 0 <= r.block_size <= max_block:
            raise InvalidRequest(
                f"block_size must be an integer in 0..{max_block} (the drafter's trained block size), "
                f"got {r.block_size!r}",
                "block_size",
            )
        if not isinstance(r.anchor_token, int) or not 0 <= r.anchor_token < self._config.vocab_size:
            raise InvalidRequest(
                f"anchor_token must be a token id in [0, {self._config.vocab_size}), got {r.anchor_token!r}",
                "anchor_token",
            )
        r.sampling.validate()
        if r.anchor_pos != session.length:
            raise FailedPrecondition(
                f"session {r.session_id!r} holds context positions [0, {session.length}) but the anchor is at "
                f"{r.anchor_pos}; the context must cover exactly the positions before the anchor"
            )
        return session

    def _empty_proposal(self, r: DraftRequest) -> Proposal:
        k = 1 if r.sampling.greedy else self._top_k
        return Proposal(
            tokens=torch.zeros(0, dtype=torch.long),
            q_ids=torch.zeros(0, k, dtype=torch.long),
            q_probs=torch.zeros(0, k, dtype=torch.float32),
            confidences=torch.zeros(0, dtype=torch.float32),
        )

    def _draft(self, requests: list[DraftRequest], sessions: list[_SessionCache]) -> list[Proposal]:
        model, device = self._model, self._device
        b = len(requests)
        lens = [s.length for s in sessions]
        max_len = max(lens)
        c = self._config
        # Right-pad the ragged contexts into one batch; the mask hides the padding.
        kv = torch.zeros(c.num_hidden_layers, 2, b, c.num_key_value_heads, max_len, c.head_dim,
                         dtype=self._dtype, device=device)
        for i, s in enumerate(sessions):
            kv[:, :, i, :, : s.length] = s.kv[:, :, :, : s.length]
        anchors = torch.tensor([r.anchor_token for r in requests], dtype=torch.long, device=device)
        h = model.block_hidden(
            [kv[layer, 0] for layer in range(c.num_hidden_layers)],
            [kv[layer, 1] for layer in range(c.num_hidden_layers)],
            torch.tensor(lens, dtype=torch.long, device=device),
            anchors,
            torch.tensor([r.anchor_pos for r in requests], dtype=torch.long, device=device),
        )
        n_max = max(r.block_size for r in requests)
        base = self._heads.logits(h[:, :n_max])
        return self._sequential_head(requests, h, base, anchors)

    def _sequential_head(
        self, requests: list[DraftRequest], h: torch.Tensor, base: torch.Tensor, anchors: torch.Tensor
    ) -> list[Proposal]:
        """Slots left to right: corrected logits from the previously chosen token (the anchor
        for slot 0), then each request's own choice, batched across requests. Logits are indexed
        by draft-vocabulary slot; `heads.token_ids` maps choices back to token ids."""
        model, device, heads = self._model, self._device, self._heads
        b, n_max = base.shape[:2]
        greedy_rows = torch.tensor([i for i, r in enumerate(requests) if r.sampling.greedy], dtype=torch.long,
                                   device=device)
        # Requests with the same processing share one processed_probs call per slot.
        groups: dict[tuple[float, float, int], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.sampling.greedy:
                groups.setdefault((r.sampling.temperature, r.sampling.top_p, r.sampling.top_k), []).append(i)
        q_ids: dict[int, list[torch.Tensor]] = {i: [] for rows in groups.values() for i in rows}
        q_probs: dict[int, list[torch.Tensor]] = {i: [] for i in q_ids}

        tokens = torch.zeros(b, n_max, dtype=torch.long, device=device)
        confidences = torch.ones(b, n_max, dtype=torch.float32, device=device)
        prev, state = anchors, None
        for k in range(n_max):
            hk = h[:, k]
            z, state = model.markov_features(prev, hk, state)
            logits = base[:, k] if z is None else base[:, k] + heads.markov_bias(z)
            conf_logits = model.confidence_logits(hk, prev)
            if conf_logits is not None:
                confidences[:, k] = calibrated_confidence(conf_logits, None if self._sts is None else self._sts[k])
            x = torch.zeros(b, dtype=torch.long, device=device)
            if greedy_rows.numel():
                x[greedy_rows] = heads.token_ids(logits[greedy_rows].argmax(-1))
            for rows in groups.values():
                # A request whose block ended draws nothing more, so its generator advances
                # exactly as if it had been proposed alone.
                rows = [i for i in rows if requests[i].block_size > k]
                if not rows:
                    continue
                probs = processed_probs(logits[rows], requests[rows[0]].sampling)
                top_p, top_i = probs.topk(self._top_k, dim=-1)
                top_i = heads.token_ids(top_i)
                top_p = top_p / top_p.sum(-1, keepdim=True)
                top_p, top_i = top_p.cpu(), top_i.cpu()
                chosen = []
                for j, i in enumerate(rows):
                    gen = requests[i].generator
                    row_p = top_p[j] if gen is None or gen.device.type == "cpu" else top_p[j].to(gen.device)
                    chosen.append(int(top_i[j, sample(row_p, gen)]))
                    q_ids[i].append(top_i[j])
                    q_probs[i].append(top_p[j])
                x[torch.tensor(rows, device=device)] = torch.tensor(chosen, dtype=torch.long, device=device)
            tokens[:, k] = x
            prev = x

        tokens_cpu, conf_cpu = tokens.cpu(), confidences.cpu()
        proposals = []
        for i, r in enumerate(requests):
            n = r.block_size
            t = tokens_cpu[i, :n].clone()
            if r.sampling.greedy:
                ids, probs_i = t.unsqueeze(-1), torch.ones(n, 1, dtype=torch.float32)
            else:
                ids, probs_i = torch.stack(q_ids[i]), torch.stack(q_probs[i]).float()
            proposals.append(Proposal(tokens=t, q_ids=ids, q_probs=probs_i, confidences=conf_cpu[i, :n].clone()))
        return proposals
