"""The DSpark draft model: DeepSpec state-dict names/shapes, config.json compatibility, and the
equivalence of the cached inference block forward with the training forward."""

from __future__ import annotations

import pytest
import torch

from drafter_svc.config import DSparkConfig
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common.errors import InvalidRequest

V, D, H, KV, HD, I, L, T, R, B = 96, 32, 4, 2, 8, 48, 2, 3, 8, 4


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds spin-wait stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> DSparkConfig:
    base = dict(
        vocab_size=V, hidden_size=D, intermediate_size=I, num_attention_heads=H, num_key_value_heads=KV,
        head_dim=HD, num_hidden_layers=L, num_target_layers=6, target_layer_ids=[-1, 2, 4], block_size=B,
        mask_token_id=V - 1, rope_theta=10000.0, initializer_range=0.1, markov_rank=R,
        markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True,
    )
    base.update(overrides)
    return DSparkConfig(**base)


def deepspec_shapes(*, r: int, head_type: str | None, confidence: bool, conf_with_markov: bool) -> dict:
    """The state dict of a DeepSpec Qwen3DSparkModel, written out from reference §6.2."""
    shapes = {"embed_tokens.weight": (V, D)}
    for i in range(L):
        shapes.update({
            f"layers.{i}.self_attn.q_proj.weight": (H * HD, D),
            f"layers.{i}.self_attn.k_proj.weight": (KV * HD, D),
            f"layers.{i}.self_attn.v_proj.weight": (KV * HD, D),
            f"layers.{i}.self_attn.o_proj.weight": (D, H * HD),
            f"layers.{i}.self_attn.q_norm.weight": (HD,),
            f"layers.{i}.self_attn.k_norm.weight": (HD,),
            f"layers.{i}.mlp.gate_proj.weight": (I, D),
            f"layers.{i}.mlp.up_proj.weight": (I, D),
            f"layers.{i}.mlp.down_proj.weight": (D, I),
            f"layers.{i}.input_layernorm.weight": (D,),
            f"layers.{i}.post_attention_layernorm.weight": (D,),
        })
    shapes["norm.weight"] = (D,)
    shapes["fc.weight"] = (D, T * D)
    shapes["hidden_norm.weight"] = (D,)
    shapes["lm_head.weight"] = (V, D)
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (V, r)
        shapes["markov_head.markov_w2.weight"] = (V, r)
        if head_type == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, D + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        if head_type == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + D)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
    if confidence:
        shapes["confidence_head.proj.weight"] = (1, D + r if conf_with_markov else D)
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


VARIANTS = {
    "vanilla": dict(markov_rank=R, markov_head_type="vanilla"),
    "gated": dict(markov_rank=R, markov_head_type="gated"),
    "rnn": dict(markov_rank=R, markov_head_type="rnn"),
    "dflash": dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False),
    "conf_no_markov": dict(markov_rank=R, markov_head_type="vanilla", confidence_head_with_markov=False),
    "rank0_conf": dict(markov_rank=0, confidence_head_with_markov=False),
}


def _expected(cfg: DSparkConfig) -> dict:
    return deepspec_shapes(
        r=cfg.markov_rank,
        head_type=cfg.markov_head_type if cfg.markov_rank else None,
        confidence=cfg.enable_confidence_head,
        conf_with_markov=cfg.confidence_head_with_markov,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_names_and_shapes_match_deepspec(variant):
    cfg = tiny_config(**VARIANTS[variant])
    got = {k: tuple(v.shape) for k, v in DSparkDrafter(cfg).state_dict().items()}
    assert got == _expected(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deepspec_named_state_dict_loads_strictly(variant):
    cfg = tiny_config(**VARIANTS[variant])
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in _expected(cfg).items()}
    model = DSparkDrafter(cfg)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_rotary_buffer_is_non_persistent_and_stays_fp32():
    model = DSparkDrafter(tiny_config())
    assert "rotary_emb.inv_freq" not in model.state_dict()
    assert "rotary_emb.inv_freq" in dict(model.named_buffers())
    fp32 = model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.fc.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary_emb.inv_freq, fp32)


def test_init_follows_hf_post_init():
    model = DSparkDrafter(tiny_config(markov_head_type="gated", initializer_range=0.02))
    sd = model.state_dict()
    for name, t in sd.items():
        if "norm" in name:
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith(".bias"):
            assert torch.equal(t, torch.zeros_like(t)), name
    assert abs(sd["lm_head.weight"].std().item() - 0.02) < 0.004


# ---------------------------------------------------------------------------- config.json

QWEN3_4B_DRAFT = {
    "architectures": ["Qwen3DSparkModel"], "attention_bias": False, "attention_dropout": 0.0,
    "block_size": 7, "bos_token_id": 151643, "confidence_head_with_markov": True, "dtype": "bfloat16",
    "enable_confidence_head": True, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
    "layer_types": ["full_attention"] * 5, "markov_head_type": "vanilla", "markov_rank": 256,
    "mask_token_id": 151669, "max_position_embeddings": 40960, "max_window_layers": 36,
    "model_type": "qwen3", "num_anchors": 512, "num_attention_heads": 32, "num_hidden_layers": 5,
    "num_key_value_heads": 8, "num_target_layers": 36, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "sliding_window": None,
    "target_layer_ids": [1, 9, 17, 25, 33], "tie_word_embeddings": False, "transformers_version": "5.10.2",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_config_reads_deepspec_config_with_rope_parameters():
    cfg = DSparkConfig.from_dict(QWEN3_4B_DRAFT)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads) == (151936, 2560, 128, 8)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.block_size == 7 and cfg.mask_token_id == 151669
    assert cfg.markov_rank == 256 and cfg.markov_head_type == "vanilla"
    assert cfg.enable_confidence_head and cfg.confidence_head_with_markov
    assert cfg.dtype == "bfloat16"
    assert cfg.extra == {"max_window_layers": 36, "sliding_window": None,
                         "transformers_version": "5.10.2", "use_cache": True, "use_sliding_window": False}
    out = cfg.to_dict()
    for key, value in QWEN3_4B_DRAFT.items():
        if key != "rope_parameters":
            assert out[key] == value, key
    assert out["rope_parameters"] == {"rope_theta": 1e6, "rope_type": "default"}
    assert DSparkConfig.from_dict(out) == cfg


def test_config_reads_top_level_rope_theta_and_torch_dtype():
    d = dict(QWEN3_4B_DRAFT)
    del d["rope_parameters"], d["dtype"]
    d.update(rope_theta=1000000.0, torch_dtype="bfloat16")
    cfg = DSparkConfig.from_dict(d)
    assert cfg == DSparkConfig.from_dict(QWEN3_4B_DRAFT)
    assert DSparkConfig.from_dict(cfg.to_dict()) == cfg


def test_config_head_dim_defaults_to_hidden_over_heads():
    d = tiny_config().to_dict()
    del d["head_dim"]
    assert DSparkConfig.from_dict(d).head_dim == D // H


def test_config_optional_keys_follow_deepspec():
    dflash = tiny_config(**VARIANTS["dflash"]).to_dict()
    assert "confidence_head_with_markov" not in dflash and "markov_head_type" not in dflash
    assert dflash["markov_rank"] == 0 and dflash["enable_confidence_head"] is False
    assert dflash["layer_types"] == ["full_attention"] * L and dflash["tie_word_embeddings"] is False
    assert "sts_temperatures" not in dflash
    cfg = tiny_config(sts_temperatures=[1.0, 1.5, 2.0, 0.5])
    assert DSparkConfig.from_dict(cfg.to_dict()).sts_temperatures == [1.0, 1.5, 2.0, 0.5]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(target_layer_ids=[2, 1]),
        dict(target_layer_ids=[-2, 1]),
        dict(target_layer_ids=[0, 6]),
        dict(target_layer_ids=[0, 5]),  # the last target layer
        dict(target_layer_ids=[]),
        dict(markov_head_type="lstm"),
        dict(markov_rank=0),  # confidence_head_with_markov without a Markov head
        dict(sts_temperatures=[1.0, 1.0]),
        dict(sts_temperatures=[1.0, 1.0, 0.0, 1.0]),
        dict(mask_token_id=V),
        dict(num_key_value_heads=3),
    ],
)
def test_config_rejects_invalid_values(overrides):
    with pytest.raises(InvalidRequest):
        tiny_config(**overrides)


def test_config_from_target_qwen3_and_llama():
    from transformers import LlamaConfig, Qwen3Config

    qwen = Qwen3Config(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=6,
                       num_attention_heads=H, num_key_value_heads=KV, head_dim=HD, rope_theta=12345.0)
    cfg = DSparkConfig.from_target(qwen, num_hidden_layers=2, target_layer_ids=[-1, 2, 4], block_size=B,
                                   mask_token_id=V - 1, markov_rank=R)
    assert (cfg.num_target_layers, cfg.head_dim, cfg.rope_theta) == (6, HD, 12345.0)
    assert cfg.enable_confidence_head and cfg.confidence_head_with_markov
    DSparkDrafter(cfg)

    llama = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=4,
                        num_attention_heads=H, num_key_value_heads=KV,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    cfg = DSparkConfig.from_target(llama, num_hidden_layers=1, target_layer_ids=[0, 2], block_size=B,
                                   mask_token_id=0, markov_rank=0)
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == D // H and not cfg.confidence_head_with_markov
    for bad in ([0, 3], [2, 0], [0, 4]):
        with pytest.raises(InvalidRequest):
            DSparkConfig.from_target(llama, num_hidden_layers=1, target_layer_ids=bad, block_size=B,
                                     mask_token_id=0, markov_rank=0)


def test_scaled_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llama = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=4,
                        num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=512,
                        rope_parameters=rope)
    cfg = DSparkConfig.from_target(llama, num_hidden_layers=1, target_layer_ids=[0, 2], block_size=B,
                                   mask_token_id=0, markov_rank=0)
    assert cfg.rope_type == "llama3"
    ours = DSparkDrafter(cfg).rotary_emb.inv_freq
    assert torch.allclose(ours, LlamaRotaryEmbedding(llama).inv_freq)
    assert DSparkConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------- forwards


def _inputs(seq_len: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, seq_len, T * D, generator=g)
    ids = torch.randint(0, V - 1, (batch, seq_len), generator=g)
    return feats, ids


@pytest.mark.parametrize("variant", ["vanilla", "gated", "rnn", "dflash", "conf_no_markov"])
def test_inference_block_matches_training_forward(variant):
    torch.manual_seed(0)
    model = DSparkDrafter(tiny_config(**VARIANTS[variant])).eval()
    seq_len = 12
    feats, ids = _inputs(seq_len, 2)
    anchors = torch.tensor([[0, 3, 7, 0], [2, 9, 5, 11]])
    keep = torch.tensor([[True, True, True, False], [True, True, True, True]])
    with torch.no_grad():
        train = model.forward_train(feats, ids, anchors, keep)
        assert train.logits.shape == (2, 4, B, V) and train.hidden.shape == (2, 4, B, D)
        assert torch.isfinite(train.logits).all()  # dummy blocks included
        for bi in range(2):
            for n in range(4):
                if not keep[bi, n]:
                    continue
                a = int(anchors[bi, n])
                kv = model.context_kv(model.project_context(feats[bi, :a]), torch.arange(a))
                h, base = model.forward_block([kv], ids[bi, a : a + 1], torch.tensor([a]))
                torch.testing.assert_close(h[0], train.hidden[bi, n], atol=1e-5, rtol=1e-5)
                prev, state, rows, confs = ids[bi, a : a + 1], None, [], []
                for k in range(B):
                    bias, state = model.markov_step(prev, h[:, k], state)
                    rows.append(base[0, k] if bias is None else base[0, k] + bias[0])
                    confs.append(model.confidence_logits(h[:, k], prev))
                    prev = train.prev_tokens[bi, n, k + 1 : k + 2] if k + 1 < B else prev
                torch.testing.assert_close(torch.stack(rows), train.logits[bi, n], atol=1e-5, rtol=1e-5)
                if model.confidence_head is None:
                    assert train.confidence_logits is None
                else:
                    assert train.confidence_logits.dtype == torch.float32
                    torch.testing.assert_close(torch.cat(confs), train.confidence_logits[bi, n], atol=1e-5, rtol=1e-5)


def test_teacher_forced_tokens_are_data_tokens():
    model = DSparkDrafter(tiny_config()).eval()
    feats, ids = _inputs(10, 1)
    with torch.no_grad():
        out = model.forward_train(feats, ids, torch.tensor([[2, 8]]), torch.tensor([[True, True]]))
    assert out.prev_tokens[0, 0].tolist() == ids[0, 2:6].tolist()
    assert out.prev_tokens[0, 1].tolist() == [ids[0, 8], ids[0, 9], ids[0, 9], ids[0, 9]]  # clamped past the end


def test_batched_ragged_block_matches_single():
    torch.manual_seed(1)
    model = DSparkDrafter(tiny_config(markov_head_type="rnn")).eval()
    feats, ids = _inputs(14, 1)
    lens = [3, 0, 13]
    with torch.no_grad():
        ctxs = [model.context_kv(model.project_context(feats[0, :n]), torch.arange(n)) for n in lens]
        anchors = torch.tensor([int(ids[0, n]) for n in lens])
        h, base = model.forward_block(ctxs, anchors, torch.tensor(lens))
        for i, n in enumerate(lens):
            h1, base1 = model.forward_block([ctxs[i]], anchors[i : i + 1], torch.tensor([n]))
            torch.testing.assert_close(h[i], h1[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(base[i], base1[0], atol=1e-5, rtol=1e-5)


def test_bf16_forward_runs_and_tracks_fp32():
    torch.manual_seed(2)
    model = DSparkDrafter(tiny_config(markov_head_type="gated")).eval()
    feats, ids = _inputs(9, 1)
    anchors, keep = torch.tensor([[4]]), torch.tensor([[True]])
    with torch.no_grad():
        ref = model.forward_train(feats, ids, anchors, keep)
        model.to(torch.bfloat16)
        out = model.forward_train(feats, ids, anchors, keep)
        kv = model.context_kv(model.project_context(feats[0, :4]), torch.arange(4))
        h, base = model.forward_block([kv], ids[0, 4:5], torch.tensor([4]))
    assert out.logits.dtype == torch.bfloat16 and out.confidence_logits.dtype == torch.float32
    assert kv[0][0].dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    torch.testing.assert_close(out.hidden.float(), ref.hidden, atol=0.1, rtol=0.05)


def test_project_context_rejects_wrong_width():
    model = DSparkDrafter(tiny_config())
    with pytest.raises(InvalidRequest):
        model.project_context(torch.zeros(3, 2 * D))


def test_training_forward_backpropagates_into_trainable_parts_only():
    model = DSparkDrafter(tiny_config(markov_head_type="rnn"))
    model.init_from_target(torch.randn(V, D), torch.randn(V, D))
    feats, ids = _inputs(10, 1)
    out = model.forward_train(feats, ids, torch.tensor([[1, 6]]), torch.tensor([[True, True]]))
    (out.logits.float().logsumexp(-1).mean() + out.confidence_logits.mean()).backward()
    assert model.embed_tokens.weight.grad is None and model.lm_head.weight.grad is None
    for name in ("fc", "hidden_norm", "norm"):
        assert getattr(model, name).weight.grad is not None, name
    assert model.markov_head.joint_proj.weight.grad.abs().sum() > 0
    assert model.confidence_head.proj.weight.grad.abs().sum() > 0
    with pytest.raises(InvalidRequest):
        model.init_from_target(torch.randn(V, D + 1), torch.randn(V, D))
