"""Building a DSpark drafter for a loaded target: from a checkpoint directory (DeepSpec format,
with or without the frozen embed/lm_head copies), the committed default, or a randomly
initialised drafter of the right shape (before a trained one exists, and in tests)."""

from __future__ import annotations

import logging
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from drafter_svc.checkpoint import load_checkpoint
from drafter_svc.config import DSparkConfig
from drafter_svc.draft_engine import DraftEngine
from drafter_svc.dspark_model import DSparkDrafter

if TYPE_CHECKING:  # transformers is slow to import; the drafter service never needs it
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DRAFTER_DIR = REPO_ROOT / "models" / "dspark-smollm2-135m"

# SmolLM2 has no spare id like Qwen3's 151669; <empty_output> (16) is a Jupyter-pretraining token
# that the chat template never emits, so it is free to mean "masked block slot".
SMOLLM2_MASK_TOKEN_ID = 16


def default_layer_ids(num_layers: int, count: int = 4) -> list[int]:
    """Evenly spread feature layers from layer 1 to the second-to-last (the last is forbidden)."""
    last = num_layers - 2
    if last < 1:
        return [-1] if num_layers == 1 else list(range(-1, last + 1))[: count]
    count = min(count, last)
    return sorted({round(1 + i * (last - 1) / max(count - 1, 1)) for i in range(count)})


def random_config(target_config, *, block_size: int = 7, layers: int = 2, markov_rank: int = 64,
                  mask_token_id: int | None = None) -> DSparkConfig:
    num_layers = int(target_config.num_hidden_layers)
    if mask_token_id is None:
        mask_token_id = SMOLLM2_MASK_TOKEN_ID if int(target_config.vocab_size) == 49152 else int(target_config.vocab_size) - 1
    return DSparkConfig.from_target(
        target_config, num_hidden_layers=layers, target_layer_ids=default_layer_ids(num_layers),
        block_size=block_size, mask_token_id=mask_token_id, markov_rank=markov_rank,
    )


def random_drafter(target: "PreTrainedModel", *, seed: int = 0, **kw) -> DSparkDrafter:
    """An untrained drafter of the right shape; embed/lm_head copied from the target."""
    config = random_config(target.config, **kw)
    torch.manual_seed(seed)
    model = DSparkDrafter(config)
    model.embed_tokens.weight.data.copy_(target.get_input_embeddings().weight.data)
    model.lm_head.weight.data.copy_(target.get_output_embeddings().weight.data)
    return model.eval()


def load_drafter(spec: str, target: "PreTrainedModel", *, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", small_batch_kernel: bool = False,
                 draft_vocab: bool = True) -> tuple[DSparkDrafter, str]:
    """Resolve 'default' | 'random' | a checkpoint directory. Returns the model and a description.
    `small_batch_kernel`: as in `load_target`. `draft_vocab=False` drops the checkpoint's draft
    vocabulary (drafts over all V)."""
    model, description = _load_drafter(spec, target, dtype, device)
    if not draft_vocab:
        model.draft_vocab = None
    elif model.draft_vocab is not None:
        description += f" (draft vocabulary {model.draft_vocab.numel()} of {model.config.vocab_size})"
    if small_batch_kernel:
        from dspark_common import small_batch_linear

        small_batch_linear.install(model)
    return model, description


def _load_drafter(spec: str, target: "PreTrainedModel", dtype: torch.dtype, device: str) -> tuple[DSparkDrafter, str]:
    if spec == "default":
        if (DEFAULT_DRAFTER_DIR / "config.json").is_file():
            spec = str(DEFAULT_DRAFTER_DIR)
        else:
            log.warning("no trained drafter at %s: using a RANDOMLY INITIALISED drafter", DEFAULT_DRAFTER_DIR)
            spec = "random"
    if spec == "random":
        return random_drafter(target).to(device=device, dtype=dtype), "random (untrained) DSpark drafter"
    model = load_checkpoint(
        spec,
        target_embed=target.get_input_embeddings().weight,
        target_lm_head=target.get_output_embeddings().weight,
        dtype=dtype, device=device,
    )
    return model, f"DSpark drafter {spec}"


def draft_engine(model: DSparkDrafter, **kw) -> DraftEngine:
    return DraftEngine(model, model.config, **kw)
