"""The sequential ("Markov") heads of DSpark (reference §2): a low-rank logit bias that makes slot k
depend on the token chosen at slot k-1, turning the parallel backbone's block into a left-to-right
draft.

All variants own `markov_w1` (Embedding [V, r], the previous token's Markov embedding) and
`markov_w2` (Linear r -> V, no bias). `step` is the inference recurrence (one slot, previous token
sampled); `block_bias` is the teacher-forced training form over a whole block. `step_features`
stops before `markov_w2`, so inference can project onto a draft vocabulary (a subset of W2's rows)
instead of all V."""

from __future__ import annotations

import torch
from torch import nn

from drafter_svc.config import DSparkConfig


class VanillaMarkovHead(nn.Module):
    """bias_k = W2(W1[x_prev]). Memoryless; ignores the backbone hidden state."""

    head_type = "vanilla"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__()
        self.rank = rank
        self.hidden_size = hidden_size
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        """W1[x_prev]: [...] token ids -> [..., r]."""
        return self.markov_w1(prev_tokens.long())

    def initial_state(self, batch_shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """Recurrent state at the start of a block (None: memoryless head)."""
        return None

    def step_features(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot up to W2: prev_tokens [...], h [..., d] -> (z [..., r], next state)."""
        return self.prev_embedding(prev_tokens), state

    def step(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One slot: prev_tokens [...], h [..., d] -> (bias W2(z) [..., V], next state)."""
        z, state = self.step_features(prev_tokens, h, state)
        return self.markov_w2(z), state

    def block_features(self, prev_tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced `step_features` for whole blocks: prev_tokens [..., B], h [..., B, d] ->
        z [..., B, r] (training over a draft vocabulary projects z onto a subset of W2's rows)."""
        return self.step_features(prev_tokens, h, None)[0]

    def block_bias(self, prev_tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Teacher-forced bias for whole blocks: prev_tokens [..., B], h [..., B, d] -> [..., B, V]."""
        return self.markov_w2(self.block_features(prev_tokens, h))


class GatedMarkovHead(VanillaMarkovHead):
    """bias_k = W2(sigmoid(gate_proj([h_k ; W1[x_prev]])) * W1[x_prev])."""

    head_type = "gated"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def step_features(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        e = self.prev_embedding(prev_tokens)
        gate = torch.sigmoid(self.gate_proj(torch.cat([h, e.to(h.dtype)], dim=-1))).to(e.dtype)
        return gate * e, state


class RNNMarkovHead(VanillaMarkovHead):
    """GRU-like head with a rank-r state reset to zero at every block start:
    [gate; cand; out] = joint_proj([s_prev ; W1[x_prev] ; h_k]),
    s_k = σ(gate)·s_prev + (1-σ(gate))·tanh(cand), bias_k = W2(tanh(out))."""

    head_type = "rnn"

    def __init__(self, vocab_size: int, rank: int, hidden_size: int) -> None:
        super().__init__(vocab_size, rank, hidden_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def initial_state(self, batch_shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(*batch_shape, self.rank)

    def step_features(
        self, prev_tokens: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.prev_embedding(prev_tokens)
        if state is None:
            state = self.initial_state(e.shape[:-1], h)
        gate_raw, cand_raw, out_raw = self.joint_proj(torch.cat([state, e.to(h.dtype), h], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate_raw)
        new_state = gate * state + (1.0 - gate) * torch.tanh(cand_raw)
        return torch.tanh(out_raw), new_state

    def block_features(self, prev_tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        state = self.initial_state(h.shape[:-2], h)
        zs = []
        for k in range(h.shape[-2]):
            z, state = self.step_features(prev_tokens[..., k], h[..., k, :], state)
            zs.append(z)
        return torch.stack(zs, dim=-2)


_HEADS: dict[str, type[VanillaMarkovHead]] = {
    "vanilla": VanillaMarkovHead,
    "gated": GatedMarkovHead,
    "rnn": RNNMarkovHead,
}


def build_markov_head(config: DSparkConfig) -> VanillaMarkovHead | None:
    """The head the config asks for; None for markov_rank 0 (pure DFlash)."""
    if config.markov_rank == 0:
        return None
    return _HEADS[config.markov_head_type](config.vocab_size, config.markov_rank, config.hidden_size)
