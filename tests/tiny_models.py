"""Tiny, seeded, randomly initialised targets (Llama, Qwen3, DeepSeek-V4) and DSpark drafters
built in-process for tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, PreTrainedModel, Qwen3Config

from drafter_svc.loading import random_drafter
from verifier_svc.target_loading import load_target


def llama_config(vocab: int = 256, hidden: int = 64, layers: int = 4) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, eos_token_id=vocab - 2, bos_token_id=0)


def qwen3_config(vocab: int = 256, hidden: int = 64, layers: int = 4) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       tie_word_embeddings=True, eos_token_id=vocab - 2)


def deepseek_v4_config(vocab: int = 256, hidden: int = 64, layers: int = 4):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, qk_rope_head_dim=16, q_lora_rank=32, o_lora_rank=32, o_groups=2,
        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        num_hash_layers=0, sliding_window=8, compress_rates={"compressed_sparse_attention": 4,
                                                             "heavily_compressed_attention": 8},
        # index_topk >= the number of compressed entries (512 / 4): transformers' Lightning Indexer
        # picks its top-k in a way that depends on entries created by LATER tokens of the same
        # forward (a 25-token and a 28-token prefill disagree at position 24 by 0.19 in the logits
        # when index_topk=4), which no block verifier can match. Real V4 (index_topk 2048, rate 4)
        # only reaches that regime past 8k tokens; see docs/LOSSLESSNESS.md.
        index_n_heads=2, index_head_dim=16, index_topk=128, max_position_embeddings=512, eos_token_id=vocab - 2,
    )


def tiny_target(kind: str = "llama", seed: int = 0, **kw) -> PreTrainedModel:
    cfg = {"llama": llama_config, "qwen3": qwen3_config, "deepseek_v4": deepseek_v4_config}[kind](**kw)
    model = load_target(cfg, seed=seed).model
    # Random tiny models give nearly uniform next-token distributions; sharper logits make greedy
    # ties between batched and single-token forwards vanishingly unlikely and drafts sometimes right.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def tiny_drafter(target: PreTrainedModel, seed: int = 1, block_size: int = 8, markov_rank: int = 16):
    return random_drafter(target, seed=seed, block_size=block_size, markov_rank=markov_rank, layers=1)
