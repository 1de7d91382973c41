"""Training sequences from the regenerated answers (reference §7 steps 3–5).

A row of `answers.jsonl` ({"key", "prompt_ids", "answer_ids"}) becomes one sequence
prompt_ids + answer_ids with loss_mask = 1 on the answer tokens (the final <|im_end|> included:
the drafter must learn to propose the stop token). Rows whose answer is shorter than
`min_loss_tokens` are dropped. A fixed, key-hashed slice of the rows is held out for calibration
(never the eval/ prompt sets, which datagen refuses anyway)."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MIN_LOSS_TOKENS = 14  # DeepSpec min_loss_tokens
HELDOUT_PERCENT = 5


@dataclass
class Sequence:
    key: str
    input_ids: list[int]
    loss_mask: list[int]

    @property
    def split(self) -> str:
        return split_of(self.key)


def split_of(key: str, heldout_percent: int = HELDOUT_PERCENT) -> str:
    """'heldout' for a stable ~heldout_percent% of keys (md5 of the key), else 'train'."""
    bucket = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < heldout_percent else "train"


def answer_files(path: str | Path) -> list[Path]:
    """An answers file, or every `answers*.jsonl` (or `.jsonl.gz`, as archived under
    `data/answers/`) of a datagen directory (one per datagen shard)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted([*path.glob("answers*.jsonl"), *path.glob("answers*.jsonl.gz")])


def _read_text(f: Path) -> str:
    return gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()


def read_answers(path: str | Path, *, max_length: int = 0, min_loss_tokens: int = MIN_LOSS_TOKENS) -> list[Sequence]:
    """All usable sequences of an answers file or datagen directory (a partially written last line
    is skipped). `max_length` > 0 truncates sequences to that many tokens (the answer's tail goes
    first)."""
    out: list[Sequence] = []
    seen: set[str] = set()
    lines = [l for f in answer_files(path) for l in _read_text(f).split("\n")]
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # datagen is appending this line right now
        key = row["key"]
        if key in seen:
            continue
        seen.add(key)
        prompt, answer = list(row["prompt_ids"]), list(row["answer_ids"])
        ids = prompt + answer
        mask = [0] * len(prompt) + [1] * len(answer)
        if max_length and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask) < min_loss_tokens:
            continue
        out.append(Sequence(key, ids, mask))
    return out
