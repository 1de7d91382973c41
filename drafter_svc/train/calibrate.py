"""`dspark train calibrate`: Sequential Temperature Scaling of the confidence head (paper §3.2.1)
on the held-out slice of the training data (data.split_of; never the eval/ prompt sets).

Rounds are emulated from the cache, cheaply and with inference semantics: the backbone's hidden
states of a block do not depend on the drafted tokens (the block input is anchor + masks), so for
every held-out anchor the block is drafted greedily exactly as the draft engine does (x_k = argmax
of base + Markov bias of x_{k−1}; confidence from [h_k ; W1[x_{k−1}]]), and slot k counts as
accepted iff x_k is the target's argmax (cached top-1) — greedy verification, the default mode of
`dspark generate` and of the τ floors. The cached target distribution lies along the *data* path,
so a slot is only scored while every earlier accepted draft token equals the data token; after a
rejection the accepted-prefix indicator is 0 whatever the path, so those rows stay valid.

Writes `calibration.json` (temperatures + calibration_report) and `sts_temperatures` into the run's
config.json (export copies it), and optionally a before/after reliability diagram."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drafter_svc.calibration import calibration_report, fit_sts, plot_reliability
from drafter_svc.dspark_model import DSparkDrafter
from drafter_svc.train.cache import CachedSequence, CacheReader
from drafter_svc.train.objective import block_targets, sample_anchors
from drafter_svc.train.replay import greedy_drafts


@torch.inference_mode()
def greedy_rounds(model: DSparkDrafter, seq: CachedSequence, max_anchors: int = 256,
                  generator: torch.Generator | None = None):
    """Emulated greedy rounds for the anchors of one sequence ->
    (conf_logits [N, B], accepted [N, B], valid [N, B])."""
    gen = generator or torch.Generator().manual_seed(0)
    block = model.config.block_size
    anchors, keep = sample_anchors(seq.loss_mask, max_anchors, gen, pad=False)
    labels, eval_mask, _ = block_targets(seq.input_ids, seq.loss_mask, anchors, keep, block)
    out = model.forward_train(seq.features[None].float(), seq.input_ids[None], anchors[None], keep[None],
                              model.draft_vocab)
    pos = (anchors[:, None] + torch.arange(block)[None, :]).clamp(max=seq.input_ids.shape[0] - 1)
    target_top1 = seq.topk_ids[pos][..., 0]  # [N, B]
    drafts_t, conf = greedy_drafts(model, out, seq.input_ids[anchors])
    accepted = drafts_t == target_top1
    # Off the cached path once an accepted draft token differs from the data token.
    off_path = (accepted & (drafts_t != labels)).to(torch.int64)
    before_off = torch.cat([torch.zeros_like(off_path[:, :1]), off_path[:, :-1].cumsum(1)], 1) == 0
    valid = eval_mask & before_off
    return conf, accepted.to(torch.int64), valid


def collect(model: DSparkDrafter, reader: CacheReader, max_sequences: int = 0, max_anchors: int = 256):
    conf, acc, valid = [], [], []
    gen = torch.Generator().manual_seed(1234)
    keys = reader.keys[:max_sequences] if max_sequences else reader.keys
    for key in keys:
        c, a, v = greedy_rounds(model, reader.get(key), max_anchors, gen)
        conf.append(c)
        acc.append(a)
        valid.append(v)
    return torch.cat(conf), torch.cat(acc), torch.cat(valid)


def calibrate(model: DSparkDrafter, reader: CacheReader, *, max_sequences: int = 0, max_anchors: int = 256,
              plot: str | Path | None = None) -> dict:
    conf, acc, valid = collect(model, reader, max_sequences, max_anchors)
    temps = fit_sts(conf, acc, valid)
    report = calibration_report(conf, acc, valid, temps)
    if plot:
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        plot_reliability(conf, acc, valid, temps, plot)
    return {"temperatures": temps, "rounds": int(conf.shape[0]), "sequences": len(reader.keys[:max_sequences] if
            max_sequences else reader.keys), "acceptance": "greedy (draft argmax == target argmax)",
            "report": report}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="target model spec (frozen embed/lm_head)")
    p.add_argument("--cache", nargs="+", default=["runs/smollm2/cache"], help="target cache directories (read as one)")
    p.add_argument("--run", default="runs/smollm2/fit", help="fit run directory")
    p.add_argument("--max-sequences", type=int, default=0, help="held-out sequences to use (0 = all)")
    p.add_argument("--max-anchors", type=int, default=256, help="blocks per held-out sequence")
    p.add_argument("--plot", default="", help="reliability diagram PNG (default <run>/reliability.png)")
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from drafter_svc.train.fit import load_run_model
    from verifier_svc.target_loading import load_target

    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    model = load_run_model(args.run, target.model)
    reader = CacheReader(args.cache, "heldout")
    run_dir = Path(args.run)
    result = calibrate(model, reader, max_sequences=args.max_sequences, max_anchors=args.max_anchors,
                       plot=args.plot or run_dir / "reliability.png")
    (run_dir / "calibration.json").write_text(json.dumps(result, indent=2))
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sts_temperatures"] = result["temperatures"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    s = result["report"]["summary"]
    print(f"STS on {result['rounds']} held-out blocks: temperatures {[round(t, 3) for t in result['temperatures']]}; "
          f"ECE {100 * s['ece_before']:.2f}% -> {100 * s['ece_after']:.2f}%")
    return 0
