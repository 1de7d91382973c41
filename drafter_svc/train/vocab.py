"""`dspark train vocab`: choose a drafter checkpoint's draft vocabulary (drafter_svc/draft_vocab.py)
from the target's own training answers, and write it next to the weights.

The ids are the most frequent answer tokens; the stop tokens of the config are always in. The
coverage printed (and stored in the file's metadata) is measured on answers held out from the
count, so it estimates the share of target tokens a draft from this vocabulary can still match."""

from __future__ import annotations

import argparse
from pathlib import Path

from dspark_common.errors import InvalidRequest

SIZES = (1024, 2048, 4096, 8192, 12288, 16384, 32768)


def read_answers(dirs: list[str]) -> list[list[int]]:
    """The answer tokens of every datagen directory (or archived copy under data/answers/), by key."""
    from drafter_svc.train.data import answer_files, read_answers as read_sequences

    rows: list[tuple[str, list[int]]] = []
    for d in dirs:
        if not Path(d).exists() or not answer_files(d):
            raise InvalidRequest(f"no answers*.jsonl[.gz] under {d} (write them with `dspark train datagen`)", "answers")
        for s in read_sequences(d, min_loss_tokens=0):
            rows.append((s.key, [t for t, m in zip(s.input_ids, s.loss_mask) if m]))
    rows.sort()  # the held-out split must not depend on shard layout or write order
    return [ids for _, ids in rows]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", nargs="+", required=True, help="datagen output directories (answers*.jsonl), or archived ones (data/answers/s*/*)")
    p.add_argument("--checkpoint", required=True, help="drafter checkpoint directory to write draft_vocab.safetensors into")
    p.add_argument("--size", type=int, default=8192, help="tokens in the draft vocabulary")
    p.add_argument("--held-out", type=float, default=0.1, help="share of answers (every k-th) kept out of the count")


def run(args: argparse.Namespace) -> int:
    from drafter_svc import draft_vocab
    from drafter_svc.checkpoint import load_config

    config = load_config(args.checkpoint)
    answers = read_answers(args.answers)
    if not 0 <= args.held_out < 1:
        raise InvalidRequest(f"--held-out must be in [0, 1), got {args.held_out}", "held_out")
    every = round(1 / args.held_out) if args.held_out > 0 else 0
    held, used = [], []
    for i, a in enumerate(answers):  # every k-th answer held out
        (held if every and i % every == every - 1 else used).append(a)
    counts = draft_vocab.count_tokens(used, config.vocab_size)
    held_counts = draft_vocab.count_tokens(held, config.vocab_size) if held else counts
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    always = [int(i) for i in eos if i is not None]
    table = {}
    for size in sorted({*SIZES, args.size}):
        if size <= config.vocab_size:
            table[size] = draft_vocab.coverage(held_counts, draft_vocab.choose(counts, size, always))
    ids = draft_vocab.choose(counts, args.size, always)
    info = {"size": args.size, "answers": len(used), "held_out_answers": len(held),
            "tokens_counted": int(counts.sum()), "held_out_coverage": table[args.size],
            "coverage_by_size": {str(k): round(v, 5) for k, v in table.items()}}
    path = draft_vocab.save(args.checkpoint, ids, info)
    for size, cov in table.items():
        print(f"  {size:>6} tokens: held-out coverage {100 * cov:.2f}%{'  <- chosen' if size == args.size else ''}")
    print(f"wrote {path}: {args.size} of {config.vocab_size} ids from {len(used)} answers "
          f"({int(counts.sum())} tokens); held-out coverage {100 * table[args.size]:.2f}%")
    return 0
