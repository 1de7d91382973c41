"""`dspark train online`: the DSpark fit with the frozen target beside the drafter, for an accelerator.

The CPU recipe builds a target cache first (~1 s a sequence here) and then trains on one sequence
per step (fit.py). On a GPU the target's forward over a whole batch costs less than reading a cache,
so this trainer runs it every step: answers in (`data/answers/` archives or datagen directories),
a right-padded batch through the target (the chosen layers' outputs and the top-k p_t, rounded to
fp16 exactly as the cache stores them), one batched drafter forward over all the batch's blocks,
the same objective (objective.py), optimizer and draft vocabulary as fit.py.

What differs from fit.py, and why:
- the schedule runs on a wall-clock budget (`--seconds`): warmup over the first `warmup_frac` of it,
  cosine to 0 at its end, so a run fills a lease of fixed length whatever the step time;
- a run is not resumable: it is meant to finish inside one lease (it checkpoints the weights at the
  end, and every `--save-every` seconds, so a run cut short still leaves its last weights);
- held-out τ_prob (the heldout split of the same answers, never eval/) is scored at the start, at the
  end, and for each interpolation α with the initial drafter (average.py's WiSE-FT), on the GPU.

The run directory is a fit run directory (config.json, fit_options.json, log.jsonl,
state/training_state.pt with the trainable weights), so `average`, `calibrate` and `export` take it."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from drafter_svc.dspark_model import DSparkDrafter
from drafter_svc.train.average import interpolate
from drafter_svc.train.cache import DEFAULT_TOP_K, as_cached_features, padded_forward, target_topk
from drafter_svc.train.data import Sequence, read_answers
from drafter_svc.train.fit import (
    LOG_FILE,
    STATE_DIR,
    STATE_FILE,
    FitOptions,
    adamw,
    build_model,
    draft_config,
    run_draft_vocab,
    trainable_state,
    warm_start,
)
from drafter_svc.train.objective import LossWeights, block_targets, combine, dspark_loss_sums, sample_anchors
from dspark_common.errors import FailedPrecondition, InvalidRequest

log = logging.getLogger(__name__)

# FitOptions fields a time-budgeted run has no use for (no step count, no resumable checkpoints; the
# mask token is the target's default)
NOT_OPTIONS = ("mask_token_id", "steps", "ckpt_every")


@dataclass
class OnlineOptions(FitOptions):
    seconds: float = 300.0  # the wall-clock budget of the training loop (the lr schedule spans it)
    save_every: float = 120.0  # seconds between weight checkpoints
    max_length: int = 560  # the cache's length cap (cache.py --max-length)
    top_k: int = DEFAULT_TOP_K
    heldout_limit: int = 0  # score at most this many held-out sequences (0: all)
    alphas: str = "0.25 0.5 0.75 1.0"  # interpolations with the init scored at the end ("" : none)


def load_sequences(patterns: list[str], max_length: int) -> tuple[list[Sequence], list[Sequence]]:
    """(train, heldout) sequences of every answers file or datagen directory matching `patterns`.
    Keys repeat across seeds (the same prompt answered again); each answer is its own sequence, and
    the key-hashed split keeps a held-out prompt held out in every seed."""
    paths = [p for pat in patterns for p in (sorted(glob.glob(pat)) or [pat])]
    seqs = [s for p in paths for s in read_answers(p, max_length=max_length)]
    if not seqs:
        raise FailedPrecondition(f"no answers match {' '.join(patterns)}")
    train = [s for s in seqs if s.split == "train"]
    held = [s for s in seqs if s.split == "heldout"]
    return train, held


@torch.no_grad()
def target_batch(target, layer_ids: list[int], seqs: list[Sequence], top_k: int) -> dict[str, torch.Tensor]:
    """One right-padded target forward over `seqs` on the target's device -> the batch tensors the
    drafter trains on: input_ids/loss_mask [b, S], features [b, S, T*d] (fp16-rounded, as cached),
    topk_ids/topk_probs [b, S, K] (the target's p_t of the token after each position whose next token
    is a response token; zeros elsewhere, as cached)."""
    feats, last = padded_forward(target, [s.input_ids for s in seqs], layer_ids)
    dev, (b, width) = feats.device, feats.shape[:2]
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, : len(s.loss_mask)] = torch.tensor(s.loss_mask, dtype=torch.bool)
    ids, mask = ids.to(dev), mask.to(dev)
    need = torch.zeros_like(mask)
    need[:, :-1] = mask[:, 1:]
    top = target_topk(target, last[need], top_k)
    topk_ids = torch.zeros(b, width, top_k, dtype=torch.long, device=dev)
    topk_probs = torch.zeros(b, width, top_k, dtype=torch.float32, device=dev)
    topk_ids[need] = top.indices
    topk_probs[need] = top.values.half().float()
    return {"input_ids": ids, "loss_mask": mask, "features": as_cached_features(feats).float(),
            "topk_ids": topk_ids, "topk_probs": topk_probs}


def batch_sums(model: DSparkDrafter, batch: dict[str, torch.Tensor], lengths: list[int], generators: list[torch.Generator],
               num_anchors: int, vocab_ids: torch.Tensor | None, index: torch.Tensor | None):
    """The DSpark loss sums of one batch in one drafter forward: N anchors per sequence (dummy blocks
    pad the short ones; their weight is 0), the blocks of all sequences flattened into one [b·N, B]
    set, so the loss is fit.py's over the same blocks."""
    block = model.config.block_size
    dev = model.device
    anchors, keeps, labels, weights = [], [], [], []
    ids_cpu, mask_cpu = batch["input_ids"].cpu(), batch["loss_mask"].cpu()
    for i, (n, g) in enumerate(zip(lengths, generators)):
        a, k = sample_anchors(mask_cpu[i, :n], num_anchors, g, pad=True)
        lab, _, w = block_targets(ids_cpu[i, :n], mask_cpu[i, :n], a, k, block)
        anchors.append(a), keeps.append(k), labels.append(lab), weights.append(w)
    anchors, keeps = torch.stack(anchors).to(dev), torch.stack(keeps).to(dev)
    labels, weights = torch.stack(labels).to(dev), torch.stack(weights).to(dev)
    b, n = anchors.shape
    seq_len = batch["input_ids"].shape[1]
    pos = (anchors[:, :, None] + torch.arange(block, device=dev)).clamp(max=seq_len - 1)  # [b, N, B]
    rows = torch.arange(b, device=dev)[:, None, None]
    out = model.forward_train(batch["features"], batch["input_ids"], anchors, keeps, vocab_ids)
    conf = out.confidence_logits.reshape(b * n, block) if out.confidence_logits is not None else None
    return dspark_loss_sums(out.logits.reshape(b * n, block, -1), conf, labels.reshape(b * n, block),
                            weights.reshape(b * n, block), batch["topk_ids"][rows, pos].reshape(b * n, block, -1),
                            batch["topk_probs"][rows, pos].reshape(b * n, block, -1), index)


def sequence_generator(key: str, number: int, seed: int) -> torch.Generator:
    """The anchors of a held-out sequence depend on it alone, so every drafter sees the same blocks."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{number}/{key}".encode()))


@torch.no_grad()
def heldout_taus(model: DSparkDrafter, target, layer_ids: list[int], seqs: list[Sequence], opts: OnlineOptions,
                 vocab_ids: torch.Tensor | None, index: torch.Tensor | None,
                 weight_sets: list[dict[str, torch.Tensor]] | None = None, batch_seqs: int = 64) -> list[float]:
    """Held-out τ_prob = 1 + Σ_j Π_{i≤j}(1 − ½ L1_k), micro-averaged over blocks (validate.py's figure),
    of the model with each of `weight_sets` (trainable weights; none: as it is), one target forward per
    batch for all of them. The model keeps the last set's weights."""
    was = model.training
    model.eval()
    sets = [{k: v.to(model.device) for k, v in w.items()} for w in weight_sets] if weight_sets else [None]
    tau, blocks = [0.0] * len(sets), [0] * len(sets)
    for start in range(0, len(seqs), batch_seqs):
        chunk = seqs[start : start + batch_seqs]
        batch = target_batch(target, layer_ids, chunk, opts.top_k)
        for j, weights in enumerate(sets):
            if weights is not None:
                model.load_state_dict(weights, strict=False)
            gens = [sequence_generator(s.key, start + i, 7) for i, s in enumerate(chunk)]
            s = batch_sums(model, batch, [len(q.input_ids) for q in chunk], gens, opts.num_anchors, vocab_ids, index)
            tau[j], blocks[j] = tau[j] + s.tau_prob, blocks[j] + s.blocks
    model.train(was)
    return [t / max(n, 1) for t, n in zip(tau, blocks)]


class OnlineTrainer:
    def __init__(self, target, train: list[Sequence], heldout: list[Sequence], run_dir: str | Path,
                 opts: OnlineOptions, layer_ids: list[int]) -> None:
        if not train:
            raise FailedPrecondition("no training sequences")
        self.target, self.train, self.heldout_seqs, self.opts = target, train, heldout, opts
        self.run_dir = Path(run_dir)
        self.layer_ids = list(layer_ids)
        self.config = draft_config(target.config, self.layer_ids, opts)
        self.model = build_model(self.config, target, opts.seed).to(opts.device).train()
        if opts.init_from:
            warm_start(self.model, opts.init_from)
        self.init_weights = {k: v.detach().cpu().clone() for k, v in trainable_state(self.model).items()}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, opts.lr)
        self.alphas = LossWeights(opts.alpha_ce, opts.alpha_tv, opts.alpha_conf)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_ids, self.index = run_draft_vocab(opts, self.run_dir, self.config.vocab_size)
        self.rng = random.Random(opts.seed)
        self.anchor_gen = torch.Generator().manual_seed(opts.seed)
        self.order: list[int] = []
        self.step = self.epoch = self.seen = 0
        (self.run_dir / "fit_options.json").write_text(json.dumps(opts.to_dict(), indent=2))
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))

    def lr_at(self, progress: float) -> float:
        warm = self.opts.warmup_frac
        if progress < warm:
            return self.opts.lr * max(progress, 1e-3) / warm
        return self.opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warm) / (1.0 - warm))))

    def next_batch(self) -> list[Sequence]:
        out = []
        for _ in range(self.opts.batch_seqs):
            if not self.order:
                self.order = list(range(len(self.train)))
                self.rng.shuffle(self.order)
                self.epoch += 1 if self.seen else 0
            out.append(self.train[self.order.pop()])
        self.seen += len(out)
        return out

    def train_step(self, progress: float) -> dict:
        t0 = time.perf_counter()
        seqs = self.next_batch()
        batch = target_batch(self.target, self.layer_ids, seqs, self.opts.top_k)
        lr = self.lr_at(progress)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = batch_sums(self.model, batch, [len(s.input_ids) for s in seqs], [self.anchor_gen] * len(seqs),
                          self.opts.num_anchors, self.vocab_ids, self.index)
        loss, parts = combine(sums, sums.weight, self.alphas)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip))
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "epoch": self.epoch, "seen": self.seen, "lr": lr,
                **{k: round(v, 5) for k, v in parts.items()}, "grad_norm": round(grad_norm, 4),
                "accept_by_slot": [round(float(a / max(n, 1.0)), 4) for a, n in zip(sums.slot_accept, sums.slot_count)],
                "tau_prob": round(sums.tau_prob / max(sums.blocks, 1), 4), "blocks": sums.blocks,
                "sec": round(time.perf_counter() - t0, 4), "time": round(time.time(), 1)}

    def save(self) -> Path:
        path = self.run_dir / STATE_DIR / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": {k: v.cpu() for k, v in trainable_state(self.model).items()}, "step": self.step,
                    "online": True, "options": self.opts.to_dict(), "config": self.config.to_dict()}, tmp)
        tmp.rename(path)
        return path

    def score_heldout(self, weight_sets: list[dict[str, torch.Tensor]] | None = None) -> list[float]:
        """Held-out τ_prob of the model as it is, or with each of `weight_sets` (it keeps the last)."""
        return heldout_taus(self.model, self.target, self.layer_ids, self.heldout_seqs, self.opts, self.vocab_ids,
                            self.index, weight_sets)

    def fit(self) -> dict:
        """Train for opts.seconds, then score the held-out split for the start, the end and each α."""
        summary: dict = {"train_sequences": len(self.train), "heldout_sequences": len(self.heldout_seqs)}
        if self.heldout_seqs:
            summary["heldout_tau_start"] = round(self.score_heldout()[0], 4)
            log.info("held-out tau_prob at the start: %.4f", summary["heldout_tau_start"])
        start = last_save = time.perf_counter()
        with (self.run_dir / LOG_FILE).open("w") as fh:
            while (elapsed := time.perf_counter() - start) < self.opts.seconds:
                rec = self.train_step(elapsed / self.opts.seconds)
                fh.write(json.dumps(rec) + "\n")
                if self.step % 50 == 0:
                    fh.flush()
                    log.info("step %d epoch %d %.0fs loss %.4f tau %.3f (%.3fs a step)", rec["step"], rec["epoch"],
                             elapsed, rec["loss"], rec["tau_prob"], rec["sec"])
                if time.perf_counter() - last_save > self.opts.save_every:
                    self.save()
                    last_save = time.perf_counter()
        self.save()
        summary.update(steps=self.step, sequences_read=self.seen, epochs=round(self.seen / len(self.train), 2),
                       seconds=round(time.perf_counter() - start, 1))
        if self.heldout_seqs and self.opts.alphas.strip():
            fitted = {k: v.detach().cpu().clone() for k, v in trainable_state(self.model).items()}
            alphas = [float(x) for x in self.opts.alphas.split()]
            taus = self.score_heldout([interpolate(self.init_weights, fitted, a) for a in alphas])
            scores = {str(a): round(t, 4) for a, t in zip(alphas, taus)}
            log.info("held-out tau_prob by alpha: %s", scores)
            self.model.load_state_dict({k: v.to(self.opts.device) for k, v in fitted.items()}, strict=False)
            summary["heldout_tau_by_alpha"] = scores
        (self.run_dir / "online.json").write_text(json.dumps(summary, indent=2))
        return summary


# ------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = OnlineOptions()
    p.add_argument("--model", default="smollm2", help="target model spec (see load_target), or a GGUF file")
    p.add_argument("--answers", nargs="+", default=["data/answers/s*/*/"],
                   help="answers files or datagen directories (quoted globs are expanded here)")
    p.add_argument("--out", default="runs/smollm2/online")
    p.add_argument("--target-layers", type=int, nargs="+", default=None, help="target layer ids (default: the init's)")
    for f in dataclasses.fields(OnlineOptions):
        default = getattr(d, f.name)
        if f.name in NOT_OPTIONS:
            continue
        kind = {int: int, float: float, str: str}.get(type(default), int)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA (the target's forward ~5x faster)")
    p.add_argument("--threads", type=int, default=1)


def load_online_target(spec: str, device: str):
    """The target on `device`. A GGUF path loads through transformers directly (no cache directory,
    no service settings: an accelerator lease starts bare)."""
    if spec.endswith(".gguf"):
        from transformers import AutoModelForCausalLM

        path = Path(spec)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        from verifier_svc.target_loading import load_target

        model = load_target(spec).model
    return model.to(device).eval().requires_grad_(False)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fields = {f.name for f in dataclasses.fields(OnlineOptions)} - set(NOT_OPTIONS)
    opts = OnlineOptions(**{k: getattr(args, k) for k in fields})
    if opts.seconds <= 0 or opts.batch_seqs < 1:
        raise InvalidRequest("--seconds and --batch-seqs must be positive", "seconds")
    torch.manual_seed(opts.seed)
    target = load_online_target(args.model, opts.device)
    layer_ids = args.target_layers
    if layer_ids is None:
        if not opts.init_from:
            raise InvalidRequest("name --target-layers or --init-from (whose target layers the run keeps)", "layers")
        layer_ids = json.loads((Path(opts.init_from) / "config.json").read_text())["target_layer_ids"]
    train, held = load_sequences(args.answers, opts.max_length)
    if opts.heldout_limit:
        held = held[: opts.heldout_limit]
    trainer = OnlineTrainer(target, train, held, args.out, opts, layer_ids)
    print(f"training {sum(p.numel() for p in trainer.params) / 1e6:.2f}M parameters on {len(train)} sequences "
          f"({len(held)} held out) for {opts.seconds:.0f} s on {opts.device}", flush=True)
    summary = trainer.fit()
    print(json.dumps(summary), flush=True)
    return 0


def import_weights(run_dir: str | Path, weight_files: list[str | Path]) -> Path:
    """Rebuild `run_dir/state/training_state.pt` from the 16-bit weight parts a lease sent back
    (gpu_lease.sh: the tool returns files of at most 16 MiB), beside the run's config.json,
    fit_options.json and log.jsonl, so that `average`, `calibrate` and `export` take the run."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FailedPrecondition(f"no config.json in {run_dir}: unpack the lease's runs archive there first")
    tensors: dict[str, torch.Tensor] = {}
    step = 0
    for f in weight_files:
        with safe_open(str(f), framework="pt") as fh:
            step = int((fh.metadata() or {}).get("step", step))
            tensors.update({k: fh.get_tensor(k).float() for k in fh.keys()})
    if not tensors:
        raise InvalidRequest("no weight files given", "weights")
    path = run_dir / STATE_DIR / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": tensors, "step": step, "online": True}, path)
    return path
