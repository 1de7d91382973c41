"""The target engine: per-session KV caches over one loaded causal LM.

A session's cache covers the tokens the target has processed. `extend` runs new tokens (a prompt,
or an anchor plus a draft block) through the target in ONE forward, returning logits for every new
position and the context features (hidden states of the configured target layers) the drafter
needs; `rollback` drops rejected positions. Not thread-safe by itself: callers serialise access
(the services run every forward on one worker thread)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from dspark_common.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted
from verifier_svc import kv_rollback


@dataclass
class ForwardResult:
    logits: torch.Tensor  # [n, V] float32
    features: torch.Tensor | None  # [n, T*d] (None when no feature layers are configured)
    seconds: float = 0.0


@dataclass
class _Session:
    cache: object
    length: int = 0
    tokens: list[int] = field(default_factory=list)


def feature_indices(num_layers: int, layer_ids: list[int]) -> list[int]:
    """Map DSpark target layer ids (-1 = embeddings, i = output of layer i) to indices of HF's
    `hidden_states` tuple. The last layer is refused: HF returns it after the final norm."""
    prev = -2
    for i in layer_ids:
        if not (-1 <= i < num_layers - 1) or i <= prev:
            raise InvalidRequest(
                f"target_layer_ids must be strictly increasing, each in -1..{num_layers - 2} "
                f"(the last layer is final-normed in hidden_states), got {layer_ids}",
                "target_layer_ids",
            )
        prev = i
    return [i + 1 for i in layer_ids]


def _token_features(h: torch.Tensor) -> torch.Tensor:
    """[n, d] per layer. DeepSeek-V4 carries mHC residual streams ([n, hc_mult, d]); the drafter
    takes their mean, the same collapse-free summary for every stream count."""
    return h.mean(dim=1) if h.dim() == 3 else h


class TargetEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        feature_layer_ids: list[int] | None = None,
        max_sessions: int = 64,
        max_context: int | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.num_layers = int(self.config.num_hidden_layers)
        window = int(getattr(self.config, "max_position_embeddings", 0) or 0) or 1 << 20
        self.max_context = min(max_context or window, window)
        self.max_sessions = max_sessions
        self.feature_layer_ids = list(feature_layer_ids or [])
        self._hs_index = feature_indices(self.num_layers, self.feature_layer_ids)
        self.device = next(model.parameters()).device
        self._sessions: dict[str, _Session] = {}
        # transformers 5.x renamed past_key_values to cache (the old name warns, then goes).
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # ---- sessions -------------------------------------------------------------------------
    def open(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise FailedPrecondition(f"session {session_id!r} is already open")
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(f"verifier holds its maximum of {self.max_sessions} sessions")
        self._sessions[session_id] = _Session(kv_rollback.new_cache(self.config))

    def release(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def length(self, session_id: str) -> int:
        return self._get(session_id).length

    def tokens(self, session_id: str) -> list[int]:
        return list(self._get(session_id).tokens)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def cached_positions(self) -> int:
        return sum(s.length for s in self._sessions.values())

    def _get(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"unknown session {session_id!r}") from None

    # ---- model work ---------------------------------------------------------------------
    def validate_tokens(self, tokens: list[int], field_name: str = "prompt") -> None:
        if len(tokens) == 0:
            raise InvalidRequest(f"{field_name} is empty", field_name)
        bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"{field_name} has token ids outside the vocabulary 0..{self.vocab_size - 1}: {bad[:5]}", field_name
            )

    @torch.inference_mode()
    def extend(self, session_id: str, tokens: list[int]) -> ForwardResult:
        """Run `tokens` at the next positions of the session in one forward."""
        s = self._get(session_id)
        self.validate_tokens(tokens, "tokens")
        if s.length + len(tokens) > self.max_context:
            raise ResourceExhausted(
                f"context of {s.length + len(tokens)} tokens exceeds the target's window of {self.max_context}"
            )
        t0 = time.perf_counter()
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(s.length, s.length + len(tokens), device=self.device)[None]
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=bool(self._hs_index),
            **{self._cache_kw: s.cache},
        )
        s.length += len(tokens)
        s.tokens.extend(tokens)
        logits = out.logits[0].float()
        feats = None
        if self._hs_index:
            feats = torch.cat([_token_features(out.hidden_states[i][0]) for i in self._hs_index], dim=-1)
        return ForwardResult(logits, feats, time.perf_counter() - t0)

    def rollback(self, session_id: str, length: int) -> None:
        s = self._get(session_id)
        if not 0 <= length <= s.length:
            raise FailedPrecondition(f"cannot roll session {session_id!r} of length {s.length} back to {length}")
        try:
            kv_rollback.rollback(s.cache, length)
        except ValueError as e:  # e.g. deeper than a compressed cache can undo
            raise FailedPrecondition(f"cannot roll session {session_id!r} back to {length}: {e}") from None
        s.length = length
        del s.tokens[length:]
