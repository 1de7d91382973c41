"""`DSparkDrafter`: the DSpark draft model assembled from its paper components.

Owns the frozen `embed_tokens`/`lm_head` copies of the target, the context projection
(`fc` -> `hidden_norm`), the backbone `layers` + `norm`, the Markov head and the confidence head,
as direct attributes so `state_dict()` has exactly DeepSpec's top-level names (reference §6.2).

Two forwards share the layers:
- `forward_train`: N blocks per sequence against the whole context with the dense training mask
  (§1.3, §4.2), teacher-forced Markov bias; for the training pipeline.
- `block_hidden` / `forward_block`: one block per session against that session's cached, already
  rotated context K/V (ragged contexts right-padded and masked); for the draft engine.
Both give the same numbers for the same anchor and context (tested)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from drafter_svc.backbone import (
    DSparkDecoderLayer,
    RMSNorm,
    RotaryEmbedding,
    inference_visibility,
    training_visibility,
)
from drafter_svc.confidence_head import ConfidenceHead
from drafter_svc.config import DSparkConfig
from drafter_svc.markov_head import VanillaMarkovHead, build_markov_head
from dspark_common.errors import InvalidRequest

LayerKV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DSparkTrainOutput:
    """Training forward outputs for N blocks of B slots per sequence."""

    logits: torch.Tensor  # [b, N, B, V] base + teacher-forced Markov bias, model dtype
    confidence_logits: torch.Tensor | None  # [b, N, B] fp32; None without a confidence head
    hidden: torch.Tensor  # [b, N, B, d] final-normed backbone states
    prev_tokens: torch.Tensor  # [b, N, B] the x_prev fed to the heads (anchor, then data tokens)


class DSparkDrafter(nn.Module):
    markov_head: VanillaMarkovHead | None
    confidence_head: ConfidenceHead | None

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.fc = nn.Linear(config.context_feature_size, d, bias=False)
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.markov_head = build_markov_head(config)
        self.confidence_head = (
            ConfidenceHead(d, config.markov_rank if config.confidence_uses_markov else 0)
            if config.enable_confidence_head
            else None
        )
        # Optional draft vocabulary (drafter_svc/draft_vocab.py): inference only, not a weight.
        self.draft_vocab: torch.Tensor | None
        self.register_buffer("draft_vocab", None, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters

    def reset_parameters(self) -> None:
        """HF post_init: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def init_from_target(
        self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor, *, freeze: bool = True
    ) -> None:
        """Copy the target's input embedding and output head ([V, d] each) and freeze them."""
        expected = tuple(self.embed_tokens.weight.shape)
        for name, w in (("embed_weight", embed_weight), ("lm_head_weight", lm_head_weight)):
            if tuple(w.shape) != expected:
                raise InvalidRequest(f"{name} has shape {list(w.shape)}, expected {list(expected)} ([V, d])", name)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(embed_weight)
            self.lm_head.weight.copy_(lm_head_weight)
        self.embed_tokens.requires_grad_(not freeze)
        self.lm_head.requires_grad_(not freeze)

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    # ------------------------------------------------------------------ context

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., T*d] -> H_ctx [..., d] (fc then hidden_norm, once for all layers)."""
        if features.shape[-1] != self.config.context_feature_size:
            raise InvalidRequest(
                f"context features must be {self.config.context_feature_size} wide "
                f"({self.config.num_context_layers} target layers x {self.config.hidden_size}), "
                f"got {features.shape[-1]}",
                "features",
            )
        return self.hidden_norm(self.fc(features.to(self.dtype)))

    def context_kv(self, h_ctx: torch.Tensor, positions: torch.Tensor) -> list[LayerKV]:
        """H_ctx [..., L, d] at absolute positions [..., L] (or [L]) -> per layer (K, V), each
        [..., KV, L, hd], K after k_norm and RoPE. Independent of other layers' outputs."""
        cos, sin = self.rotary_emb(positions, h_ctx.dtype)
        return [layer.self_attn.project_kv(h_ctx, cos, sin) for layer in self.layers]

    # ------------------------------------------------------------------ shared pieces

    def _run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ctx_kv: Sequence[LayerKV],
        mask: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, k, v, mask)
        return self.norm(x)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Base logits lm_head(h)."""
        return self.lm_head(h)

    def block_input_ids(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """[...] anchors -> [..., B]: the anchor then B-1 mask tokens."""
        ids = torch.full(
            (*anchor_tokens.shape, self.config.block_size),
            self.config.mask_token_id,
            dtype=torch.long,
            device=anchor_tokens.device,
        )
        ids[..., 0] = anchor_tokens
        return ids

    def markov_step(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sequential head, one slot: (logit bias [..., V] or None without a head, next state).
        Start each block with state None (the RNN state restarts at zero)."""
        if self.markov_head is None:
            return None, None
        return self.markov_head.step(prev_tokens, h, state)

    def markov_features(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`markov_step` stopped before W2: (z [..., r] or None without a head, next state)."""
        if self.markov_head is None:
            return None, None
        return self.markov_head.step_features(prev_tokens, h, state)

    def confidence_logits(self, h: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        """Confidence logits [...] fp32 from [h ; W1[x_prev]]; None without a confidence head."""
        if self.confidence_head is None:
            return None
        prev = self.markov_head.prev_embedding(prev_tokens) if self.confidence_head.uses_markov else None
        return self.confidence_head(h, prev)

    # ------------------------------------------------------------------ training forward

    def forward_train(
        self,
        context_features: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        keep: torch.Tensor,
        vocab_ids: torch.Tensor | None = None,
    ) -> DSparkTrainOutput:
        """N blocks per sequence over the full context.

        context_features [b, S, T*d], input_ids [b, S], anchors [b, N] (positions in [0, S)),
        keep [b, N] (false: dummy block, all mask tokens). Slot j of the block at `a` sits at
        position a+j and predicts the token at a+j+1; the Markov/confidence heads see the anchor
        for slot 0 and the data token input_ids[a+k] for slot k >= 1 (teacher forcing).

        `vocab_ids` [V'] (sorted token ids, a draft vocabulary): logits over those ids only, column
        i = token vocab_ids[i], as the drafter proposes when served with that vocabulary; both
        vocabulary projections then cost V'/V of the full ones."""
        b, seq_len = input_ids.shape
        n = anchors.shape[1]
        block = self.config.block_size
        if context_features.shape[:2] != (b, seq_len) or anchors.shape != keep.shape or anchors.shape[0] != b:
            raise InvalidRequest(
                f"shape mismatch: features {list(context_features.shape)}, input_ids {list(input_ids.shape)}, "
                f"anchors {list(anchors.shape)}, keep {list(keep.shape)}"
            )
        device = input_ids.device
        anchors = anchors.long()
        keep = keep.to(torch.bool)

        h_ctx = self.project_context(context_features)
        ctx_kv = self.context_kv(h_ctx, torch.arange(seq_len, device=device))

        anchor_tokens = input_ids.gather(1, anchors)
        block_ids = self.block_input_ids(torch.where(keep, anchor_tokens, self.config.mask_token_id))
        x = self.embed_tokens(block_ids.view(b, n * block))
        offsets = torch.arange(block, device=device)
        positions = (anchors.unsqueeze(-1) + offsets).view(b, n * block)
        mask = training_visibility(anchors, keep, seq_len, block)
        hidden = self._run_layers(x, positions, ctx_kv, mask).view(b, n, block, -1)

        if vocab_ids is None:
            logits = self.compute_logits(hidden)
        else:
            logits = F.linear(hidden, self.lm_head.weight.index_select(0, vocab_ids))
        data_idx = (anchors.unsqueeze(-1) + offsets[1:]).clamp(max=seq_len - 1)  # [b, N, B-1]
        data_tokens = input_ids.gather(1, data_idx.view(b, -1)).view(b, n, block - 1)
        prev_tokens = torch.cat([anchor_tokens.unsqueeze(-1), data_tokens], dim=-1)
        if self.markov_head is not None:
            z = self.markov_head.block_features(prev_tokens, hidden)
            w2 = self.markov_head.markov_w2.weight
            logits = logits + F.linear(z, w2 if vocab_ids is None else w2.index_select(0, vocab_ids))
        return DSparkTrainOutput(
            logits=logits,
            confidence_logits=self.confidence_logits(hidden, prev_tokens),
            hidden=hidden,
            prev_tokens=prev_tokens,
        )

    forward = forward_train

    # ------------------------------------------------------------------ inference forward

    def block_hidden(
        self,
        ctx_k: Sequence[torch.Tensor],
        ctx_v: Sequence[torch.Tensor],
        ctx_lens: torch.Tensor,
        anchor_tokens: torch.Tensor,
        anchor_positions: torch.Tensor,
    ) -> torch.Tensor:
        """One block per session over right-padded cached contexts.

        ctx_k/ctx_v: per layer [b, KV, Lmax, hd] (rotated); ctx_lens [b] valid lengths (entries
        past a session's length are invisible); anchor_tokens/anchor_positions [b].
        Returns the final-normed hidden states h [b, B, d] of all B slots."""
        ids = self.block_input_ids(anchor_tokens.long())
        x = self.embed_tokens(ids)
        positions = anchor_positions.long().unsqueeze(-1) + torch.arange(self.config.block_size, device=ids.device)
        mask = inference_visibility(ctx_lens, ctx_k[0].shape[-2], self.config.block_size)
        return self._run_layers(x, positions, list(zip(ctx_k, ctx_v)), mask)

    def forward_block(
        self,
        contexts: Sequence[Sequence[LayerKV]],
        anchor_tokens: torch.Tensor,
        anchor_positions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """contexts: per session, per layer (K, V) each [KV, Lctx_i, hd] as `context_kv` returns
        them; anchor_tokens/anchor_positions [b]. Returns (h [b, B, d], base logits [b, B, V])."""
        ctx_k, ctx_v, lens = pad_contexts(contexts, len(self.layers))
        h = self.block_hidden(ctx_k, ctx_v, lens.to(anchor_tokens.device), anchor_tokens, anchor_positions)
        return h, self.compute_logits(h)


def pad_contexts(
    contexts: Sequence[Sequence[LayerKV]], num_layers: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Right-pad ragged per-session context K/V to per-layer [b, KV, Lmax, hd] tensors."""
    if any(len(c) != num_layers for c in contexts):
        raise InvalidRequest(f"every context needs K/V for {num_layers} layers")
    lens = [int(c[0][0].shape[-2]) for c in contexts]
    max_len = max(lens, default=0)
    ref = contexts[0][0][0]
    kv_heads, head_dim = ref.shape[0], ref.shape[-1]
    ks, vs = [], []
    for layer in range(num_layers):
        k = ref.new_zeros(len(contexts), kv_heads, max_len, head_dim)
        v = ref.new_zeros(len(contexts), kv_heads, max_len, head_dim)
        for i, ctx in enumerate(contexts):
            k[i, :, : lens[i]] = ctx[layer][0]
            v[i, :, : lens[i]] = ctx[layer][1]
        ks.append(k)
        vs.append(v)
    return ks, vs, torch.tensor(lens, dtype=torch.long, device=ref.device)
