"""The DSpark training objective (reference §4.2–§4.5) as pure tensor functions.

- `sample_anchors`: up to N anchors per sequence, uniformly without replacement among positions
  whose own token and next token are response tokens, sorted; the rest are dummy blocks.
- `block_targets`: labels, the cumulative-product eval mask and the position weights exp(−j/γ).
- `dspark_losses`: CE + L1 ("TV") + confidence BCE with the detached soft label 1 − ½‖p_d − p_t‖₁.

Deviation from DeepSpec (documented in docs/TRAINING.md): the target distribution p_t is not
recomputed from the target's final hidden state with the 49152-wide head at every step; the cache
stores the target's top-k probabilities (+ ids) per position. The L1 term is then the exact L1
between p_d and p_t *coarsened to k+1 buckets* (the k cached ids plus one "everything else"
bucket):

    L1_k = Σ_{i∈topk} |p_d,i − p_t,i| + |(1 − Σ_{topk} p_d,i) − (1 − Σ_{topk} p_t,i)|

By the data-processing inequality L1_k ≤ ‖p_d − p_t‖₁, with equality when the draft's tail mass is
spread over the non-top-k ids proportionally to the target's (and exactly when the target's tail
mass is 0). Unlike renormalising the top-k (which charges the draft for every bit of mass outside
the top-k, pushing it to be over-sharp), it leaves the target's residual mass to the draft's tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_DECAY_GAMMA = 4.0  # DeepSpec loss_decay_gamma (code), not the paper's block size


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.1
    tv: float = 0.9
    conf: float = 1.0


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator, *, pad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_mask [S] -> (anchors [N] long, keep [N] bool).

    Candidates are positions i in [0, S-2] with loss_mask[i] and loss_mask[i+1]. Up to N are drawn
    without replacement and sorted; with `pad` the result is filled to N with dummy blocks (anchor
    0, keep False), otherwise only the real anchors are returned."""
    m = loss_mask.bool()
    cand = torch.nonzero(m[:-1] & m[1:]).squeeze(-1)
    if cand.numel() > num_anchors:
        pick = torch.randperm(cand.numel(), generator=generator)[:num_anchors]
        cand = cand[pick].sort().values
    keep = torch.ones(cand.numel(), dtype=torch.bool)
    if pad and cand.numel() < num_anchors:
        extra = num_anchors - cand.numel()
        cand = torch.cat([cand, torch.zeros(extra, dtype=torch.long)])
        keep = torch.cat([keep, torch.zeros(extra, dtype=torch.bool)])
    return cand.long(), keep


def block_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    keep: torch.Tensor,
    block_size: int,
    gamma: float = LOSS_DECAY_GAMMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one sequence (input_ids, loss_mask [S]; anchors, keep [N]) ->
    (labels [N, B] long, eval_mask [N, B] bool, weights [N, B] float32).

    Slot j predicts position a+j+1; eval_mask = (a+j+1 < S) ∧ loss_mask[a+j+1] ∧ keep, then a
    cumulative product along j; weights = eval_mask · exp(−j/γ)."""
    seq_len = input_ids.shape[-1]
    j = torch.arange(block_size)
    pos = anchors.long()[:, None] + j[None, :] + 1
    idx = pos.clamp(max=seq_len - 1)
    labels = input_ids.long()[idx]
    valid = (pos < seq_len) & loss_mask.bool()[idx] & keep.bool()[:, None]
    eval_mask = valid.to(torch.int64).cumprod(-1).bool()
    weights = eval_mask.float() * torch.exp(-j.float() / gamma)[None, :]
    return labels, eval_mask, weights


def sparse_l1(p_d_full: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor) -> torch.Tensor:
    """L1 between p_d [M, V] and the target coarsened to its top-k ids + one tail bucket -> [M].
    (Several top-k ids may share one zero column of p_d: ids the draft cannot write.)"""
    p_t = topk_probs.float()
    p_d = p_d_full.gather(-1, topk_ids.long())
    tail_d = (1.0 - p_d.sum(-1)).clamp(min=0.0)
    tail_t = (1.0 - p_t.sum(-1)).clamp(min=0.0)
    return (p_d - p_t).abs().sum(-1) + (tail_d - tail_t).abs()


@dataclass
class LossSums:
    """Weighted sums (not yet divided by Σw) so a batch split over several forwards can share one
    denominator, as DeepSpec's all-reduced Σw."""

    ce: torch.Tensor
    tv: torch.Tensor
    conf: torch.Tensor
    weight: float
    # diagnostics (no grad): per-slot Σ expected acceptance and counts, Σ tau_probabilistic, blocks
    slot_accept: torch.Tensor
    slot_count: torch.Tensor
    tau_prob: float
    blocks: int


def dspark_loss_sums(
    logits: torch.Tensor,
    conf_logits: torch.Tensor | None,
    labels: torch.Tensor,
    weights: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_probs: torch.Tensor,
    vocab_columns: torch.Tensor | None = None,
) -> LossSums:
    """logits [N, B, V] (draft: base + Markov bias), conf_logits [N, B] or None, labels/weights
    [N, B], topk_ids/topk_probs [N, B, K] (target p_t for each slot's next token).

    With a draft vocabulary, logits are [N, B, V'] over its ids and `vocab_columns` [V]
    (`vocab_index(ids, V)`) maps a token id to its column (-1 outside). The draft then puts no mass outside V', exactly as served: the
    L1 term counts the target's mass there as unmatched, and CE skips labels the draft cannot write
    (their slot still trains L1 and confidence, whose label is then low, as it should be).

    Only slots with weight > 0 enter the softmax (the rest are masked anyway)."""
    n, block = weights.shape
    sel = weights.reshape(-1) > 0
    w = weights.reshape(-1)[sel]
    logp = F.log_softmax(logits.reshape(n * block, -1)[sel].float(), dim=-1)
    labels = labels.reshape(-1)[sel]
    topk_ids = topk_ids.reshape(n * block, -1)[sel].long()
    p_d = logp.exp()
    if vocab_columns is None:
        ce = -logp.gather(-1, labels[:, None]).squeeze(-1)
    else:
        col = vocab_columns[labels]
        ce = -logp.gather(-1, col.clamp(min=0)[:, None]).squeeze(-1) * (col >= 0)
        # one zero column stands for every id outside the draft vocabulary
        p_d = torch.cat([p_d, p_d.new_zeros(p_d.shape[0], 1)], dim=-1)
        cols = vocab_columns[topk_ids]
        topk_ids = torch.where(cols >= 0, cols, p_d.shape[1] - 1)
    l1 = sparse_l1(p_d, topk_ids, topk_probs.reshape(n * block, -1)[sel])
    soft = (1.0 - 0.5 * l1).clamp(0.0, 1.0).detach()
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.reshape(-1)[sel].float(), soft, reduction="none")
        conf = (w * bce).sum()
    else:
        conf = logits.new_zeros((), dtype=torch.float32)

    # Diagnostics: expected acceptance per slot and tau_probabilistic = 1 + Σ_j Π_{i≤j} acc_i.
    acc = torch.zeros(n * block, device=logits.device)
    acc[sel] = soft
    acc = acc.view(n, block)
    mask = (weights > 0).float()
    block_valid = mask[:, 0] > 0
    survival = (acc * mask).cumprod(-1)
    return LossSums(
        ce=(w * ce).sum(),
        tv=(w * l1).sum(),
        conf=conf,
        weight=float(w.sum()),
        slot_accept=(acc * mask).sum(0).cpu(),
        slot_count=mask.sum(0).cpu(),
        tau_prob=float((1.0 + survival.sum(-1))[block_valid].sum()),
        blocks=int(block_valid.sum()),
    )


def vocab_index(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft vocabulary ids [V'] -> [V] map from token id to column, -1 outside."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=ids.device)
    index[ids] = torch.arange(ids.numel(), device=ids.device)
    return index


def combine(sums: LossSums, denominator: float, alphas: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted means over the batch's shared denominator and the total loss."""
    d = denominator + 1e-6
    ce, tv, conf = sums.ce / d, sums.tv / d, sums.conf / d
    total = alphas.ce * ce + alphas.tv * tv + alphas.conf * conf
    return total, {k: float(v.detach()) for k, v in (("ce", ce), ("tv", tv), ("conf", conf), ("loss", total))}
