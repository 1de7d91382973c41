"""`dspark train validate`: the training metrics on the caches' held-out split — the check that
more epochs still generalise, which the training curve (sequences seen before) cannot show.

For a fit run (its last checkpoint) or an exported drafter: per held-out sequence up to N anchors
(drawn with a seed of the sequence's own, so two drafters — and two orders of the same caches — see
the same blocks), the DSpark loss terms and tau_probabilistic = 1 + Σ_j Π_{i≤j} (1 − ½ L1_k), over
the drafter's draft vocabulary when it has one (as served)."""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch

from drafter_svc.dspark_model import DSparkDrafter
from drafter_svc.train.cache import CacheReader
from drafter_svc.train.fit import load_run_model, sequence_sums
from drafter_svc.train.objective import block_targets, sample_anchors, vocab_index


def anchor_seed(reader: CacheReader, key: str, seed: int) -> int:
    """A seed per sequence from its cache directory and unprefixed key, not from its position in the
    reading order: one shared generator made the figures move ~0.02 τ with the order the caches
    were named in (twenty-third session), which is noise a comparison of drafters should not carry."""
    path, _ = reader.index[key]
    plain = key.split(":", 1)[1] if reader.prefixed else key
    name = f"{path.parent.parent.name}/{path.parent.name}/{plain}"
    return seed * 1_000_003 + zlib.crc32(name.encode())


@torch.inference_mode()
def heldout_figures(model: DSparkDrafter, reader: CacheReader, *, num_anchors: int = 48, seed: int = 7) -> dict:
    block = model.config.block_size
    ids = model.draft_vocab
    index = None if ids is None else vocab_index(ids, model.config.vocab_size)
    tau = weight = ce = tv = 0.0
    blocks = 0
    accept, count = torch.zeros(block), torch.zeros(block)
    for key in reader.keys:
        seq = reader.get(key)
        gen = torch.Generator().manual_seed(anchor_seed(reader, key, seed))
        anchors, keep = sample_anchors(seq.loss_mask, num_anchors, gen, pad=False)
        if anchors.numel() == 0:
            continue
        labels, _, weights = block_targets(seq.input_ids, seq.loss_mask, anchors, keep, block)
        s = sequence_sums(model, seq, anchors, keep, labels, weights, ids, index)
        tau, blocks, weight = tau + s.tau_prob, blocks + s.blocks, weight + s.weight
        ce, tv = ce + float(s.ce), tv + float(s.tv)
        accept, count = accept + s.slot_accept, count + s.slot_count
    return {
        "sequences": len(reader), "blocks": blocks,
        "tau_prob": round(tau / max(blocks, 1), 4),
        "ce": round(ce / max(weight, 1e-9), 4), "tv": round(tv / max(weight, 1e-9), 4),
        "accept_by_slot": [round(float(a / max(n, 1.0)), 4) for a, n in zip(accept, count)],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="target model spec (for the frozen embed/lm_head)")
    p.add_argument("--cache", nargs="+", default=["runs/smollm2/cache"], help="target cache directories (read as one)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="fit run directory (its last checkpoint)")
    what.add_argument("--drafter", help="exported drafter directory")
    p.add_argument("--num-anchors", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from drafter_svc.checkpoint import load_checkpoint
    from verifier_svc.target_loading import load_target

    torch.set_num_threads(args.threads)
    target = load_target(args.model).model
    if args.run:
        model = load_run_model(args.run, target)
    else:
        model = load_checkpoint(Path(args.drafter), target_embed=target.get_input_embeddings().weight,
                                target_lm_head=target.get_output_embeddings().weight).eval()
    figures = heldout_figures(model, CacheReader(args.cache, "heldout"), num_anchors=args.num_anchors)
    print(json.dumps({"drafter": args.run or args.drafter, **figures}))
    return 0
