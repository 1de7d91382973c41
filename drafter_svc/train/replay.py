"""Greedy acceptance without running the decode loop: replay the rounds on the target's own path.

With greedy verification the committed output is the target's greedy continuation whatever the
drafter proposes, and a block drafted at anchor position `a` depends only on the target features
of positions < a and on the anchor token. So the rounds of a fixed-block greedy run can be replayed
exactly from (1) the target's greedy continuation, (2) one target forward over prompt +
continuation for the features, and (3) one batched drafter forward over every anchor of the
continuation (the backbone input of a block is anchor + masks, so teacher forcing the blocks on the
path is what the draft engine computes while the drafts stay on it; the sequential head is then run
greedily from the draft's own previous token, exactly as `DraftEngine` does). The round walk
(`replay_rounds`) follows `DecodeLoop`'s rules: the first token comes from the prefill, a round
verifies min(block, max_new_tokens − len(output) − 1) drafts, an accepted stop token ends the round
without a bonus token.

Why: one target forward + one drafter forward per prompt instead of ~40 sequential rounds, which is
what makes a 50-prompt × 128-token table fit a 2-core machine. The replay equals the loop up to
floating-point near-ties between the batched paths and the loop's incremental forwards;
`tests/test_training.py` checks round-for-round equality against `DecodeLoop` on a tiny model and
the `path_mismatches` count reports positions where the prefill's argmax disagrees with the
generated path (0 expected)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from drafter_svc.draft_vocab import DraftHeads
from drafter_svc.dspark_model import DSparkDrafter, DSparkTrainOutput


@dataclass
class GreedyPath:
    prompt_ids: list[int]
    tokens: list[int]  # the target's greedy continuation (ends at a stop token or the budget)
    features: torch.Tensor  # [len(prompt) + len(tokens), T*d] target features along the path
    path_mismatches: int = 0  # positions where the full forward's argmax differs from `tokens`


@torch.inference_mode()
def greedy_drafts(model: DSparkDrafter, out: DSparkTrainOutput, anchor_tokens: torch.Tensor):
    """Blocks drafted greedily from a teacher-forced `forward_train` output of one sequence ->
    (drafts [N, B], confidence logits [N, B] or None). Slot k takes the argmax of base logits +
    Markov bias of the draft's own token k−1 (the anchor for slot 0), as the draft engine does —
    with the engine's own vocabulary projections (`DraftHeads`: over the draft vocabulary when the
    model has one), from the backbone's hidden states. Only `out.hidden` is read, so callers pass
    `vocab_ids=model.draft_vocab` to `forward_train` and skip its full-vocabulary logits (the
    largest cost of a calibration or replay)."""
    heads = DraftHeads(model, model.draft_vocab)
    h = out.hidden[0]  # [N, B, d]
    base = heads.logits(h)  # [N, B, V'] by draft-vocabulary slot
    prev = anchor_tokens
    state = None
    drafts, confs = [], []
    for k in range(model.config.block_size):
        z, state = model.markov_features(prev, h[:, k], state)
        logits_k = base[:, k] if z is None else base[:, k] + heads.markov_bias(z)
        confs.append(model.confidence_logits(h[:, k], prev))
        prev = heads.token_ids(logits_k.argmax(-1))
        drafts.append(prev)
    conf = torch.stack(confs, 1) if confs[0] is not None else None
    return torch.stack(drafts, 1), conf


@torch.inference_mode()
def greedy_paths(target, prompts: Sequence[list[int]], *, max_new_tokens: int, stop_ids: Iterable[int],
                 layer_ids: Sequence[int], batch_size: int = 16, pad_id: int = 0) -> list[GreedyPath]:
    """The target's greedy continuation of each prompt (batched, left-padded generation) and its
    features along prompt + continuation (right-padded forward)."""
    from drafter_svc.train.cache import target_outputs
    from drafter_svc.train.data import Sequence as TrainSequence
    from drafter_svc.train.datagen import left_padded

    stops = sorted(set(stop_ids))
    out: list[GreedyPath] = []
    for b in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[b : b + batch_size]]
        ids, mask = left_padded(batch, pad_id)
        width = ids.shape[1]
        gen = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=stops, pad_token_id=pad_id)
        conts = []
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            conts.append(row[: cut + 1] if cut is not None else row)
        seqs = [TrainSequence(str(i), p + c, [0] * len(p) + [1] * len(c)) for i, (p, c) in enumerate(zip(batch, conts))]
        for p, c, (feats, top_ids, _) in zip(batch, conts, target_outputs(target, list(layer_ids), seqs, 1, torch.float32)):
            # fp32 as the decode loop hands them to the drafter (fp16 rounding of SmolLM2's ~1e4
            # activations moves draft logits by tenths)
            # the argmax at position P+i−1 predicts continuation token i (i ≥ 1: token 0 is the prefill's)
            pred = top_ids[len(p) : len(p) + len(c) - 1, 0].tolist()
            mismatches = sum(int(x != y) for x, y in zip(pred, c[1:]))
            out.append(GreedyPath(p, c, feats, mismatches))
    return out


def replay_rounds(drafts: list[list[int]], tokens: list[int], *, blocks: list[int], max_new_tokens: int,
                  stop_ids: Iterable[int]):
    """Walk DecodeLoop's fixed-block greedy rounds over a path. drafts[i] is the block drafted with
    tokens[i] as anchor, verified up to blocks[i] tokens. Returns evaluate.RoundOutcome per round."""
    from drafter_svc.train.evaluate import RoundOutcome

    stops = set(stop_ids)
    outcomes = []
    i = 0
    while i < len(tokens):
        if tokens[i] in stops or i + 1 >= max_new_tokens:
            break
        n = max(0, min(blocks[i], max_new_tokens - (i + 1) - 1, len(drafts[i])))  # a copy may be shorter
        m = 0
        while m < n and i + 1 + m < len(tokens) and drafts[i][m] == tokens[i + 1 + m]:
            m += 1
        stop_at = next((j for j in range(m) if tokens[i + 1 + j] in stops), None)
        if stop_at is not None:  # an accepted stop token ends the round, no correction
            outcomes.append(RoundOutcome(n, stop_at + 1, stop_at + 1, True))
            break
        if i + 1 + m >= len(tokens):  # the path ends here (cannot happen for a complete path)
            break
        outcomes.append(RoundOutcome(n, m, m + 1))
        i += m + 1
    return outcomes


@torch.inference_mode()
def replay_path(model: DSparkDrafter, path: GreedyPath, *, block_size: int, max_new_tokens: int,
                stop_ids: Iterable[int], lookup=None):
    """Rounds of one prompt: one drafter forward over every anchor of the continuation. With
    `lookup` (a LookupConfig), an anchor whose suffix recurs drafts the copy instead, as the decode
    loop does: up to the drafter's full block whatever `block_size` (the loop sizes copies by its
    scheduler, not by the draft length), kept whole — exact when the scheduler keeps whole copies,
    i.e. when verifying the block costs about what one token does."""
    p = len(path.prompt_ids)
    ids = torch.tensor(path.prompt_ids + path.tokens, dtype=torch.long)
    n_anchor = len(path.tokens) - 1
    if n_anchor <= 0:
        return []
    anchors = torch.arange(p, p + n_anchor)
    keep = torch.ones(n_anchor, dtype=torch.bool)
    if block_size > model.config.block_size:
        raise ValueError(f"block size {block_size} exceeds the drafter's {model.config.block_size}")
    out = model.forward_train(path.features[None].to(model.dtype), ids[None], anchors[None], keep[None],
                              model.draft_vocab)
    drafts, _ = greedy_drafts(model, out, ids[anchors])
    drafts = drafts.tolist()
    blocks = [block_size] * n_anchor
    if lookup is not None:
        from verifier_svc.ngram_lookup import NgramIndex

        index = NgramIndex(lookup, path.prompt_ids)
        for i in range(n_anchor):  # the anchor tokens[i] ends the context of round i
            index.extend([path.tokens[i]])
            copy, _ = index.lookup(model.config.block_size)
            if copy:
                drafts[i], blocks[i] = copy, model.config.block_size
    return replay_rounds(drafts, path.tokens, blocks=blocks, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
