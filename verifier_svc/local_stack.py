"""The whole decode path in one process: target engine + DSpark drafter + decode loop.

Used by `dspark generate`, `dspark eval` and the in-process benchmark baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_common.settings import GenerateSettings
from dspark_common.types import SamplingParams
from drafter_svc.loading import draft_engine, load_drafter
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest, GenerationResult
from verifier_svc.sps_profile import profile_sps
from verifier_svc.target_engine import TargetEngine
from verifier_svc.target_loading import chat_prompt_ids, load_target, stop_token_ids


@dataclass
class LocalStack:
    loop: DecodeLoop
    tokenizer: object
    stop_ids: frozenset[int]
    target_name: str
    drafter_name: str

    def encode(self, text: str, chat: bool = True) -> list[int]:
        if chat:
            return chat_prompt_ids(self.tokenizer, text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), draft_length: int | str = "auto") -> GenerationResult:
        req = GenerationRequest(list(prompt_ids), max_new_tokens, sampling, draft_length, self.stop_ids)
        return self.loop.generate(req)


def build_local_loop(settings: GenerateSettings, *, profile: bool = True) -> LocalStack:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = getattr(torch, settings.dtype)
    target = load_target(settings.model, dtype=dtype, device=settings.device, small_batch_kernel=settings.cpu_kernel)
    drafter, drafter_name = load_drafter(settings.drafter, target.model, dtype=dtype, device=settings.device,
                                         small_batch_kernel=settings.cpu_kernel, draft_vocab=settings.draft_vocab)
    engine = TargetEngine(target.model, feature_layer_ids=drafter.config.target_layer_ids)
    proposer = draft_engine(drafter)
    sps = profile_sps(engine, max_tokens=drafter.config.block_size + 1) if profile else None
    loop = DecodeLoop(engine, proposer, sps=sps, round_overhead_s=None if profile else 0.0,
                      lookup=settings.lookup_config())
    return LocalStack(loop, target.tokenizer, frozenset(stop_token_ids(target.model, target.tokenizer)),
                      target.name, drafter_name)
