"""The parallel backbone of the DSpark drafter (reference §1): Qwen3-style decoder layers whose
attention injects the projected target context as extra keys/values, absolute-position RoPE, and
the visibility masks of training and inference.

The modules here are assembled by `dspark_model.DSparkDrafter`, which owns them as direct
attributes so that the state dict carries DeepSpec's top-level names."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from drafter_svc.config import DSparkConfig

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(config: DSparkConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [hd/2] fp32, attention scaling) for the config's RoPE."""
    hd = config.head_dim
    if config.rope_scaling is None:
        exponents = torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd
        return 1.0 / (config.rope_theta**exponents), 1.0
    # Scaled RoPE variants (llama3, yarn, linear, ...) are defined by transformers; reuse them so the
    # frequencies match the target's exactly.
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = Qwen3Config(**{k: v for k, v in config.to_dict().items() if k not in ("architectures", "layer_types")})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[config.rope_type](hf_config, device)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions. `inv_freq` is a non-persistent fp32 buffer: it is
    not in the state dict and stays fp32 when the module is cast to bf16."""

    inv_freq: torch.Tensor

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self._config = config
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_inv_freq(self, device: torch.device | str | None = None) -> None:
        """Recompute the table (after meta-device construction or a dtype cast)."""
        device = self.inv_freq.device if device is None else device
        self.inv_freq = rope_frequencies(self._config, device)[0]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # A bf16 inv_freq would rotate positions in the thousands visibly wrong.
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_inv_freq()
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [..., L] (int) -> cos, sin [..., L, hd] in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq.to(device=positions.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, L, hd], cos/sin [..., L, hd] (broadcast over heads)."""
    cos = cos.unsqueeze(-3)
    sin = sin.unsqueeze(-3)
    return x * cos + rotate_half(x) * sin


class DSparkAttention(nn.Module):
    """Non-causal GQA attention whose keys/values are [context ; block] (KV injection, §1.3).

    Context and block tokens share k_proj/v_proj/k_norm; the context part is fed the projected
    context H_ctx directly (no input_layernorm), so a layer's context K/V depend only on H_ctx and
    can be computed once and cached, already rotated with their absolute positions."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.scaling = hd**-0.5
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def project_kv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., L, d] -> rotated K and V, each [..., KV, L, hd]."""
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))).transpose(-2, -3)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(-2, -3)
        return apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [b, Q, d] block inputs at positions given by cos/sin [b, Q, hd]; ctx_k/ctx_v
        [b, KV, Lc, hd] rotated context; mask [b, 1, Q, Lc+Q] bool (True = visible)."""
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k_blk, v_blk = self.project_kv(x, cos, sin)
        k = torch.cat([ctx_k, k_blk], dim=-2)
        v = torch.cat([ctx_v, v_blk], dim=-2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Explicit repeat instead of SDPA's enable_gqa: every backend (CPU math, CUDA
            # mem-efficient with a dense mask) accepts it.
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim))


class DSparkMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DSparkDecoderLayer(nn.Module):
    """Pre-norm Qwen3 block with context KV injection."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.self_attn = DSparkAttention(config)
        self.mlp = DSparkMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx_k: torch.Tensor,
        ctx_v: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def training_visibility(
    anchors: torch.Tensor, keep: torch.Tensor, seq_len: int, block_size: int
) -> torch.Tensor:
    """Dense mask [b, 1, N*B, S + N*B] for N blocks over an S-position context.

    A kept block anchored at `a` sees context positions < a and its own B slots. A dummy block
    (keep false) sees only its own slots: DeepSpec hides it completely, but a fully masked SDPA
    row is NaN on some backends and dummy outputs are excluded from every loss anyway."""
    b, n = anchors.shape
    device = anchors.device
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [b, N*B]
    q_keep = keep.to(torch.bool).repeat_interleave(block_size, dim=1)
    ctx_pos = torch.arange(seq_len, device=device)
    sees_ctx = (ctx_pos.view(1, 1, -1) < q_anchor.unsqueeze(-1)) & q_keep.unsqueeze(-1)
    block_id = torch.arange(n * block_size, device=device) // block_size
    sees_block = (block_id.view(-1, 1) == block_id.view(1, -1)).expand(b, -1, -1)
    return torch.cat([sees_ctx, sees_block], dim=-1).unsqueeze(1)


def inference_visibility(ctx_lens: torch.Tensor, max_len: int, block_size: int) -> torch.Tensor:
    """Mask [b, 1, B, max_len + B] for blocks over right-padded contexts: the first ctx_lens[i]
    context entries and every slot of the block are visible, padding is not."""
    b = ctx_lens.shape[0]
    device = ctx_lens.device
    sees_ctx = torch.arange(max_len, device=device).view(1, -1) < ctx_lens.view(-1, 1)  # [b, Lmax]
    sees = torch.cat([sees_ctx, torch.ones(b, block_size, dtype=torch.bool, device=device)], dim=-1)
    return sees.view(b, 1, 1, -1).expand(b, 1, block_size, max_len + block_size)
