"""Sampled acceptance without the accept/reject draws: the decode loop's rounds in expectation,
given one sampled text.

At T > 0 the decode loop's τ is random twice over: the text depends on the accept/reject draws, and
each round's accepted length is a draw. Two drafters are then compared on different texts, and a
50-prompt table moves by ~0.2 between seeds (docs/TRAINING.md, twenty-third session).

Speculative sampling commits text distributed exactly as the target's own samples, whatever the
drafter, so fix one sample x per prompt from the target alone (seeded) and condition on it. A draft y ~ q is
accepted with probability min(1, p(y)/q(y)), else a token is drawn from the residual; so the
emitted token is x with probability p(x), and accepted-and-x with probability min(p(x), q(x)):
**given the text, slot j is accepted with probability a = min(p(x), q(x)) / p(x)**, x the text's
token there. An accepted draft *is* the text's token, so the next slot's sequential head is fed
the text's token (teacher forcing on the path is exact here), and the text after a slot does not
depend on the draws before it (each token is distributed as p given its prefix, however the
rounds fell). So the rounds given the text are a Markov chain over positions: a round anchored at
i accepts m drafts with probability Π_{j≤m} a_ij · (1 − a_i,m+1) and the next starts at i + m + 1.
`expected_walk` carries the probability that a round starts at each position through DecodeLoop's
rules (those of `replay_rounds`) and returns expected rounds and committed tokens; τ is Σ E[committed]
/ Σ E[rounds] over the prompts, the loop's micro-average as a ratio of expectations.

What is left is the choice of texts (50 prompts, one sample each), which is the same for every
drafter: two drafters are compared on the same texts, and one drafter gives the same figure every
time. Over the texts, E[rounds | text] averages to the loop's E[rounds] (tests/test_expected_replay.py
checks it against DecodeLoop at T = 1 on a tiny model). p is the target's processed distribution
(recomputed from its final hidden state along the path, which the path keeps), q the drafter's as
`DraftEngine` samples it (top 8, renormalised). At T = 0 (a ∈ {0, 1}) the walk is exactly
`replay_rounds`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from dspark_common.sampling import processed_probs
from dspark_common.types import SamplingParams
from drafter_svc.draft_vocab import DraftHeads
from drafter_svc.dspark_model import DSparkDrafter

@dataclass
class SampledPath:
    prompt_ids: list[int]
    tokens: list[int]  # one target sample (ends at a stop token or the budget)
    features: torch.Tensor  # [len(prompt) + len(tokens), T*d] fp32 target features along the path
    # [len(tokens) − 1, d] fp32: the target's final-normed hidden state (lm_head input) whose
    # distribution gives tokens 1.. (token 0 is the prefill's); 600x smaller than the distributions
    target_hidden: torch.Tensor


@torch.inference_mode()
def sampled_paths(target, prompts: Sequence[list[int]], *, sampling: SamplingParams, seed: int, max_new_tokens: int,
                  stop_ids: Iterable[int], layer_ids: Sequence[int], batch_size: int = 16,
                  pad_id: int = 0) -> list[SampledPath]:
    """One sample per prompt from the target alone — DecodeLoop at draft length 0, prompt i with seed
    + i, as `dspark eval` seeds the loop — and its `paths_along`. The serving code's own sampling,
    not `generate()`'s: batched, left-padded generation is another numerical path, and its texts
    scored 0.23 τ lower than the loop's on 20 humaneval prompts (twenty-fourth session; about two
    standard errors, but lower on all five eval files), a difference no drafter should be judged by."""
    from dataclasses import replace

    from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
    from verifier_svc.target_engine import TargetEngine

    if sampling.greedy:
        raise ValueError("sampled paths need temperature > 0 (greedy paths: replay.greedy_paths)")
    loop = DecodeLoop(TargetEngine(target, feature_layer_ids=list(layer_ids)), None)
    stops = frozenset(stop_ids)
    conts = [loop.generate(GenerationRequest(list(p), max_new_tokens, replace(sampling, seed=seed + i), 0,
                                             stops)).token_ids for i, p in enumerate(prompts)]
    out: list[SampledPath] = []
    for b in range(0, len(prompts), batch_size):
        out.extend(paths_along(target, prompts[b : b + batch_size], conts[b : b + batch_size], layer_ids=layer_ids,
                               pad_id=pad_id))
    return out


@torch.inference_mode()
def paths_along(target, prompts: Sequence[list[int]], continuations: Sequence[list[int]], *,
                layer_ids: Sequence[int], pad_id: int = 0) -> list[SampledPath]:
    """One right-padded target forward over each prompt + continuation: the features and the final
    hidden states along it."""
    from drafter_svc.train.cache import padded_forward

    feats, last = padded_forward(target, [list(p) + list(c) for p, c in zip(prompts, continuations)],
                                 list(layer_ids), pad_id)
    out = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        n_p, n_c = len(p), len(c)
        # position n_p + r predicts continuation token r + 1
        out.append(SampledPath(list(p), list(c), feats[i, : n_p + n_c].float().contiguous(),
                               last[i, n_p : n_p + n_c - 1].float().contiguous()))
    return out


@torch.inference_mode()
def acceptance_probabilities(model: DSparkDrafter, target_head: torch.nn.Module, path: SampledPath,
                             sampling: SamplingParams, block_size: int, proposal_top_k: int = 8) -> torch.Tensor:
    """a [len(tokens) − 1, block_size]: row i is the block drafted with tokens[i] as anchor, column j
    the probability that speculative sampling accepted its draft j + 1 given that the text's token
    there is tokens[i + j + 1] (its drafts j' < j accepted): min(p, q) / p at that token (0 past the
    path's end). q is what `DraftEngine` samples from: the processed distribution's top
    `proposal_top_k`, renormalised."""
    if block_size > model.config.block_size:
        raise ValueError(f"block size {block_size} exceeds the drafter's {model.config.block_size}")
    n_p, n = len(path.prompt_ids), len(path.tokens)
    n_anchor = n - 1
    if n_anchor <= 0:
        return torch.zeros(0, block_size)
    ids = torch.tensor(path.prompt_ids + path.tokens, dtype=torch.long)
    anchors = torch.arange(n_p, n_p + n_anchor)
    keep = torch.ones(n_anchor, dtype=torch.bool)
    out = model.forward_train(path.features[None].to(model.dtype), ids[None], anchors[None], keep[None],
                              model.draft_vocab)
    heads = DraftHeads(model, model.draft_vocab)
    h = out.hidden[0]  # [N, B, d]
    base = heads.logits(h)
    tokens = torch.tensor(path.tokens, dtype=torch.long)
    p_all = processed_probs(target_head(path.target_hidden), sampling)  # [N, V] by token id
    accept = torch.zeros(n_anchor, block_size)
    prev = ids[anchors]
    state = None
    for k in range(block_size):
        z, state = model.markov_features(prev, h[:, k], state)
        logits = base[:, k] if z is None else base[:, k] + heads.markov_bias(z)
        q, q_cols = processed_probs(logits, sampling).topk(min(proposal_top_k, base.shape[-1]), dim=-1)
        q = (q / q.sum(-1, keepdim=True)).cpu()
        q_ids = heads.token_ids(q_cols).cpu()  # [N, k] token ids
        rows = torch.arange(n_anchor) + k  # target distribution of token i + k + 1
        valid = rows < n_anchor
        rows = rows.clamp(max=n_anchor - 1)
        x = tokens[rows + 1]  # the text's token at slot k + 1
        p_x = p_all[rows].gather(1, x[:, None])[:, 0]
        q_x = torch.where(q_ids == x[:, None], q, torch.zeros(())).sum(-1)
        a = torch.minimum(p_x, q_x) / p_x.clamp(min=1e-30)  # p_x > 0: the target sampled x
        accept[:, k] = torch.where(valid, a, torch.zeros(()))
        prev = x  # an accepted draft is the text's token: the next slot's head sees it
    return accept


@dataclass
class ExpectedWalk:
    rounds: float
    committed: float  # also Σ E[accepted + bonus]: a round ending on an accepted stop has no bonus
    proposed: float
    hit: list[float]  # by slot k: E[rounds accepting ≥ k]
    reached: list[float]  # E[rounds that verified slot k with all before it accepted]
    offered: list[float]  # E[rounds that verified slot k]


def expected_walk(accept: torch.Tensor | list[list[float]], tokens: list[int], *, block_size: int,
                  max_new_tokens: int, stop_ids: Iterable[int]) -> ExpectedWalk:
    """DecodeLoop's fixed-block rounds over a fixed path (`replay_rounds`' rules) in expectation:
    `accept[i][j]` is the probability that the round anchored at tokens[i] accepts draft j + 1."""
    stops = set(stop_ids)
    n = len(tokens)
    b = [list(map(float, row)) for row in (accept.tolist() if isinstance(accept, torch.Tensor) else accept)]
    start = [0.0] * (n + block_size + 2)
    start[0] = 1.0  # token 0 is the prefill's; the first round is anchored on it
    w = ExpectedWalk(0.0, 0.0, 0.0, [0.0] * block_size, [0.0] * block_size, [0.0] * block_size)
    for i in range(n):
        r = start[i]
        if r == 0.0 or tokens[i] in stops or i + 1 >= max_new_tokens:
            continue
        if i >= len(b):  # the path ends without a stop token before the budget (an incomplete path)
            break
        # the loop verifies what the budget allows, not knowing where the text ends (a is 0 past it)
        k_max = max(0, min(block_size, max_new_tokens - (i + 1) - 1))
        survive = 1.0  # P(first m drafts accepted)
        for m in range(k_max + 1):
            p_m = survive * ((1.0 - b[i][m]) if m < k_max else 1.0)  # exactly m accepted
            if m < k_max:
                w.offered[m] += r
                w.reached[m] += r * survive
                w.hit[m] += r * survive * b[i][m]
            stop_at = next((j for j in range(m) if tokens[i + 1 + j] in stops), None)
            if stop_at is not None:  # an accepted stop token ends the round and the text, no bonus
                committed = stop_at + 1
            elif i + 1 + m < n:
                committed = m + 1
                start[i + m + 1] += r * p_m
            else:  # accepted past the end of an incomplete path: no round (as replay_rounds)
                committed = 0
            if committed:
                w.rounds += r * p_m
                w.proposed += r * p_m * k_max
                w.committed += r * p_m * committed
            if m < k_max:
                survive *= b[i][m]
    return w


def summarize_walks(walks: list[ExpectedWalk], block_size: int) -> dict:
    """`evaluate.summarize`'s figures from expected walks (ratios of summed expectations)."""
    rounds = sum(w.rounds for w in walks)
    cond, survival = [], []
    for k in range(block_size):
        hit, reached, offered = (sum(getattr(w, f)[k] for w in walks) for f in ("hit", "reached", "offered"))
        cond.append(hit / reached if reached > 1e-12 else None)
        survival.append(hit / offered if offered > 1e-12 else None)
    return {
        "tau": sum(w.committed for w in walks) / rounds if rounds else 0.0,
        # a walk's rounds commit exactly their accepted drafts + bonus (the budget caps the drafts)
        "tau_uncapped": sum(w.committed for w in walks) / rounds if rounds else 0.0,
        "rounds": round(rounds, 2),
        "conditional_acceptance": cond,
        "prefix_survival": survival,
        "mean_proposed": sum(w.proposed for w in walks) / rounds if rounds else 0.0,
    }
