"""The confidence head (reference §3.1) and its Sequential Temperature Scaling (§3.3).

`proj` is Linear (d + r) -> 1 with bias over [h_k ; W1[x_prev]] (or d -> 1 without the Markov
feature). Its sigmoid c_k estimates P(slot k accepted | slots < k accepted); STS divides slot k's
logit by a calibrated temperature τ_k before the sigmoid."""

from __future__ import annotations

import torch
from torch import nn


class ConfidenceHead(nn.Module):
    def __init__(self, hidden_size: int, markov_rank: int = 0) -> None:
        super().__init__()
        self.uses_markov = markov_rank > 0
        self.proj = nn.Linear(hidden_size + markov_rank, 1)

    def forward(self, h: torch.Tensor, prev_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """h [..., d] (+ W1[x_prev] [..., r] when the head uses it) -> fp32 logits [...]."""
        if self.uses_markov:
            if prev_embedding is None:
                raise ValueError("this confidence head needs the Markov embedding of the previous token")
            h = torch.cat([h, prev_embedding.to(h.dtype)], dim=-1)
        return self.proj(h).squeeze(-1).float()


def calibrated_confidence(logits: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """c = sigmoid(logit / τ) per slot: logits [..., n], temperatures [n] (None: all 1.0)."""
    logits = logits.float()
    if temperatures is not None:
        logits = logits / temperatures.to(device=logits.device, dtype=torch.float32)
    return torch.sigmoid(logits)
