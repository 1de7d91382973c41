"""Attention for a verify block on CPU without copying the KV cache per forward.

transformers' SDPA path runs grouped-query attention without `repeat_kv` only for a single query
token (it packs the query heads that share a KV head into rows). For a block of k > 1 queries
there is a mask, and on CPU it falls back to `repeat_kv`, which materialises the whole cache
n_rep times in every layer of every forward: for SmolLM2 (9 query heads on 3 KV heads) and a
300-token context that is ~40 MB copied per verify, ~9 ms of a ~90 ms forward, paid only by
blocks (the one-token step never does). That made speculation's verify dearer than it is.

Here the k queries of the n_rep heads that share a KV head are packed as n_rep·k rows against
that KV head, with the mask repeated per head: the layout transformers already uses for k = 1,
generalised to k. Same attention, no copy of the cache. Everything else (prefill without a
mask, other devices, position biases, models without GQA) goes to transformers' own SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "dspark_packed_gqa"


def packed_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Drop-in for `sdpa_attention_forward` (same arguments, output [b, q, H, d])."""
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    b, heads, q_len, dim = query.shape
    if (
        groups == 1
        or q_len == 1  # transformers packs a single query itself
        or attention_mask is None  # prefill on an empty cache: SDPA's causal kernel
        or query.device.type != "cpu"
        or dropout
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads, kv_len = key.shape[1], key.shape[2]
    # Head h reads KV head h // groups (repeat_kv's order), so rows (g, t) of KV head j are query
    # head j * groups + g at block position t.
    packed_q = query.reshape(b, kv_heads, groups * q_len, dim)
    mask = attention_mask[:, :, None].expand(b, 1, groups, q_len, kv_len).reshape(b, 1, groups * q_len, kv_len)
    out = F.scaled_dot_product_attention(packed_q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, q_len, dim).transpose(1, 2).contiguous(), None


# Attention modules known to call the interface with plain (query, key, value, mask) arguments;
# others (DeepSeek-V4's compressed attention, sinks, soft-capping) keep transformers' SDPA.
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def install(model: PreTrainedModel) -> bool:
    """Switch an SDPA model of a known family to packed-GQA attention; False (nothing changed)
    for other models and backends."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    AttentionInterface.register(NAME, packed_gqa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
