"""DeepSpec-format draft checkpoints: exact round trips, slim files without the frozen target
weights, shards, and clear errors for files that do not fit their config."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from drafter_svc.checkpoint import FROZEN_FLAG as FROZEN
from drafter_svc.checkpoint import load_checkpoint, save_checkpoint
from drafter_svc.config import DSparkConfig
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common.errors import FailedPrecondition, InvalidRequest

V, D = 80, 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds spin-wait stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> DSparkConfig:
    base = dict(
        vocab_size=V, hidden_size=D, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_hidden_layers=2, num_target_layers=6, target_layer_ids=[1, 3], block_size=4,
        mask_token_id=V - 1, rope_theta=10000.0, markov_rank=8, markov_head_type="gated",
        enable_confidence_head=True, confidence_head_with_markov=True, sts_temperatures=[1.0, 1.2, 1.4, 2.0],
        extra={"transformers_version": "5.10.2", "use_cache": True},
    )
    base.update(overrides)
    return DSparkConfig(**base)


def _model(cfg: DSparkConfig, seed: int = 0) -> DSparkDrafter:
    torch.manual_seed(seed)
    model = DSparkDrafter(cfg)
    with torch.no_grad():  # non-trivial norms/biases so a dropped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _assert_same_weights(a: DSparkDrafter, b: DSparkDrafter) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _file_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", "none"])
def test_save_load_round_trip_is_bit_exact(tmp_path, head):
    overrides = (dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)
                 if head == "none" else dict(markov_head_type=head))
    cfg = tiny_config(**overrides)
    model = _model(cfg)
    save_checkpoint(model, cfg, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3DSparkModel"] and saved["dtype"] == "float32"
    assert FROZEN not in saved
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == dataclasses.replace(cfg, dtype="float32")  # dtype records the file's
    _assert_same_weights(model, loaded)
    assert not loaded.training
    assert torch.equal(loaded.rotary_emb.inv_freq, model.rotary_emb.inv_freq)


def test_slim_checkpoint_takes_frozen_weights_from_target(tmp_path):
    cfg = tiny_config()
    model = _model(cfg)
    save_checkpoint(model, cfg, tmp_path, include_frozen=False)
    assert "embed_tokens.weight" not in _file_keys(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in _file_keys(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())[FROZEN] is True

    loaded = load_checkpoint(
        tmp_path, target_embed=model.embed_tokens.weight.detach().clone(),
        target_lm_head=model.lm_head.weight.detach().clone(),
    )
    _assert_same_weights(model, loaded)
    assert FROZEN not in loaded.config.extra

    with pytest.raises(FailedPrecondition, match="embed_tokens.weight"):
        load_checkpoint(tmp_path, target_lm_head=model.lm_head.weight.detach())
    with pytest.raises(FailedPrecondition, match="lm_head.weight"):
        load_checkpoint(tmp_path, target_embed=model.embed_tokens.weight.detach())
    with pytest.raises(InvalidRequest, match="target_embed"):
        load_checkpoint(tmp_path, target_embed=torch.zeros(V + 1, D), target_lm_head=torch.zeros(V, D))
    with pytest.raises(InvalidRequest, match="target_lm_head"):
        load_checkpoint(tmp_path, target_embed=torch.zeros(V, D), target_lm_head=torch.zeros(V, D + 1))


def test_tied_target_weights_load_and_resave(tmp_path):
    cfg = tiny_config()
    model = _model(cfg)
    save_checkpoint(model, cfg, tmp_path / "slim", include_frozen=False)
    tied = torch.randn(V, D)
    loaded = load_checkpoint(tmp_path / "slim", target_embed=tied, target_lm_head=tied)
    save_checkpoint(loaded, loaded.config, tmp_path / "full")  # shared storage must not break saving
    again = load_checkpoint(tmp_path / "full")
    assert torch.equal(again.embed_tokens.weight, tied) and torch.equal(again.lm_head.weight, tied)


def test_bf16_checkpoint(tmp_path):
    cfg = tiny_config()
    model = _model(cfg)
    save_checkpoint(model, cfg, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
    as_fp32 = load_checkpoint(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(as_fp32.state_dict()[k], v.to(torch.bfloat16).float()), k
    as_bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert as_bf16.fc.weight.dtype == torch.bfloat16
    assert as_bf16.rotary_emb.inv_freq.dtype == torch.float32


def test_sharded_checkpoint(tmp_path):
    cfg = tiny_config()
    model = _model(cfg)
    save_checkpoint(model, cfg, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for filename, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / filename), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_weights(model, load_checkpoint(tmp_path))


def _deepspec_dir(tmp_path, extra_tensors=None, drop=()):
    """A checkpoint written the way DeepSpec's save_pretrained does: Qwen3 config (rope_parameters,
    dtype) and bf16 tensors under DeepSpec's names (reference §6.2), no STS field."""
    r, L, I, T = 8, 2, 48, 2
    shapes = {"embed_tokens.weight": (V, D), "norm.weight": (D,), "fc.weight": (D, T * D),
              "hidden_norm.weight": (D,), "lm_head.weight": (V, D),
              "markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r),
              "confidence_head.proj.weight": (1, D + r), "confidence_head.proj.bias": (1,)}
    for i in range(L):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (32, D), p + "self_attn.k_proj.weight": (16, D),
                       p + "self_attn.v_proj.weight": (16, D), p + "self_attn.o_proj.weight": (D, 32),
                       p + "self_attn.q_norm.weight": (8,), p + "self_attn.k_norm.weight": (8,),
                       p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                       p + "mlp.down_proj.weight": (D, I), p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,)})
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items() if k not in drop}
    tensors.update(extra_tensors or {})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3DSparkModel"], "attention_bias": False, "attention_dropout": 0.0,
        "block_size": 4, "bos_token_id": 1, "eos_token_id": [2, 3], "confidence_head_with_markov": True,
        "dtype": "bfloat16", "enable_confidence_head": True, "head_dim": 8, "hidden_act": "silu",
        "hidden_size": D, "initializer_range": 0.02, "intermediate_size": I,
        "layer_types": ["full_attention"] * L, "markov_head_type": "vanilla", "markov_rank": r,
        "mask_token_id": V - 2, "max_position_embeddings": 4096, "max_window_layers": 28, "model_type": "qwen3",
        "num_anchors": 512, "num_attention_heads": 4, "num_hidden_layers": L, "num_key_value_heads": 2,
        "num_target_layers": 8, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "sliding_window": None,
        "target_layer_ids": [1, 5], "tie_word_embeddings": False, "transformers_version": "5.10.2",
        "use_cache": True, "use_sliding_window": False, "vocab_size": V,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tensors


def test_loads_a_deepspec_checkpoint(tmp_path):
    tensors = _deepspec_dir(tmp_path)
    model = load_checkpoint(tmp_path)
    assert model.config.rope_theta == 1e6 and model.config.eos_token_id == [2, 3]
    assert model.config.sts_temperatures is None
    sd = model.state_dict()
    assert sd.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(sd[k], v.float()), k
    # Re-saving keeps DeepSpec's keys and the target's extra config fields.
    save_checkpoint(model, model.config, tmp_path / "resaved", dtype=torch.bfloat16)
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["max_window_layers"] == 28 and resaved["use_sliding_window"] is False
    assert _file_keys(tmp_path / "resaved" / "model.safetensors") == set(tensors)


def test_mismatched_checkpoint_reports_keys(tmp_path):
    _deepspec_dir(tmp_path, extra_tensors={"markov_head.gate_proj.weight": torch.zeros(8, D + 8)},
                  drop=("norm.weight",))
    with pytest.raises(FailedPrecondition) as e:
        load_checkpoint(tmp_path)
    assert "missing keys ['norm.weight']" in str(e.value)
    assert "unexpected keys ['markov_head.gate_proj.weight']" in str(e.value)


def test_wrong_shape_and_missing_files(tmp_path):
    _deepspec_dir(tmp_path, extra_tensors={"fc.weight": torch.zeros(D, 3 * D)})
    with pytest.raises(FailedPrecondition, match="fc.weight"):
        load_checkpoint(tmp_path)
    with pytest.raises(FailedPrecondition, match="config.json"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FailedPrecondition, match="model.safetensors"):
        load_checkpoint(tmp_path)
