"""The draft vocabulary: the subset of the target's vocabulary the drafter proposes from (the
idea of EAGLE-3's reduced draft vocabulary, applied at inference only).

Why: on a small target the drafter's largest costs are its vocabulary projections, not its layers:
`lm_head` over all V for every block slot and the Markov head's `markov_w2` (r -> V) once per
sequential slot. Restricting both to the tokens the target actually writes (most frequent first,
counted on the training answers) cuts them by V / |draft vocab|.

Lossless as before: verification never looks at the vocabulary. Greedy, a token outside the subset
is simply never proposed; sampling, q is a proper distribution over the subset (q = 0 outside),
which rejection sampling handles like any other q. What it can cost is acceptance, bounded by the
share of target tokens outside the subset (`coverage`, recorded next to the ids).

A checkpoint directory may carry `draft_vocab.safetensors` (`ids`: sorted int64 token ids); the
DeepSpec-format weights are untouched, and a checkpoint without the file drafts over all V."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dspark_common.errors import FailedPrecondition, InvalidRequest

VOCAB_FILE = "draft_vocab.safetensors"


def count_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of each token id [V] over `sequences` (ids outside [0, V) are an error)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        t = torch.as_tensor(list(seq), dtype=torch.long)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise InvalidRequest(f"token ids must lie in [0, {vocab_size})", "sequences")
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def choose(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids (ties: lower id first), `always` included; sorted ascending."""
    vocab_size = counts.numel()
    if not 0 < size <= vocab_size:
        raise InvalidRequest(f"draft vocabulary size must be in 1..{vocab_size}, got {size}", "size")
    forced = sorted({int(i) for i in always})
    if any(not 0 <= i < vocab_size for i in forced) or len(forced) > size:
        raise InvalidRequest(f"`always` ids must be fewer than {size} and lie in [0, {vocab_size})", "always")
    rest = counts.clone().double()
    rest[forced] = -1.0  # already in
    # Stable sort by descending count keeps ties in id order, so the choice is reproducible.
    order = torch.sort(-rest, stable=True).indices[: size - len(forced)]
    return torch.sort(torch.cat([torch.tensor(forced, dtype=torch.long), order])).values


def coverage(counts: torch.Tensor, ids: torch.Tensor) -> float:
    """Share of the counted tokens that lie inside the draft vocabulary."""
    total = int(counts.sum())
    return float(counts[ids].sum()) / total if total else 0.0


def save(directory: str | Path, ids: torch.Tensor, info: dict | None = None) -> Path:
    path = Path(directory) / VOCAB_FILE
    metadata = {"info": json.dumps(info or {}, sort_keys=True)}
    save_file({"ids": ids.to(torch.long).contiguous()}, str(path), metadata=metadata)
    return path


def load(directory: str | Path, vocab_size: int) -> torch.Tensor | None:
    """The checkpoint's draft vocabulary, validated; None when it has none."""
    path = Path(directory) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        ids = load_file(str(path))["ids"]
    except Exception as e:  # a truncated or foreign file: say which one
        raise FailedPrecondition(f"{path} is not a draft vocabulary file: {e}") from e
    if ids.ndim != 1 or ids.numel() == 0 or ids.dtype != torch.long:
        raise FailedPrecondition(f"{path}: `ids` must be a non-empty 1-D int64 tensor")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or not bool((ids[1:] > ids[:-1]).all()):
        raise FailedPrecondition(f"{path}: ids must be strictly increasing token ids in [0, {vocab_size})")
    return ids


class DraftHeads:
    """The drafter's two vocabulary projections, over the draft vocabulary when given one.

    Scores come back indexed by draft slot (0..size); `token_ids` maps an index to the target's
    token id. With `ids=None` they are the model's own full-V modules and the map is the identity."""

    def __init__(self, model: nn.Module, ids: torch.Tensor | None) -> None:
        w2 = model.markov_head.markov_w2 if model.markov_head is not None else None
        self.ids = None if ids is None else ids.to(model.lm_head.weight.device)
        if self.ids is None:
            self.lm_head, self.markov_w2 = model.lm_head, w2
        else:
            self.lm_head = _rows(model.lm_head, self.ids)
            self.markov_w2 = None if w2 is None else _rows(w2, self.ids)
            # Same routing as the model's own linears: the small-batch kernel when it serves them.
            from dspark_common import small_batch_linear

            if small_batch_linear.installed(model.lm_head):
                small_batch_linear.install(nn.ModuleList([m for m in (self.lm_head, self.markov_w2) if m is not None]))

    @property
    def size(self) -> int:
        return self.lm_head.weight.shape[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def markov_bias(self, z: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(z)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        return index if self.ids is None else self.ids[index]


def _rows(linear: nn.Linear, ids: torch.Tensor) -> nn.Linear:
    w = linear.weight.detach()
    sub = nn.Linear(w.shape[1], ids.numel(), bias=False, device=w.device, dtype=w.dtype)
    sub.weight = nn.Parameter(w.index_select(0, ids).contiguous(), requires_grad=False)
    return sub.eval()
