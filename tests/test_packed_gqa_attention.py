"""Packed grouped-query attention for verify blocks (verifier_svc/packed_gqa_attention.py): the
same logits as transformers' SDPA path, without copying the KV cache.

"The same" is bitwise on some CPUs (the seventh session's Xeon) and within one float32 ulp of the
logits on others: on the eighth session's AMD EPYC, blocks of 2 and 3 tokens differed by at most
9.5e-7 on logits of magnitude 5-12 (every other block size bitwise equal), because torch's CPU
attention kernel tiles by the number of query rows (k rows per head there, groups * k packed here).
Neither layout is bitwise equal to one-token decoding anyway (docs/LOSSLESSNESS.md, "batch
invariance"); the output's exactness is guarded end to end by the losslessness tests."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import tiny_target
from verifier_svc import packed_gqa_attention
from verifier_svc.target_engine import TargetEngine


def _block_logits(model, ids: list[int], prefix: int) -> list[torch.Tensor]:
    """Prefill `prefix` tokens, then verify the rest as blocks of 1..8 (each rolled back)."""
    eng = TargetEngine(model)
    eng.open("s")
    out = [eng.extend("s", ids[:prefix]).logits]
    for k in range(1, 9):
        out.append(eng.extend("s", ids[prefix : prefix + k]).logits)
        eng.rollback("s", prefix)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_attention_equals_sdpa(kind: str) -> None:
    model = tiny_target(kind)
    assert model.config._attn_implementation == packed_gqa_attention.NAME  # load_target installs it
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA: the packed path runs
    ids = torch.randint(0, model.config.vocab_size - 2, (60,), generator=torch.Generator().manual_seed(3)).tolist()
    packed = _block_logits(model, ids, 40)
    model.set_attn_implementation("sdpa")
    reference = _block_logits(model, ids, 40)
    assert torch.equal(packed[1], reference[1])  # one query: the packed path is SDPA's own call
    for a, b in zip(packed, reference):
        ulps = 4 * torch.finfo(torch.float32).eps * float(b.abs().max())
        assert float((a - b).abs().max()) <= ulps
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_blocks_never_repeat_the_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_target("llama")
    kv_heads = model.config.num_key_value_heads
    groups = model.config.num_attention_heads // kv_heads
    calls: list[tuple[int, int, int]] = []  # (query rows, KV heads, keys)
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[1], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _block_logits(model, list(range(1, 30)), 20)
    layers = model.config.num_hidden_layers
    blocks = [c for c in calls if c[2] > 20]  # every forward after the 20-token prefill
    assert len(blocks) == 8 * layers
    # every forward ran against the KV heads themselves (no repeat_kv copy): one token through
    # SDPA's own GQA (no mask), k >= 2 tokens as groups * k packed rows
    expected = [(1, kv_heads)] + [(groups * k, kv_heads) for k in range(2, 9)]
    assert sorted({(rows, heads) for rows, heads, _ in blocks}) == expected


def test_other_models_keep_their_attention() -> None:
    model = tiny_target("deepseek_v4")
    assert model.config._attn_implementation != packed_gqa_attention.NAME
