"""Speculative acceptance: the rule that makes speculative decoding lossless.

Owns one decision per verification round. Given a drafted block x_1..x_n, the exact sparse draft
distribution q_k each x_k was sampled from, and the target's processed distributions for the rows
anchor, x_1, .., x_n, it decides how many draft tokens are accepted and which token the target adds
after them (the correction after a rejection, the bonus when all are accepted).

Greedy: accept while the draft token equals the target's argmax; the next token is the argmax of the
first row that disagrees (or of the last row). Output is token-identical to target-only greedy.

Sampling (Leviathan et al. 2023; Chen et al. 2023): accept x_k with probability
min(1, p_k(x_k) / q_k(x_k)); on the first rejection sample from the residual norm(max(0, p_k - q_k));
if all n are accepted sample the bonus from p_n. Every committed token is then distributed exactly
as the target's processed distribution p.

Stop tokens, KV rollback and how many tokens to verify are the caller's. Randomness comes only from
the generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_common.sampling import sample

# Below this the residual max(0, p - q) is empty up to float error (p == q exactly means a rejection
# has probability 0); sampling from p is then the correct limit and avoids dividing by ~0.
RESIDUAL_EPS = 1e-8

# q(x) of a drafted token is > 0 by construction; the floor only guards the division against a
# malformed proposal (same guard as DeepSpec's `max(q, 1e-8)`).
MIN_DRAFT_PROB = 1e-8


@dataclass(frozen=True)
class AcceptResult:
    """num_accepted draft tokens x_1..x_m are committed, followed by next_token."""

    num_accepted: int
    next_token: int


def dense_draft_probs(q_ids: torch.Tensor, q_probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, K] sparse draft distributions -> [n, V] dense ones (zero outside q_ids).

    scatter_add, not scatter: a proposal may repeat an id (e.g. zero-probability padding), and the
    mass of every copy belongs to that id."""
    dense = torch.zeros(q_ids.shape[0], vocab_size, dtype=torch.float32)
    return dense.scatter_add_(1, q_ids, q_probs.float())


def residual_probs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The correction distribution after a rejection: norm(max(0, p - q)), or p if that is empty."""
    residual = (p - q).clamp_min(0.0)
    mass = residual.sum()
    if mass <= RESIDUAL_EPS:
        return p
    return residual / mass


def accept_block(
    draft_tokens: torch.Tensor,
    q_ids: torch.Tensor,
    q_probs: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    greedy: bool,
    generator: torch.Generator | None,
) -> AcceptResult:
    """Verify one drafted block against the target.

    draft_tokens [n] int64; q_ids, q_probs [n, K]: x_k was sampled from q_probs[k] over q_ids[k];
    target_probs [n+1, V]: processed target distributions, row i is the distribution of the token
    after the anchor and i draft tokens (row 0 scores x_1, row n is the bonus row)."""
    n = _check_block(draft_tokens, q_ids, q_probs, target_probs)

    if greedy:
        target_tokens = target_probs.argmax(-1)  # [n+1]
        m = _leading_true(draft_tokens == target_tokens[:n])
        return AcceptResult(m, int(target_tokens[m]))

    q = dense_draft_probs(q_ids, q_probs, target_probs.shape[1])  # [n, V]
    rows = torch.arange(n)
    p_x = target_probs[rows, draft_tokens].float()
    q_x = q[rows, draft_tokens].clamp_min(MIN_DRAFT_PROB)
    # One uniform per slot, always all n, so the generator advances the same way whatever happens.
    # u is in [0, 1), so P(u < r) = min(1, r).
    u = torch.rand(n, generator=generator)
    m = _leading_true(u < p_x / q_x)

    if m < n:
        return AcceptResult(m, sample(residual_probs(target_probs[m].float(), q[m]), generator))
    return AcceptResult(n, sample(target_probs[n].float(), generator))


def _leading_true(mask: torch.Tensor) -> int:
    """Length of the all-True prefix of a 1-D bool tensor."""
    return int(torch.cumprod(mask.to(torch.int64), 0).sum())


def _check_block(
    draft_tokens: torch.Tensor, q_ids: torch.Tensor, q_probs: torch.Tensor, target_probs: torch.Tensor
) -> int:
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D, got shape {tuple(draft_tokens.shape)}")
    n = int(draft_tokens.shape[0])
    if q_ids.dim() != 2 or q_ids.shape[0] != n or q_probs.shape != q_ids.shape:
        raise ValueError(
            f"q_ids and q_probs must both be [{n}, K], got {tuple(q_ids.shape)} and {tuple(q_probs.shape)}"
        )
    if target_probs.dim() != 2 or target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs must be [{n + 1}, V], got {tuple(target_probs.shape)}")
    vocab = int(target_probs.shape[1])
    for name, ids in (("draft_tokens", draft_tokens), ("q_ids", q_ids)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{name} must be token ids in [0, {vocab})")
    return n
