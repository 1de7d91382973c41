"""`dspark train export`: a fit run's drafter as a DeepSpec-format checkpoint directory
(config.json + model.safetensors, reference §6), slim: the frozen embed_tokens / lm_head copies of
the target are omitted (`frozen_weights_from_target: true`; the loader takes them from the target)
and weights are stored in 16 bits (bfloat16, as DeepSpec's released checkpoints)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from drafter_svc import draft_vocab
from drafter_svc.checkpoint import WEIGHTS_NAME, load_checkpoint, save_checkpoint
from drafter_svc.config import DSparkConfig
from dspark_common.errors import FailedPrecondition

MAX_BYTES = 40 * 1024 * 1024


def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
               max_bytes: int = MAX_BYTES) -> Path:
    from drafter_svc.train.fit import load_run_model

    model = load_run_model(run_dir)
    config = DSparkConfig.from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    out = save_checkpoint(model, config, out_dir, dtype=dtype, include_frozen=False)
    if model.draft_vocab is not None:  # trained for that vocabulary: it ships with the weights
        shutil.copyfile(Path(run_dir) / draft_vocab.VOCAB_FILE, out / draft_vocab.VOCAB_FILE)
    size = (out / WEIGHTS_NAME).stat().st_size
    if size > max_bytes:
        raise FailedPrecondition(f"exported weights are {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB budget")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="runs/smollm2/fit", help="fit run directory")
    p.add_argument("--out", default="models/dspark-smollm2-135m")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--verify-with", default="smollm2",
                   help="target whose embed/lm_head complete the slim checkpoint for a load check ('' = skip)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    out = export_run(args.run, args.out, dtype=getattr(torch, args.dtype),
                     max_bytes=MAX_BYTES if args.dtype != "float32" else 1 << 40)
    size = (out / WEIGHTS_NAME).stat().st_size
    if args.verify_with:
        from verifier_svc.target_loading import load_target

        target = load_target(args.verify_with).model
        load_checkpoint(out, target_embed=target.get_input_embeddings().weight,
                        target_lm_head=target.get_output_embeddings().weight)
    print(f"exported {out} ({size / 2**20:.1f} MiB weights{', load check ok' if args.verify_with else ''})")
    return 0
