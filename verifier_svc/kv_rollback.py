"""Rolling a target KV cache back to a shorter length after a partial acceptance, without
recomputing anything.

Plain attention layers crop by slicing. Layers whose state is not a plain per-token list
(sliding windows) must be put into past-recording mode before the forward whose tokens may be
rejected; `new_cache` does that for every layer that supports it. DeepSeek-V4's compressed caches
need more than that (their sliding K=V ignores `record_past` and `crop` does not touch the
compressor state): `new_cache` builds them from the recording layers of `kv_rollback_deepseek_v4`,
which can roll back exactly any number of the positions of the last forward (or all positions)."""

from __future__ import annotations

from transformers import DynamicCache, PretrainedConfig


def _is_deepseek_v4(config: PretrainedConfig) -> bool:
    return getattr(config.get_text_config(decoder=True), "model_type", None) == "deepseek_v4"


def new_cache(config: PretrainedConfig) -> DynamicCache:
    if _is_deepseek_v4(config):
        from verifier_svc import kv_rollback_deepseek_v4

        return kv_rollback_deepseek_v4.new_cache(config)
    cache = DynamicCache(config=config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def cache_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def rollback(cache: DynamicCache, new_length: int) -> None:
    """Drop the cached positions at and after `new_length`. `rollback(cache, cache_length(cache))`
    commits: it keeps every position and frees what only a rollback would need."""
    length = cache_length(cache)
    remove = length - new_length
    if remove < 0:
        raise ValueError(f"cannot roll a cache of length {length} forward to {new_length}")
    if new_length > 0:
        # Layers with a bounded rollback (DeepSeek-V4 recording layers) are checked up front, so a
        # refused rollback leaves every layer untouched.
        limits = [layer.rollback_limit() for layer in cache.layers if hasattr(layer, "rollback_limit")]
        if limits and remove > min(limits):
            raise ValueError(
                f"cannot roll a cache of length {length} back to {new_length}: only the last forward's "
                f"{min(limits)} positions (or all of them) can be dropped exactly"
            )
    # crop takes a negative count of tokens to remove; crop(0) still trims sliding windows
    # that were allowed to grow while recording the past.
    cache.crop(-remove)
