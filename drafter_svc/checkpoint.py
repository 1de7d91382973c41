"""Saving and loading DSpark draft checkpoints in DeepSpec's format (reference §6).

A checkpoint directory holds `config.json` (see `DSparkConfig.to_dict`) and `model.safetensors`
(or shards listed by `model.safetensors.index.json`) with DeepSpec's top-level tensor names.
Our slim variant omits the frozen `embed_tokens.weight` / `lm_head.weight` (copies of the
target's) and marks `"frozen_weights_from_target": true` in config.json; loading it needs those
two tensors from the target."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drafter_svc import draft_vocab
from drafter_svc.config import DSparkConfig
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common.errors import FailedPrecondition, InvalidRequest

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FROZEN_FLAG = "frozen_weights_from_target"
FROZEN_KEYS = ("embed_tokens.weight", "lm_head.weight")
_SAVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def save_checkpoint(
    model: DSparkDrafter,
    config: DSparkConfig,
    directory: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    include_frozen: bool = True,
) -> Path:
    """Write config.json + model.safetensors into `directory` (created if needed); returns it."""
    if dtype not in _SAVE_DTYPES:
        raise InvalidRequest(f"checkpoint dtype must be one of {_SAVE_DTYPES}, got {dtype}", "dtype")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in model.state_dict().items():
        if not include_frozen and name in FROZEN_KEYS:
            continue
        t = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        # safetensors refuses tensors sharing storage (e.g. embed and lm_head built from one tied
        # target matrix); the file must hold independent copies.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop(FROZEN_FLAG, None)
    if not include_frozen:
        cfg[FROZEN_FLAG] = True
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory


def load_config(directory: str | Path) -> DSparkConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FailedPrecondition(f"no {CONFIG_NAME} in draft checkpoint directory {directory}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FailedPrecondition(f"{path} is not valid JSON: {e}") from e
    config = DSparkConfig.from_dict(raw)
    config.extra.pop(FROZEN_FLAG, None)  # a property of the file, not of the model
    return config


def load_checkpoint(
    directory: str | Path,
    *,
    target_embed: torch.Tensor | None = None,
    target_lm_head: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DSparkDrafter:
    """Build a `DSparkDrafter` from a checkpoint directory, with a strict key and shape check.

    `embed_tokens.weight` / `lm_head.weight` come from the file when it has them (DeepSpec full
    checkpoints), otherwise from `target_embed` / `target_lm_head` ([V, d] each)."""
    directory = Path(directory)
    config = load_config(directory)
    tensors = read_weights(directory)

    with torch.device("meta"):
        model = DSparkDrafter(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    for name, given, arg in (
        ("embed_tokens.weight", target_embed, "target_embed"),
        ("lm_head.weight", target_lm_head, "target_lm_head"),
    ):
        if name in tensors:
            continue
        if given is None:
            raise FailedPrecondition(
                f"checkpoint {directory} omits the frozen {name} (copied from the target); pass {arg}=<[V, d] tensor>"
            )
        if tuple(given.shape) != expected[name]:
            raise InvalidRequest(
                f"{arg} has shape {list(given.shape)}, expected {list(expected[name])} "
                f"([vocab_size={config.vocab_size}, hidden_size={config.hidden_size}])",
                arg,
            )
        tensors[name] = given.detach().to("cpu")

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(
        f"{n}: file {list(tensors[n].shape)} vs model {list(expected[n])}"
        for n in set(expected) & set(tensors)
        if tuple(tensors[n].shape) != expected[n]
    )
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if wrong_shape:
            problems.append(f"shape mismatches {wrong_shape}")
        raise FailedPrecondition(f"checkpoint {directory} does not match its config: " + "; ".join(problems))

    state = {name: t.to(dtype=dtype) for name, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # inv_freq is not in the file: rebuild it off the meta device before moving the model.
    model.rotary_emb.reset_inv_freq("cpu")
    model = model.to(device).eval()
    ids = draft_vocab.load(directory, config.vocab_size)
    if ids is not None:
        model.draft_vocab = ids.to(device)
    return model


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    single = directory / WEIGHTS_NAME
    index = directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [WEIGHTS_NAME]
    elif index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FailedPrecondition(f"{index} is not a valid safetensors index: {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
    else:
        raise FailedPrecondition(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in draft checkpoint directory {directory}")

    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        path = directory / filename
        if not path.is_file():
            raise FailedPrecondition(f"checkpoint shard {path} is missing")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in tensors:
                    raise FailedPrecondition(f"tensor {name} appears in more than one shard of {directory}")
                tensors[name] = f.get_tensor(name)
    return tensors
