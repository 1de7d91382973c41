"""The DSpark draft model's configuration and its DeepSpec `config.json` format.

A DeepSpec draft config is the target's config deep-copied and overridden with the DSpark fields
(reference §6.1). `DSparkConfig` keeps the fields the model needs as typed attributes, keeps every
other key in `extra` so a checkpoint's config round-trips, and adds one extension of ours:
`sts_temperatures` (Sequential Temperature Scaling, one confidence temperature per slot)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dspark_common.errors import InvalidRequest

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh")
ARCHITECTURE = "Qwen3DSparkModel"

# Keys that to_dict always writes itself: reading them into `extra` would let a stale value win.
_DERIVED_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "layer_types",
        "tie_word_embeddings",
        "attention_bias",
        "attention_dropout",
        "torch_dtype",
        "dtype",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
    }
)
# Rope types whose frequencies depend on the current sequence length; the drafter rotates cached
# context keys once, so only static frequency tables are usable.
_DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})


@dataclass
class DSparkConfig:
    """Everything needed to build a `DSparkDrafter`.

    Target-derived fields describe the Qwen3-style layers (they copy the target's shapes);
    DSpark fields describe the draft: `num_hidden_layers` draft layers fed by the target layers
    `target_layer_ids` (out of `num_target_layers`), blocks of `block_size` slots."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    target_layer_ids: list[int]
    block_size: int
    mask_token_id: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_target_layers: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Non-default RoPE parameters (rope_type, factor, ...) without rope_theta; None = default RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    initializer_range: float = 0.02
    dtype: str = "bfloat16"
    num_anchors: int = 512
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    sts_temperatures: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        self.markov_head_type = str(self.markov_head_type).lower()
        # Fields DeepSpec leaves out of config.json when they have no effect get one canonical
        # value, so equal models have equal configs.
        if self.markov_rank == 0:
            self.markov_head_type = "vanilla"
        if not self.enable_confidence_head:
            self.confidence_head_with_markov = False
        if self.sts_temperatures is not None:
            self.sts_temperatures = [float(t) for t in self.sts_temperatures]
        self.validate()

    # ------------------------------------------------------------------ derived properties

    @property
    def num_context_layers(self) -> int:
        """T: how many target layers are concatenated into one context feature."""
        return len(self.target_layer_ids)

    @property
    def context_feature_size(self) -> int:
        """Width of one context feature row, T * d."""
        return self.num_context_layers * self.hidden_size

    @property
    def confidence_uses_markov(self) -> bool:
        return self.enable_confidence_head and self.confidence_head_with_markov

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", "default"))

    # ------------------------------------------------------------------ validation

    def validate(self) -> "DSparkConfig":
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_hidden_layers", "block_size", "num_anchors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}", name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidRequest(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})",
                "num_key_value_heads",
            )
        if self.head_dim % 2:
            raise InvalidRequest(f"head_dim must be even for RoPE, got {self.head_dim}", "head_dim")
        validate_target_layer_ids(self.target_layer_ids, self.num_target_layers)
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            raise InvalidRequest(
                f"mask_token_id must be a token id in [0, {self.vocab_size}), got {self.mask_token_id!r}",
                "mask_token_id",
            )
        if not isinstance(self.markov_rank, int) or self.markov_rank < 0:
            raise InvalidRequest(f"markov_rank must be an integer >= 0, got {self.markov_rank!r}", "markov_rank")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise InvalidRequest(
                f"markov_head_type must be one of {list(MARKOV_HEAD_TYPES)}, got {self.markov_head_type!r}",
                "markov_head_type",
            )
        if self.confidence_uses_markov and self.markov_rank == 0:
            raise InvalidRequest(
                "confidence_head_with_markov needs a Markov head (markov_rank > 0)", "confidence_head_with_markov"
            )
        if self.sts_temperatures is not None:
            if len(self.sts_temperatures) != self.block_size:
                raise InvalidRequest(
                    f"sts_temperatures needs one temperature per slot ({self.block_size}), "
                    f"got {len(self.sts_temperatures)}",
                    "sts_temperatures",
                )
            if not all(math.isfinite(t) and t > 0 for t in self.sts_temperatures):
                raise InvalidRequest(
                    f"sts_temperatures must be finite and > 0, got {self.sts_temperatures}", "sts_temperatures"
                )
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise InvalidRequest(f"rope_theta must be > 0, got {self.rope_theta!r}", "rope_theta")
        if self.rope_type in _DYNAMIC_ROPE_TYPES:
            raise InvalidRequest(
                f"rope_type {self.rope_type!r} is sequence-length dependent; the draft cache needs static RoPE",
                "rope_parameters",
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise InvalidRequest(
                f"hidden_act must be one of {list(SUPPORTED_ACTIVATIONS)}, got {self.hidden_act!r}", "hidden_act"
            )
        if not self.rms_norm_eps > 0:
            raise InvalidRequest(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}", "rms_norm_eps")
        return self

    # ------------------------------------------------------------------ DeepSpec config.json

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DSparkConfig":
        """Read a DeepSpec draft `config.json` dict. Unknown keys are kept in `extra`."""
        if not isinstance(d, Mapping):
            raise InvalidRequest(f"a draft config must be a JSON object, got {type(d).__name__}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_hidden_layers", "target_layer_ids", "block_size", "mask_token_id")
        missing = [k for k in required if k not in d]
        if missing:
            raise InvalidRequest(f"draft config is missing required keys: {missing}")
        if d.get("attention_bias"):
            raise InvalidRequest("attention_bias=true is not supported by the DSpark drafter", "attention_bias")
        theta, rope_scaling = _read_rope(d)
        known = {f.name for f in fields(cls)} - {"extra", "rope_theta", "rope_scaling", "dtype"}
        # A null value means "not set": the field's default applies.
        kwargs = {k: copy.deepcopy(d[k]) for k in known if d.get(k) is not None}
        extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in known and k not in _DERIVED_KEYS}
        dtype = d.get("dtype", d.get("torch_dtype")) or "bfloat16"
        return cls(**kwargs, rope_theta=float(theta), rope_scaling=rope_scaling,
                   dtype=_dtype_name(dtype), extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """DeepSpec's config.json format (§6.1), plus our `sts_temperatures` when set."""
        out: dict[str, Any] = copy.deepcopy(self.extra)
        rope_parameters = {"rope_type": "default", **copy.deepcopy(self.rope_scaling or {}),
                           "rope_theta": self.rope_theta}
        out.update(
            model_type="qwen3",
            architectures=[ARCHITECTURE],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            # Both serialisations: transformers 4.x reads rope_theta, 5.x reads rope_parameters.
            rope_theta=self.rope_theta,
            rope_parameters=rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=False,
            attention_dropout=0.0,  # the drafter has no dropout
            initializer_range=self.initializer_range,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            dtype=self.dtype,
            num_hidden_layers=self.num_hidden_layers,
            layer_types=["full_attention"] * self.num_hidden_layers,
            tie_word_embeddings=False,
            block_size=self.block_size,
            mask_token_id=self.mask_token_id,
            target_layer_ids=list(self.target_layer_ids),
            num_anchors=self.num_anchors,
            enable_confidence_head=self.enable_confidence_head,
            markov_rank=self.markov_rank,
        )
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        if self.enable_confidence_head:
            out["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.markov_rank > 0:
            out["markov_head_type"] = self.markov_head_type
        if self.sts_temperatures is not None:
            out["sts_temperatures"] = list(self.sts_temperatures)
        return out

    # ------------------------------------------------------------------ from a target model

    @classmethod
    def from_target(
        cls,
        hf_config: Any,
        *,
        num_hidden_layers: int,
        target_layer_ids: list[int],
        block_size: int,
        mask_token_id: int,
        markov_rank: int,
        markov_head_type: str = "vanilla",
        enable_confidence_head: bool = True,
        confidence_head_with_markov: bool | None = None,
        num_anchors: int = 512,
        sts_temperatures: list[float] | None = None,
    ) -> "DSparkConfig":
        """A draft config for any transformers causal-LM config (Llama, Qwen3, DeepSeek-V4, ...).

        `confidence_head_with_markov` defaults to "whenever there is a Markov head", as in the
        released DSpark configs."""
        cfg = hf_config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()
        get = (lambda k, default=None: cfg.get(k, default)) if isinstance(cfg, Mapping) else (
            lambda k, default=None: getattr(cfg, k, default))

        num_target_layers = get("num_hidden_layers")
        if not isinstance(num_target_layers, int):
            raise InvalidRequest("the target config has no num_hidden_layers", "num_hidden_layers")
        validate_target_layer_ids(list(target_layer_ids), num_target_layers)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim") or (hidden // heads if hidden and heads else None)
        theta, rope_scaling = _read_rope({k: get(k) for k in ("rope_theta", "rope_parameters", "rope_scaling")})
        if confidence_head_with_markov is None:
            confidence_head_with_markov = markov_rank > 0
        dtype = get("dtype", None) or get("torch_dtype", None) or "bfloat16"
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            num_hidden_layers=num_hidden_layers,
            num_target_layers=num_target_layers,
            target_layer_ids=list(target_layer_ids),
            block_size=block_size,
            mask_token_id=mask_token_id,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6) or 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 40960) or 40960,
            hidden_act=get("hidden_act", "silu") or "silu",
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            initializer_range=float(get("initializer_range", 0.02) or 0.02),
            dtype=_dtype_name(dtype),
            num_anchors=num_anchors,
            markov_rank=markov_rank,
            markov_head_type=markov_head_type,
            enable_confidence_head=enable_confidence_head,
            confidence_head_with_markov=bool(enable_confidence_head and confidence_head_with_markov),
            sts_temperatures=sts_temperatures,
        )


def validate_target_layer_ids(layer_ids: list[int], num_target_layers: int | None) -> list[int]:
    """Strictly increasing ids in {-1} ∪ [0, num_target_layers-1], never the last target layer
    (HF returns the last layer's output final-normed, not raw)."""
    if not layer_ids:
        raise InvalidRequest("target_layer_ids must not be empty", "target_layer_ids")
    previous: int | None = None
    for layer_id in layer_ids:
        if not isinstance(layer_id, int) or isinstance(layer_id, bool) or layer_id < -1:
            raise InvalidRequest(
                f"target_layer_ids entries must be -1 (embeddings) or a layer index >= 0, got {layer_id!r}",
                "target_layer_ids",
            )
        if num_target_layers is not None and layer_id > num_target_layers - 1:
            raise InvalidRequest(
                f"target_layer_id {layer_id} is out of range {{-1}} ∪ [0, {num_target_layers - 1}]",
                "target_layer_ids",
            )
        if previous is not None and layer_id <= previous:
            raise InvalidRequest(f"target_layer_ids must be strictly increasing, got {layer_ids}", "target_layer_ids")
        previous = layer_id
    if num_target_layers is not None and layer_ids[-1] == num_target_layers - 1:
        raise InvalidRequest(
            f"target_layer_ids must not contain the last target layer ({num_target_layers - 1}): "
            "HF returns it after the final norm",
            "target_layer_ids",
        )
    return layer_ids


def _read_rope(d: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, non-default rope parameters) from `rope_theta`, `rope_parameters` (flat or per
    layer type) or a legacy `rope_scaling` dict."""
    params = d.get("rope_parameters") or d.get("rope_scaling")
    if isinstance(params, Mapping) and "rope_theta" not in params and isinstance(params.get("full_attention"), Mapping):
        params = params["full_attention"]
    params = dict(params) if isinstance(params, Mapping) else {}
    theta = d.get("rope_theta")
    if theta is None:
        theta = params.get("rope_theta")
    if theta is None:
        raise InvalidRequest("the config has no RoPE base (rope_theta or rope_parameters.rope_theta)", "rope_theta")
    rest = {k: v for k, v in params.items() if k != "rope_theta"}
    if "type" in rest and "rope_type" not in rest:  # transformers 4.x legacy spelling
        rest["rope_type"] = rest.pop("type")
    return float(theta), (rest if rest.get("rope_type", "default") != "default" else None)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
