"""A test proposer that drafts the target's own continuation and corrupts it on purpose.

It stands in for a well-trained drafter so that acceptance, partial acceptance and rollback are
exercised heavily (a random drafter is almost never right). It reads the committed tokens from the
verifier's engine; drafts are greedy argmax (one-hot q) or, when sampling, drawn from the target's
processed distribution truncated to its top-K (an exact sparse q)."""

from __future__ import annotations

import torch

from dspark_common.sampling import processed_probs
from dspark_common.types import DraftRequest, Proposal
from verifier_svc.target_engine import TargetEngine


class OracleProposer:
    def __init__(self, reference: torch.nn.Module, engine: TargetEngine, *, block_size: int = 8,
                 corrupt: float = 0.0, top_k: int = 4, seed: int = 0, vocab: int | None = None) -> None:
        self.reference, self.engine, self.block_size = reference, engine, block_size
        self.corrupt, self.top_k = corrupt, top_k
        self.vocab = vocab or engine.vocab_size
        self.rng = torch.Generator().manual_seed(seed)
        self.lengths: dict[str, int] = {}
        self.force_bad_at: int | None = None  # corrupt exactly this slot of every block

    def open(self, sid: str) -> None:
        self.lengths[sid] = 0

    def release(self, sid: str) -> bool:
        return self.lengths.pop(sid, None) is not None

    def context_length(self, sid: str) -> int:
        return self.lengths[sid]

    def append_context(self, sid: str, features: torch.Tensor, start_pos: int) -> None:
        assert start_pos == self.lengths[sid], (start_pos, self.lengths[sid])
        self.lengths[sid] += int(features.shape[0])

    def truncate(self, sid: str, length: int) -> None:
        self.lengths[sid] = length

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        out = []
        for r in requests:
            assert self.lengths[r.session_id] == r.anchor_pos
            ids = self.engine.tokens(r.session_id)[: r.anchor_pos] + [r.anchor_token]
            toks, qi, qp = [], [], []
            for k in range(r.block_size):
                logits = self.reference(torch.tensor([ids])).logits[0, -1]
                p = processed_probs(logits, r.sampling)
                if r.sampling.greedy:
                    x = int(p.argmax())
                    bad = self.force_bad_at == k or torch.rand((), generator=self.rng) < self.corrupt
                    if bad:
                        x = (x + 1 + int(torch.randint(0, self.vocab - 1, (), generator=self.rng))) % self.vocab
                    ids_k, probs_k = torch.tensor([x]), torch.tensor([1.0])
                else:
                    top = torch.topk(p, self.top_k)
                    probs_k = top.values / top.values.sum()
                    if self.corrupt:  # a deliberately wrong q: flatten it
                        probs_k = (1 - self.corrupt) * probs_k + self.corrupt / self.top_k
                    ids_k = top.indices
                    x = int(ids_k[torch.multinomial(probs_k, 1, generator=r.generator)])
                toks.append(x)
                qi.append(ids_k)
                qp.append(probs_k)
                ids.append(x)
            width = max((len(t) for t in qi), default=1)
            pad = lambda t, v: torch.cat([t, torch.full((width - len(t),), v, dtype=t.dtype)])  # noqa: E731
            out.append(Proposal(
                torch.tensor(toks, dtype=torch.long),
                torch.stack([pad(t, 0) for t in qi]) if qi else torch.zeros(0, 1, dtype=torch.long),
                torch.stack([pad(t, 0.0) for t in qp]).float() if qp else torch.zeros(0, 1),
                torch.full((len(toks),), 0.8),
            ))
        return out
