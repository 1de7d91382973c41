"""The target's tokenizer on the router: prompt encoding, the chat template, stop token ids and the
served model name. Only the tokenizer is loaded, never model weights (the default SmolLM2 reads
its tokenizer from the converted cache when present, else straight from the GGUF)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dspark_common.errors import InvalidRequest

log = logging.getLogger(__name__)


@dataclass
class TargetTokenizer:
    tokenizer: object  # a transformers tokenizer
    model_name: str
    stop_ids: frozenset[int]  # end-of-sequence ids: generation stops after one

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, messages: list[dict]) -> list[int]:
        from verifier_svc.target_loading import chat_prompt_ids

        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("the served model has no chat template: use /v1/completions", "messages")
        return list(chat_prompt_ids(self.tokenizer, messages))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _eos_from_generation_config(directory: Path) -> set[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}


def load_tokenizer(spec: str, model_name: str = "") -> TargetTokenizer:
    """The tokenizer of target `spec` ('smollm2', a directory, a .gguf file or a hub id)."""
    from transformers import AutoTokenizer

    from dspark_common.settings import cache_root
    from verifier_svc.target_loading import DEFAULT_TARGET, smollm2_gguf_path

    name = model_name
    directory: Path | None = None
    if spec == DEFAULT_TARGET or spec.endswith(".gguf"):
        gguf = smollm2_gguf_path() if spec == DEFAULT_TARGET else Path(spec)
        cached = sorted(cache_root().glob(f"targets/{gguf.stem}-*/tokenizer_config.json"))
        if cached:
            directory = cached[0].parent
            tok = AutoTokenizer.from_pretrained(directory)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        name = name or ("SmolLM2-135M-Instruct" if spec == DEFAULT_TARGET else gguf.stem)
    else:
        tok = AutoTokenizer.from_pretrained(spec)
        directory = Path(spec) if Path(spec).is_dir() else None
        name = name or str(spec).rstrip("/").split("/")[-1]
    stop = _eos_from_generation_config(directory) if directory is not None else set()
    if tok.eos_token_id is not None:
        stop.add(int(tok.eos_token_id))
    log.info("router tokenizer for %s: %d tokens, stop ids %s", name, len(tok), sorted(stop))
    return TargetTokenizer(tok, name, frozenset(stop))
