"""`dspark train fit`: the DSpark training loop over a target cache (reference §4.6).

AdamW (torch default betas/eps, weight decay 0) on the trainable parameters only (embed_tokens and
lm_head stay frozen copies of the target), lr warmup over the first 4% of steps then cosine to 0,
grad-norm clip 1.0. One optimizer step = `batch_seqs` sequences, each run as its own forward (no
padding, no dummy blocks) with the loss terms divided by the batch's total weight Σw (DeepSpec's
shared denominator).

The run directory holds `config.json` (the draft config), `fit_options.json`, `log.jsonl` (one
line per step), `state/training_state.pt` (trainable weights, optimizer, RNG states, step, data
order: a restart resumes exactly where the last checkpoint was; with watched cache patterns also
`state/caches.json`, the directories in the positions its keys name) and `loss_curves.png`."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dspark_common.errors import FailedPrecondition
from drafter_svc import draft_vocab
from drafter_svc.config import DSparkConfig
from drafter_svc.dspark_model import DSparkDrafter
from drafter_svc.train.cache import MANIFEST, CacheReader, CachedSequence
from drafter_svc.train.objective import (
    LossWeights,
    block_targets,
    combine,
    dspark_loss_sums,
    sample_anchors,
    vocab_index,
)

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "training_state.pt"
CACHES_FILE = "caches.json"  # watched caches, in the positions the state's keys name
LOG_FILE = "log.jsonl"


@dataclass
class FitOptions:
    steps: int = 600
    batch_seqs: int = 4
    num_anchors: int = 48
    layers: int = 2
    markov_rank: int = 64
    markov_head_type: str = "vanilla"
    block_size: int = 7
    lr: float = 6e-4
    warmup_frac: float = 0.04
    clip: float = 1.0
    alpha_ce: float = 0.1
    alpha_tv: float = 0.9
    alpha_conf: float = 1.0
    seed: int = 42
    ckpt_every: int = 50
    device: str = "cpu"  # e.g. cuda: where the drafter trains (data is prepared on the CPU)
    mask_token_id: int | None = None
    init_from: str = ""  # an exported drafter to continue from (fresh optimizer and lr schedule)
    # a directory holding draft_vocab.safetensors: train the logits over that vocabulary only, as
    # served (drafter_svc/draft_vocab.py); the head's cost drops by V/V' (6x for 8192 of 49152)
    draft_vocab: str = ""

    # options that change what is trained; a resume must not change them. `steps` may grow: the
    # cosine then stretches over the new total (continuing a run on more data / more compute).
    MODEL_KEYS = ("batch_seqs", "num_anchors", "layers", "markov_rank", "markov_head_type", "block_size",
                  "lr", "warmup_frac", "clip", "alpha_ce", "alpha_tv", "alpha_conf", "seed", "mask_token_id", "init_from", "draft_vocab")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has it: the per-parameter loop of the default implementation costs
    ~4x more on CPU (130 vs 30 ms a step for this drafter, a third of a whole step)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def lr_at(step: int, opts: FitOptions) -> float:
    """Linear warmup over ceil(warmup_frac·steps) steps, then cosine to 0 at `steps`."""
    warm = max(1, math.ceil(opts.warmup_frac * opts.steps))
    if step < warm:
        return opts.lr * (step + 1) / warm
    progress = (step - warm) / max(1, opts.steps - warm)
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def draft_config(target_config, layer_ids: list[int], opts: FitOptions) -> DSparkConfig:
    from drafter_svc.loading import SMOLLM2_MASK_TOKEN_ID

    mask = opts.mask_token_id
    if mask is None:
        vocab = int(target_config.vocab_size)
        mask = SMOLLM2_MASK_TOKEN_ID if vocab == 49152 else vocab - 1
    return DSparkConfig.from_target(
        target_config, num_hidden_layers=opts.layers, target_layer_ids=list(layer_ids), block_size=opts.block_size,
        mask_token_id=mask, markov_rank=opts.markov_rank, markov_head_type=opts.markov_head_type,
        enable_confidence_head=True, num_anchors=opts.num_anchors,
    )


def build_model(config: DSparkConfig, target, seed: int) -> DSparkDrafter:
    torch.manual_seed(seed)
    model = DSparkDrafter(config)
    model.init_from_target(target.get_input_embeddings().weight.detach().float(),
                           target.get_output_embeddings().weight.detach().float(), freeze=True)
    return model


# what must agree between a run and the drafter it continues from
WARM_START_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                   "vocab_size", "block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type",
                   "enable_confidence_head")


def warm_start(model: DSparkDrafter, directory: str | Path) -> None:
    """Copy an exported drafter's trainable weights into a fresh run's model: continuing a trained
    drafter on new data or more compute instead of starting over. The frozen embed/lm_head stay the
    target's; the architecture must match exactly."""
    from drafter_svc.checkpoint import load_config, read_weights

    src = load_config(directory)
    for key in WARM_START_KEYS:
        mine, theirs = getattr(model.config, key, None), getattr(src, key, None)
        if mine != theirs:
            raise FailedPrecondition(f"cannot initialise from {directory}: its {key} is {theirs!r}, this run's {mine!r}")
    tensors = read_weights(Path(directory))
    params = dict(model.named_parameters())
    trainable = sorted(n for n, p in params.items() if p.requires_grad)
    missing = [n for n in trainable if n not in tensors or tuple(tensors[n].shape) != tuple(params[n].shape)]
    if missing:
        raise FailedPrecondition(f"cannot initialise from {directory}: missing or mis-shaped {missing}")
    with torch.no_grad():
        for n in trainable:
            params[n].copy_(tensors[n].to(params[n].dtype))


def trainable_state(model: DSparkDrafter) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n in names}


def load_draft_vocab(opts: FitOptions, vocab_size: int) -> torch.Tensor | None:
    """The run's draft vocabulary ids (None: train over all V)."""
    if not opts.draft_vocab:
        return None
    ids = draft_vocab.load(opts.draft_vocab, vocab_size)
    if ids is None:
        raise FailedPrecondition(f"--draft-vocab {opts.draft_vocab}: no {draft_vocab.VOCAB_FILE} there")
    return ids


def run_draft_vocab(opts: FitOptions, run_dir: Path, vocab_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The run's draft vocabulary on its device and the id -> column index (None, None: all V). The run
    keeps its own copy of the vocabulary file: the source (often the export target) may be overwritten."""
    ids = load_draft_vocab(opts, vocab_size)
    if ids is None:
        return None, None
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(opts.draft_vocab) / draft_vocab.VOCAB_FILE, run_dir / draft_vocab.VOCAB_FILE)
    ids = ids.to(opts.device)
    return ids, vocab_index(ids, vocab_size)


def sequence_sums(model: DSparkDrafter, seq: CachedSequence, anchors, keep, labels, weights,
                  vocab_ids: torch.Tensor | None = None, index: torch.Tensor | None = None):
    """Forward one cached sequence's blocks and return the loss sums. Data is prepared on the CPU
    and moved to the model's device here (a no-op on the CPU)."""
    dev = model.device
    block = model.config.block_size
    pos = (anchors[:, None] + torch.arange(block)[None, :]).clamp(max=seq.input_ids.shape[0] - 1)
    out = model.forward_train(seq.features[None].to(dev).float(), seq.input_ids[None].to(dev), anchors[None].to(dev),
                              keep[None].to(dev), vocab_ids)
    conf = out.confidence_logits[0] if out.confidence_logits is not None else None
    return dspark_loss_sums(out.logits[0], conf, labels.to(dev), weights.to(dev), seq.topk_ids[pos].to(dev),
                            seq.topk_probs[pos].to(dev), index)


def is_pattern(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def matching_caches(patterns: list[str]) -> list[Path]:
    """The directories matching the globs of `patterns` that a cache build has begun in (manifest
    written), and its plain paths as they are (a missing cache there is an error, not a wait), each
    once, in pattern order, then name order."""
    out: list[Path] = []
    for pattern in patterns:
        found = [Path(d) for d in sorted(glob.glob(pattern)) if (Path(d) / MANIFEST).is_file()] \
            if is_pattern(pattern) else [Path(pattern)]
        out += [d for d in found if d not in out]
    return out


class Trainer:
    def __init__(self, target, cache_dir: str | Path | list[str | Path], run_dir: str | Path, opts: FitOptions,
                 *, progress: bool = True) -> None:
        self.run_dir = Path(run_dir)
        items = [cache_dir] if isinstance(cache_dir, (str, Path)) else list(cache_dir)
        # Glob patterns are watched: a directory that comes to match one (a cache build beside the
        # fit) joins the running epoch at the next checkpoint, with no restart.
        self.cache_patterns = [str(c) for c in items] if any(is_pattern(str(c)) for c in items) else []
        self._skipped_caches: set[Path] = set()
        if self.cache_patterns:
            recorded = self.state_path.parent / CACHES_FILE
            dirs = [Path(d) for d in json.loads(recorded.read_text())] if recorded.is_file() else []
            dirs = [d for d in dirs if (d / MANIFEST).is_file()]
            dirs += [d for d in matching_caches(self.cache_patterns) if d not in dirs]
            if not dirs:
                raise FailedPrecondition(f"no target cache matches {' '.join(self.cache_patterns)}")
            self.reader = CacheReader(dirs[:1], "train", prefixed=True)
            self._discover_caches(dirs[1:])
            self.reader.refresh("train")
        else:
            self.reader = CacheReader(items, "train")
        if len(self.reader) == 0:
            raise FailedPrecondition(f"the target cache {cache_dir} has no training sequences")
        self.opts = opts
        self.progress = progress
        layer_ids = self.reader.manifest["target_layer_ids"]
        self.config = draft_config(target.config, layer_ids, opts)
        self.model = build_model(self.config, target, opts.seed).to(opts.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, opts.lr)
        self.alphas = LossWeights(opts.alpha_ce, opts.alpha_tv, opts.alpha_conf)
        self.vocab_ids, self.vocab_index = run_draft_vocab(opts, self.run_dir, self.config.vocab_size)
        self.step = 0
        self.epoch = 0
        self.order: list[str] = []
        self.pos = 0
        self.anchor_gen = torch.Generator().manual_seed(opts.seed)
        self._resume_or_init()

    # ---------------------------------------------------------------- state

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_DIR / STATE_FILE

    def _resume_or_init(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        opts_path = self.run_dir / "fit_options.json"
        if self.state_path.is_file():
            old = json.loads(opts_path.read_text()) if opts_path.is_file() else {}
            changed = [k for k in FitOptions.MODEL_KEYS if k in old and old[k] != getattr(self.opts, k)]
            if changed:
                raise FailedPrecondition(f"cannot resume {self.run_dir}: options changed {changed}")
            state = torch.load(self.state_path, weights_only=False, map_location="cpu")
            if state.get("averaged"):
                raise FailedPrecondition(f"{self.run_dir} holds averaged weights (dspark train average): "
                                         "an end point to calibrate and export, not a fit to resume")
            self.model.load_state_dict(state["model"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.epoch, self.order, self.pos = state["step"], state["epoch"], state["order"], state["pos"]
            self.anchor_gen.set_state(state["anchor_rng"])
            torch.set_rng_state(state["torch_rng"])
            random.setstate(state["py_rng"])
            log.info("resumed %s at step %d", self.run_dir, self.step)
            gone = [k for k in self.order[self.pos:] if k not in self.reader.index]
            if gone:  # the caches given now differ from those of the checkpoint (keys name positions)
                log.warning("%d keys of the checkpoint's epoch order are not in the caches given now "
                            "(e.g. %s): starting a new order over these caches", len(gone), gone[0])
                self.order, self.pos = [], 0
            elif self.order:
                self._admit_fresh_keys()
            # log lines past the checkpoint belong to steps that will be redone
            self._truncate_log(self.step)
        else:
            (self.run_dir / LOG_FILE).unlink(missing_ok=True)
            if self.opts.init_from:
                warm_start(self.model, self.opts.init_from)
                log.info("initialised %s from %s", self.run_dir, self.opts.init_from)
        opts_path.write_text(json.dumps(self.opts.to_dict(), indent=2))
        (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True))

    def _admit_fresh_keys(self) -> None:
        # A cache build beside the fit adds sequences while an epoch runs; the epoch's order was fixed
        # when it began, so without this they would wait for the next epoch, which a run's last epoch
        # never reaches (the seventeenth session lost seed 12's last caches that way). They join the
        # unread part of the current epoch, shuffled in: new shards at the next checkpoint, new
        # directories (named only at launch) at the restart that names them.
        queued = set(self.order)
        fresh = [k for k in self.reader.keys if k not in queued]
        if not fresh:
            return
        g = torch.Generator().manual_seed(self.opts.seed * 100_003 + self.epoch * 1_009 + self.pos)
        rest = self.order[self.pos:] + fresh
        self.order = self.order[: self.pos] + [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
        log.info("%d train sequences joined epoch %d at step %d (%d left in it)",
                 len(fresh), self.epoch, self.step, len(rest))

    def _discover_caches(self, candidates: list[Path] | None = None) -> None:
        # the reader reads what joins at its next refresh (the caller's)
        if not self.cache_patterns:
            return
        for d in matching_caches(self.cache_patterns) if candidates is None else candidates:
            if d in self.reader.directories or d in self._skipped_caches:
                continue
            try:
                self.reader.add_directory(d)
            except FailedPrecondition as e:  # e.g. another target's cache: the fit goes on without it
                self._skipped_caches.add(d)
                log.warning("not reading %s: %s", d, e)
                continue
            log.info("reading cache %s (position %d)", d, len(self.reader.directories) - 1)

    def _truncate_log(self, step: int) -> None:
        path = self.run_dir / LOG_FILE
        if path.is_file():
            keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            path.write_text("".join(l + "\n" for l in keep))

    def save_state(self) -> Path:
        path = self.state_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.cache_patterns:  # before the state: the list only grows, so it always covers its keys
            recorded = path.parent / CACHES_FILE
            recorded.with_suffix(".tmp").write_text(json.dumps([str(d) for d in self.reader.directories], indent=1))
            recorded.with_suffix(".tmp").rename(recorded)
        tmp = path.with_suffix(".tmp")
        torch.save({
            "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "order": self.order, "pos": self.pos,
            "anchor_rng": self.anchor_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "py_rng": random.getstate(), "options": self.opts.to_dict(), "config": self.config.to_dict(),
        }, tmp)
        tmp.rename(path)
        return path

    # ---------------------------------------------------------------- data

    def _next_key(self) -> str:
        if self.pos >= len(self.order):
            if self.order:
                self.epoch += 1
            self.reader.refresh("train")  # pick up shards a concurrent cache build added
            g = torch.Generator().manual_seed(self.opts.seed * 100_003 + self.epoch)
            keys = self.reader.keys
            self.order = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
            self.pos = 0
            # the fifteenth session's run read ~1 300 sequences 6 times and overfit: make the data volume
            # visible where the run is watched
            log.info("epoch %d at step %d: %d train sequences", self.epoch, self.step, len(keys))
        key = self.order[self.pos]
        self.pos += 1
        return key

    # ---------------------------------------------------------------- training

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        block = self.config.block_size
        batch = []
        for _ in range(self.opts.batch_seqs):
            seq = self.reader.get(self._next_key())
            anchors, keep = sample_anchors(seq.loss_mask, self.opts.num_anchors, self.anchor_gen, pad=False)
            labels, _, weights = block_targets(seq.input_ids, seq.loss_mask, anchors, keep, block)
            batch.append((seq, anchors, keep, labels, weights))
        denominator = sum(float(w.sum()) for *_, w in batch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.opts)
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"ce": 0.0, "tv": 0.0, "conf": 0.0, "loss": 0.0}
        slot_acc = torch.zeros(block)
        slot_n = torch.zeros(block)
        tau_sum, blocks = 0.0, 0
        for seq, anchors, keep, labels, weights in batch:
            sums = sequence_sums(self.model, seq, anchors, keep, labels, weights, self.vocab_ids, self.vocab_index)
            loss, parts = combine(sums, denominator, self.alphas)
            loss.backward()
            for k in totals:
                totals[k] += parts[k]
            slot_acc += sums.slot_accept
            slot_n += sums.slot_count
            tau_sum += sums.tau_prob
            blocks += sums.blocks
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip))
        self.optimizer.step()
        self.step += 1
        return {
            "step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
            **{k: round(v, 5) for k, v in totals.items()},
            "grad_norm": round(grad_norm, 4),
            "accept_by_slot": [round(float(a / max(n, 1.0)), 4) for a, n in zip(slot_acc, slot_n)],
            "tau_prob": round(tau_sum / max(blocks, 1), 4),
            "blocks": blocks, "sec": round(time.perf_counter() - t0, 3), "time": round(time.time(), 1),
        }

    def fit(self, until: int | None = None) -> list[dict]:
        """Train to `opts.steps` (or `until`), checkpointing every ckpt_every steps and at the end."""
        end = min(self.opts.steps, until or self.opts.steps)
        records = []
        bar = tqdm(total=self.opts.steps, initial=self.step, desc="fit", unit="step", disable=not self.progress)
        with (self.run_dir / LOG_FILE).open("a") as fh:
            while self.step < end:
                rec = self.train_step()
                records.append(rec)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                bar.set_postfix(loss=rec["loss"], tau=rec["tau_prob"], s=rec["sec"])
                bar.update(1)
                if self.step % self.opts.ckpt_every == 0 or self.step == end:
                    if self.order:  # shards (and watched directories) cache builds beside the fit wrote since
                        self._discover_caches()
                        self.reader.refresh("train")
                        self._admit_fresh_keys()
                    self.save_state()
        bar.close()
        return records


def plot_curves(log_path: str | Path, png_path: str | Path, extra: dict[str, str | Path] | None = None,
                label: str = "DSpark") -> Path:
    """Loss terms and tau_probabilistic against step (moving average over 20 steps). `extra`
    maps a label to another run's log to overlay (e.g. the rank-0 ablation)."""
    from matplotlib.figure import Figure

    runs = {label: Path(log_path), **{k: Path(v) for k, v in (extra or {}).items()}}
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    axes = fig.subplots(1, 5)
    for label, path in runs.items():
        if not path.is_file():
            continue
        recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("loss", "ce", "tv", "conf", "tau_prob")):
            vals = [r[key] for r in recs]
            smooth = [sum(vals[max(0, i - 19): i + 1]) / len(vals[max(0, i - 19): i + 1]) for i in range(len(vals))]
            ax.plot(steps, smooth, label=label)
            ax.set_title(key if key != "tau_prob" else "tau_probabilistic (train)", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
    axes[0].legend(fontsize=8)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png", dpi=90)
    return png_path


# ------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FitOptions()
    p.add_argument("--model", default="smollm2", help="target model spec (for the frozen embed/lm_head)")
    p.add_argument("--cache", nargs="+", default=["runs/smollm2/cache"],
                   help="target cache directories (read as one); quoted glob patterns are watched: directories "
                        "that come to match them join the running epoch at the next checkpoint")
    p.add_argument("--out", default="runs/smollm2/fit")
    for f in dataclasses.fields(FitOptions):
        default = getattr(d, f.name)
        kind = {int: int, float: float, str: str}.get(type(default), int)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    p.add_argument("--until", type=int, default=0, help="stop (resumably) after this step")
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from verifier_svc.target_loading import load_target

    torch.set_num_threads(args.threads)
    opts = FitOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FitOptions)})
    target = load_target(args.model)
    trainer = Trainer(target.model, args.cache, args.out, opts)
    del target
    print(f"training {sum(p.numel() for p in trainer.params) / 1e6:.2f}M parameters on "
          f"{len(trainer.reader)} cached sequences, from step {trainer.step} to {opts.steps}")
    trainer.fit(args.until or None)
    plot_curves(Path(args.out) / LOG_FILE, Path(args.out) / "loss_curves.png")
    return 0


def load_run_model(run_dir: str | Path, target=None) -> DSparkDrafter:
    """The drafter of a fit run at its last checkpoint. With `target` the frozen embed/lm_head are
    copied from it; without, they stay random (fine for export, which omits them)."""
    run_dir = Path(run_dir)
    config = DSparkConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    state_path = run_dir / STATE_DIR / STATE_FILE
    if not state_path.is_file():
        raise FailedPrecondition(f"no training state at {state_path}")
    state = torch.load(state_path, weights_only=False, map_location="cpu")
    model = build_model(config, target, 0) if target is not None else DSparkDrafter(config)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if unexpected or set(missing) - {"embed_tokens.weight", "lm_head.weight"}:
        raise FailedPrecondition(f"training state does not match the run config: missing {missing}, "
                                 f"unexpected {unexpected}")
    # drafted (calibration, replay, export) over the vocabulary it was trained for, if any
    model.draft_vocab = draft_vocab.load(run_dir, config.vocab_size)
    return model.eval()
