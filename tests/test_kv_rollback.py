"""kv_rollback: speculative-verification rounds (extend by k+1 tokens, roll back the rejected ones)
must leave the target cache exactly as if the rejected tokens had never been fed — for plain
attention (Llama, Qwen3, Qwen3 with a sliding-window layer) and for DeepSeek-V4, whose sliding
K=V and CSA/HCA compressor state (buffers, compressed entries, entry counts, overlap) need the
recording layers of `verifier_svc.kv_rollback_deepseek_v4`.

Reference: a fresh cache-less forward over the whole kept sequence (+ the new block). For V4 we
checked that a one-shot prefill equals incremental decoding to ~1e-5 in fp32 (windows are aligned
on absolute positions, so the compressed entries do not depend on chunking), so the prefill is a
valid reference; V4 is additionally compared against a stock V4 cache fed the same chunks minus the
rejected tokens."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4CSACache, DeepseekV4HCACache

from verifier_svc import kv_rollback, kv_rollback_deepseek_v4
from verifier_svc.target_engine import TargetEngine

V = 256
ATOL = 1e-4
WINDOW, CSA_RATE, HCA_RATE = 8, 4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _v4_config() -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=V, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, q_lora_rank=16,
        num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={"compressed_sparse_attention": CSA_RATE, "heavily_compressed_attention": HCA_RATE},
        hc_mult=2, hc_sinkhorn_iters=3, sliding_window=WINDOW, o_groups=2, o_lora_rank=8,
        # index_topk smaller than the number of compressed entries, so the indexer's own compressor
        # state decides which entries are attended to (8 heads keep exact-zero score ties unlikely).
        index_n_heads=8, index_head_dim=16, index_topk=3,
        max_position_embeddings=512, initializer_range=0.2, attn_implementation="eager",
    )


def _build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "v4":
        model = DeepseekV4ForCausalLM(_v4_config())
        with torch.no_grad():  # init leaves these at zero; random values exercise their paths
            for name, p in model.named_parameters():
                if "position_bias" in name or "sinks" in name:
                    p.normal_(0.0, 0.5)
            for mod in model.modules():
                if hasattr(mod, "tid2eid"):
                    mod.tid2eid.copy_(torch.randint(0, 4, mod.tid2eid.shape))
        return model.eval()
    common = dict(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, attn_implementation="eager",
    )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()
    if kind == "qwen3_sliding":
        cfg = Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        assert "sliding_attention" in cfg.layer_types
        return Qwen3ForCausalLM(cfg).eval()
    raise ValueError(kind)


@torch.inference_mode()
def _forward(model, tokens: list[int], cache=None, start: int = 0) -> torch.Tensor:
    ids = torch.tensor([tokens])
    pos = torch.arange(start, start + len(tokens))[None]
    if cache is None:
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
    return model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).logits[0].float()


def _check_v4_state(cache, length: int) -> None:
    """After a rollback/commit: the state of a cache fed `length` tokens, and no leftover history."""
    for layer in cache.layers:
        assert layer.get_seq_length() == length
        assert layer.keys.shape[-2] == min(length, WINDOW - 1)
        assert layer.rollback_limit() == 0
        if isinstance(layer, kv_rollback_deepseek_v4._RecordingCompressorMixin):
            assert not layer._raw and not layer._closed_ca and not layer._overlap_before
            for name, count in layer.entry_count.items():
                assert count == length // layer.compress_rate
                assert layer.compressed_kv[name].shape[1] == count
                assert layer.buffer_kv[name].shape[1] == length % layer.compress_rate
                assert layer.buffer_gate[name].shape[1] == length % layer.compress_rate


def _run_rounds(
    model, *, seed: int, rounds: int, prompt_len: int = 20, incremental_ref: bool = False, check_state: bool = True
) -> int:
    """Prefill, then `rounds` of extend-by-(k+1) / roll back; every block's logits (the forward
    right after the previous rollback) must match a fresh forward over kept tokens + block.
    Returns the final kept length."""
    rng = random.Random(seed)
    cfg = model.config
    cache = kv_rollback.new_cache(cfg)
    ref_cache = DynamicCache(config=cfg) if incremental_ref else None
    kept = [rng.randrange(V) for _ in range(prompt_len)]
    out = _forward(model, kept, cache)
    torch.testing.assert_close(out, _forward(model, kept), atol=ATOL, rtol=0)
    if ref_cache is not None:
        _forward(model, kept, ref_cache)
    for _ in range(rounds):
        k = rng.randint(0, 6)
        block = [rng.randrange(V) for _ in range(k + 1)]
        got = _forward(model, block, cache, len(kept))
        want = _forward(model, kept + block)[-(k + 1):]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        keep = rng.randint(1, k + 1)
        if ref_cache is not None:  # a stock cache fed only the kept tokens, chunk by chunk
            ref = _forward(model, block[:keep], ref_cache, len(kept))
            torch.testing.assert_close(got[:keep], ref, atol=ATOL, rtol=0)
        kv_rollback.rollback(cache, len(kept) + keep)
        kept += block[:keep]
        assert kv_rollback.cache_length(cache) == len(kept)
        if check_state and isinstance(model, DeepseekV4ForCausalLM):
            _check_v4_state(cache, len(kept))
    # one more forward after the last rollback, several tokens long
    block = [rng.randrange(V) for _ in range(5)]
    got = _forward(model, block, cache, len(kept))
    torch.testing.assert_close(got, _forward(model, kept + block)[-5:], atol=ATOL, rtol=0)
    return len(kept)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_sliding"])
def test_rollback_plain_attention_models(kind):
    final = _run_rounds(_build(kind), seed=1, rounds=14)
    assert final > 20 + WINDOW


def test_rollback_deepseek_v4_exact():
    model = _build("v4")
    final = _run_rounds(model, seed=2, rounds=30, incremental_ref=True)
    # past the sliding window and several HCA / CSA windows
    assert final >= 20 + 30 and final // HCA_RATE >= 6


def test_deepseek_v4_cache_layers_are_recording_and_not_registered_globally():
    cfg = _v4_config()
    cache = kv_rollback.new_cache(cfg)
    assert [type(layer) for layer in cache.layers] == [
        kv_rollback_deepseek_v4.RecordingHCACache,
        kv_rollback_deepseek_v4.RecordingCSACache,
        kv_rollback_deepseek_v4.RecordingSlidingWindowLayer,
    ]
    stock = DynamicCache(config=cfg)  # transformers' own mapping is untouched
    assert type(stock.layers[0]) is DeepseekV4HCACache and type(stock.layers[1]) is DeepseekV4CSACache


def test_deepseek_v4_rollback_limits_commit_and_reset():
    model = _build("v4")
    rng = random.Random(3)
    prompt = [rng.randrange(V) for _ in range(27)]
    cache = kv_rollback.new_cache(model.config)
    _forward(model, prompt, cache)
    # commit (rollback to the current length) frees the prompt's recorded history
    kv_rollback.rollback(cache, len(prompt))
    _check_v4_state(cache, len(prompt))
    block = [rng.randrange(V) for _ in range(6)]
    _forward(model, block, cache, len(prompt))
    # only the last forward can be rolled back; a refused rollback leaves the cache untouched
    with pytest.raises(ValueError):
        kv_rollback.rollback(cache, len(prompt) - 1)
    assert kv_rollback.cache_length(cache) == len(prompt) + 6
    with pytest.raises(ValueError):
        kv_rollback.rollback(cache, len(prompt) + 7)
    kv_rollback.rollback(cache, len(prompt) + 2)
    kept = prompt + block[:2]
    nxt = [rng.randrange(V) for _ in range(3)]
    got = _forward(model, nxt, cache, len(kept))
    torch.testing.assert_close(got, _forward(model, kept + nxt)[-3:], atol=ATOL, rtol=0)
    # rolling back everything resets the cache
    kv_rollback.rollback(cache, 0)
    assert kv_rollback.cache_length(cache) == 0
    fresh = [rng.randrange(V) for _ in range(11)]
    torch.testing.assert_close(_forward(model, fresh, cache), _forward(model, fresh), atol=ATOL, rtol=0)


def test_deepseek_v4_skipping_the_compressor_restore_is_caught(monkeypatch):
    """Sanity check of the comparison itself: without restoring the compressor state (only the
    sliding K=V is rolled back) the logits diverge far beyond the tolerance."""
    monkeypatch.setattr(kv_rollback_deepseek_v4._RecordingCompressorMixin, "_rollback_state", lambda self, n: None)
    with pytest.raises(AssertionError, match="not close"):
        _run_rounds(_build("v4"), seed=2, rounds=30, check_state=False)


@torch.inference_mode()
def test_target_engine_deepseek_v4_extend_rollback():
    model = _build("v4", seed=4)
    engine = TargetEngine(model, feature_layer_ids=[0, 1])
    rng = random.Random(5)
    kept = [rng.randrange(V) for _ in range(19)]
    engine.open("s")
    engine.extend("s", kept)
    for _ in range(16):
        k = rng.randint(0, 6)
        block = [rng.randrange(V) for _ in range(k + 1)]
        res = engine.extend("s", block)
        ids = torch.tensor([kept + block])
        ref = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        torch.testing.assert_close(res.logits, ref.logits[0, -(k + 1):].float(), atol=ATOL, rtol=0)
        # V4 hidden states carry mHC streams [S, hc, d]; the engine hands the drafter their mean.
        want_feats = torch.cat([ref.hidden_states[i][0, -(k + 1):].mean(dim=1) for i in (1, 2)], dim=-1)
        torch.testing.assert_close(res.features, want_feats, atol=ATOL, rtol=0)
        keep = rng.randint(1, k + 1)
        engine.rollback("s", len(kept) + keep)
        kept += block[:keep]
        assert engine.length("s") == len(kept) and engine.tokens("s") == kept
    assert len(kept) > 19 + 2 * WINDOW
    _check_v4_state(engine._sessions["s"].cache, len(kept))
