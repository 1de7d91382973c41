"""The target cache (reference §4.1, with one documented deviation): what training needs from the
frozen target, computed once per training sequence.

Per sequence: input_ids, loss_mask, the raw outputs of the `target_layer_ids` layers concatenated
(HF hidden_states[i+1], fp16, [S, T*d]) and — instead of DeepSpec's final-normed hidden state, from
which p_t would be recomputed with the 49152-wide head at every step — the target's top-k
next-token probabilities and ids at temperature 1 for every position whose next token is a
response token (other positions hold zeros). See objective.py for how the L1 term uses them.

Layout: `<dir>/manifest.json` (target, layer ids, widths, k) and shards `shard_<n>.safetensors`
(concatenated rows + `offsets`) each with a `shard_<n>.json` sidecar (keys, splits, lengths) written
after it, so an interrupted build resumes by skipping the keys of complete shards. The target runs
on right-padded batches (causal attention: padding never affects the real positions)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dspark_common.errors import FailedPrecondition, InvalidRequest
from drafter_svc.train.data import Sequence, read_answers

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_TOP_K = 32
# `datagen --cache` writes its shards from index DATAGEN_SHARD_BASE·(shard+1) on, so that datagen
# processes and a `cache` build (below the base) never pick the same shard index.
DATAGEN_SHARD_BASE = 10_000


@dataclass
class CachedSequence:
    key: str
    split: str
    input_ids: torch.Tensor  # [S] long
    loss_mask: torch.Tensor  # [S] bool
    features: torch.Tensor  # [S, T*d] fp16
    topk_ids: torch.Tensor  # [S, K] long: target top-k ids of the token after each position
    topk_probs: torch.Tensor  # [S, K] fp32


FP16_MAX = 65504.0


def as_cached_features(feats: torch.Tensor) -> torch.Tensor:
    """Target features as the cache stores them: fp16, not bf16 (~3 significant digits), clamped to its
    range; SmolLM2's massive activations (~2.5e4) stay inside it."""
    return feats.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def target_topk(model, last_hidden: torch.Tensor, top_k: int):
    """The target's top-k next-token probabilities at temperature 1 from final-normed hidden states
    [..., d] (the lm_head input) -> torch.topk result (values fp32, indices long)."""
    return torch.softmax(model.get_output_embeddings()(last_hidden).float(), dim=-1).topk(top_k, dim=-1)


# no_grad, not inference_mode: `train online` feeds these tensors to a drafter whose autograd saves them
@torch.no_grad()
def padded_forward(model, rows: list[list[int]], layer_ids: list[int], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded target forward over token `rows`, on the model's device -> (features [B, S, T*d]:
    the chosen layers' outputs side by side, final-normed hidden states [B, S, d]: the lm_head input)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    dev = next(model.parameters()).device
    out = model.base_model(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True)
    return torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1), out.last_hidden_state


@torch.inference_mode()
def target_outputs(
    model, layer_ids: list[int], seqs: list[Sequence], top_k: int, feature_dtype: torch.dtype = torch.float16
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One right-padded target forward over `seqs` -> per sequence (features [S, T*d] fp16 (or
    `feature_dtype`), topk_ids [S, K] int32, topk_probs [S, K] fp16)."""
    feats, last = padded_forward(model, [s.input_ids for s in seqs], layer_ids)
    results = []
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        need = torch.zeros(n, dtype=torch.bool)
        need[:-1] = mask[1:]  # positions whose next token is a response token
        pos = need.nonzero().squeeze(-1)
        top = target_topk(model, last[i, pos], top_k)
        k_ids = torch.zeros(n, top_k, dtype=torch.int32)
        k_probs = torch.zeros(n, top_k, dtype=torch.float16)
        k_ids[pos] = top.indices.to(torch.int32)
        k_probs[pos] = top.values.to(torch.float16)
        f = as_cached_features(feats[i, :n]) if feature_dtype == torch.float16 else feats[i, :n].to(feature_dtype)
        results.append((f.contiguous(), k_ids, k_probs))
    return results


def write_shard(directory: Path, index: int, seqs: list[Sequence], outputs) -> Path:
    lengths = [len(s.input_ids) for s in seqs]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    tensors = {
        "offsets": offsets.to(torch.int64),
        "input_ids": torch.tensor([t for s in seqs for t in s.input_ids], dtype=torch.int32),
        "loss_mask": torch.tensor([t for s in seqs for t in s.loss_mask], dtype=torch.uint8),
        "features": torch.cat([o[0] for o in outputs]),
        "topk_ids": torch.cat([o[1] for o in outputs]),
        "topk_probs": torch.cat([o[2] for o in outputs]),
    }
    path = directory / f"shard_{index:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)
    side = {"keys": [s.key for s in seqs], "splits": [s.split for s in seqs], "lengths": lengths}
    tmp_json = directory / f"shard_{index:05d}.json.tmp"
    tmp_json.write_text(json.dumps(side))
    tmp_json.rename(directory / f"shard_{index:05d}.json")
    return path


def completed_shards(directory: Path) -> list[tuple[Path, dict]]:
    out = []
    for side in sorted(directory.glob("shard_*.json")):
        data = side.with_suffix(".safetensors")
        if data.is_file():
            out.append((data, json.loads(side.read_text())))
    return out


def next_shard_index(shards: list[tuple[Path, dict]], lo: int = 0, hi: int = DATAGEN_SHARD_BASE) -> int:
    """The index after the highest of `completed_shards` in [lo, hi) (lo when there is none):
    `cache` builds use [0, base), datagen shard s uses [base·(s+1), base·(s+2))."""
    indices = (int(p.stem.split("_")[1]) for p, _ in shards)
    return 1 + max((i for i in indices if lo <= i < hi), default=lo - 1)


def open_cache(out_dir: str | Path, model, layer_ids: list[int], *, target_name: str, top_k: int,
               max_length: int, answers: str) -> Path:
    """Create the cache directory and its manifest, or check that an existing one was built with the
    same layers, width, k and length cap (shards of different builds must not mix)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "target": target_name,
        "target_layer_ids": list(layer_ids),
        "hidden_size": int(model.config.hidden_size),
        "feature_dtype": "float16",
        "top_k": top_k,
        "max_length": max_length,
        "answers": answers,
        "num_target_layers": int(model.config.num_hidden_layers),
    }
    mpath = out / MANIFEST
    if mpath.is_file():
        old = json.loads(mpath.read_text())
        for k in ("target_layer_ids", "hidden_size", "top_k", "max_length"):
            if old.get(k) != manifest[k]:
                raise FailedPrecondition(f"cache {out} was built with {k}={old.get(k)}, not {manifest[k]}")
    else:
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.rename(mpath)
    return out


def build_cache(
    model,
    answers: str | Path,
    out_dir: str | Path,
    layer_ids: list[int],
    *,
    target_name: str = "",
    top_k: int = DEFAULT_TOP_K,
    max_length: int = 0,
    batch_size: int = 8,
    shard_size: int = 64,
    limit: int = 0,
    progress: bool = True,
    split: str | None = None,
) -> int:
    """Cache every sequence of `answers` not cached yet (of `split` only, if given: e.g. the held-out
    slice that calibrates a drafter trained without a cache); returns how many were added."""
    out = open_cache(out_dir, model, layer_ids, target_name=target_name, top_k=top_k, max_length=max_length,
                     answers=str(answers))
    shards = completed_shards(out)
    done = {k for _, side in shards for k in side["keys"]}
    next_index = next_shard_index(shards)
    todo = [s for s in read_answers(answers, max_length=max_length)
            if s.key not in done and (split is None or s.split == split)]
    if limit:
        todo = todo[: max(0, limit - len(done))]
    # Similar lengths per batch waste less padding; shards stay in length order.
    todo.sort(key=lambda s: len(s.input_ids))
    bar = tqdm(total=len(todo), desc="cache", unit="seq", disable=not progress)
    added = 0
    for start in range(0, len(todo), shard_size):
        chunk = todo[start : start + shard_size]
        outputs = []
        t0 = time.perf_counter()
        for b in range(0, len(chunk), batch_size):
            outputs.extend(target_outputs(model, layer_ids, chunk[b : b + batch_size], top_k))
            bar.update(len(chunk[b : b + batch_size]))
        write_shard(out, next_index, chunk, outputs)
        log.info("shard %d: %d sequences in %.1fs", next_index, len(chunk), time.perf_counter() - t0)
        next_index += 1
        added += len(chunk)
    bar.close()
    return added


# what caches read together must agree on: the features and target distribution they hold
COMPATIBLE_KEYS = ("target", "target_layer_ids", "hidden_size", "top_k", "num_target_layers")


class CacheReader:
    """Random access to the cached sequences of one split (memory-mapped shards), of one cache
    directory or of several read as one (e.g. answers generated by separate datagen runs). With
    several (or `prefixed`, for a reader that directories may join later), keys are prefixed by the
    directory's position ("1:gsm8k:17"), as two caches may hold answers to the same prompt."""

    def __init__(self, directory: str | Path | list[str | Path] | tuple[str | Path, ...], split: str | None = "train",
                 *, prefixed: bool | None = None) -> None:
        dirs = [directory] if isinstance(directory, (str, Path)) else list(directory)
        if not dirs:
            raise InvalidRequest("no cache directory given", "cache")
        self.directories: list[Path] = []
        self.manifest: dict = {}
        self.prefixed = len(dirs) > 1 if prefixed is None else prefixed
        for d in dirs:
            self.add_directory(d)
        self.refresh(split)

    def add_directory(self, directory: str | Path) -> None:
        """Append a cache directory at the next position (existing keys keep their names); its
        sequences are read from the next `refresh`."""
        d = Path(directory)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise FailedPrecondition(f"no target cache at {d} (run `dspark train cache` first)")
        m = json.loads(mpath.read_text())
        if self.directories:
            differ = [k for k in COMPATIBLE_KEYS if m.get(k) != self.manifest.get(k)]
            if differ:
                raise FailedPrecondition(f"caches {self.directories[0]} and {d} differ in {differ}: "
                                         "they cannot be read as one")
        else:
            self.manifest = m
        self.directories.append(d)

    def refresh(self, split: str | None = "train") -> None:
        """Re-scan the directories (a cache build may have added shards)."""
        self.split = split
        self.index: dict[str, tuple[Path, int]] = {}
        for j, directory in enumerate(self.directories):
            for path, side in completed_shards(directory):
                for i, (key, s) in enumerate(zip(side["keys"], side["splits"])):
                    if split is None or s == split:
                        self.index[f"{j}:{key}" if self.prefixed else key] = (path, i)
        self.keys = sorted(self.index)

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, key: str) -> CachedSequence:
        path, i = self.index[key]
        with safe_open(str(path), framework="pt") as f:
            offsets = f.get_slice("offsets")[i : i + 2].tolist()
            a, b = int(offsets[0]), int(offsets[1])
            return CachedSequence(
                key=key,
                split=self.split or "",
                input_ids=f.get_slice("input_ids")[a:b].long(),
                loss_mask=f.get_slice("loss_mask")[a:b].bool(),
                features=f.get_slice("features")[a:b],
                topk_ids=f.get_slice("topk_ids")[a:b].long(),
                topk_probs=f.get_slice("topk_probs")[a:b].float(),
            )


# ------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="target model spec (see load_target)")
    p.add_argument("--answers", default="runs/smollm2/data", help="answers file or datagen directory")
    p.add_argument("--out", default="runs/smollm2/cache")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="target layer ids (default: 4 spread)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--max-length", type=int, default=560, help="truncate sequences to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="cache at most this many sequences in total")
    p.add_argument("--split", choices=["train", "heldout"], default=None, help="cache only this split")
    p.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    from drafter_svc.loading import default_layer_ids
    from verifier_svc.target_loading import load_target

    torch.set_num_threads(args.threads)
    target = load_target(args.model)
    layers = args.layers or default_layer_ids(int(target.model.config.num_hidden_layers))
    added = build_cache(target.model, args.answers, args.out, layers, target_name=target.name, top_k=args.top_k,
                        max_length=args.max_length, batch_size=args.batch_size, shard_size=args.shard_size,
                        limit=args.limit, split=args.split)
    total = len(CacheReader(args.out, None))
    print(f"cached {added} new sequences; {total} in {args.out}")
    return 0
