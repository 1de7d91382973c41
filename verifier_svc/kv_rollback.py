"""Rolling a target KV cache back to a shorter length after a partial acceptance, without
recomputing anything.

Plain attention layers crop by slicing. Layers whose state is not a plain per-token list
(sliding windows, DeepSeek-V4's compressed caches) must be put into past-recording mode before
the forward whose tokens may be rejected; `new_cache` does that for every layer that supports it."""

from __future__ import annotations

from transformers import DynamicCache, PretrainedConfig


def new_cache(config: PretrainedConfig) -> DynamicCache:
    cache = DynamicCache(config=config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def rollback(cache: DynamicCache, new_length: int) -> None:
    """Drop the cached positions at and after `new_length`."""
    remove = cache_length(cache) - new_length
    if remove < 0:
        raise ValueError(f"cannot roll a cache of length {cache_length(cache)} forward to {new_length}")
    # crop takes a negative count of tokens to remove; crop(0) still trims sliding windows
    # that were allowed to grow while recording the past.
    cache.crop(-remove)
