"""One configuration mechanism for every service: typed settings classes whose fields are read,
in order of precedence, from CLI flags (`--max-sessions`), environment variables
(`DSPARK_MAX_SESSIONS`) and the defaults below. `dspark <command> --help` lists them all."""

from __future__ import annotations

import argparse
import os
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError

from dspark_common.errors import InvalidRequest

ENV_PREFIX = "DSPARK_"


class Settings(BaseModel):
    """Base: subclasses declare fields with descriptions (they become the --help text)."""

    model_config = {"extra": "forbid"}

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for name, f in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_text = f"{f.description or ''} [env {cls.env_name(name)}; default {f.default!r}]"
            ann = f.annotation
            if ann is bool:
                parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif get_origin(ann) is Literal:
                parser.add_argument(flag, dest=name, choices=[str(c) for c in get_args(ann)], default=None, help=help_text)
            else:
                parser.add_argument(flag, dest=name, default=None, help=help_text)

    @classmethod
    def from_sources(cls, args: argparse.Namespace | None = None, env: dict[str, str] | None = None, **overrides: Any):
        """CLI values beat environment variables, which beat defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if cls.env_name(name) in env:
                values[name] = env[cls.env_name(name)]
            if args is not None and getattr(args, name, None) is not None:
                values[name] = getattr(args, name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(_coerce(cls, values))
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else None
            raise InvalidRequest(f"setting {field}: {err['msg']}", field) from None

    @classmethod
    def known_env_vars(cls) -> set[str]:
        return {cls.env_name(n) for n in cls.model_fields}


def _coerce(cls: type[Settings], values: dict[str, Any]) -> dict[str, Any]:
    """Strings from flags/env into the field types pydantic would not parse by itself (lists)."""
    out = {}
    for k, v in values.items():
        f = cls.model_fields.get(k)
        if f is not None and isinstance(v, str) and get_origin(f.annotation) is list:
            v = [x.strip() for x in v.split(",") if x.strip()]
        out[k] = v
    return out


class ModelSettings(Settings):
    threads: int = Field(0, description="torch intra-op threads (0 = torch's default)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model weights dtype")


class GenerateSettings(ModelSettings):
    model: str = Field("smollm2", description="target: 'smollm2' (packaged), a directory, a .gguf file or a hub id")
    drafter: str = Field("default", description="DSpark checkpoint directory; 'default' = the committed drafter, 'random' = untrained")


class ServiceSettings(ModelSettings):
    """What every gRPC service has: where it listens and how it names itself."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, description="port to listen on (0 = any free port, printed at start)")
    replica_id: str = Field("", description="this replica's id in KV handles ('' = a fresh random id per start)")
    max_message_mb: int = Field(64, ge=1, description="largest gRPC message accepted or sent, in MiB")


class DrafterSettings(ServiceSettings):
    port: int = Field(50052, description="port to listen on (0 = any free port, printed at start)")
    checkpoint: str = Field(
        "default", description="DSpark checkpoint directory; 'default' = the committed drafter, 'random' = untrained"
    )
    target: str = Field(
        "smollm2", description="target whose frozen embed_tokens/lm_head a slim checkpoint omits (see --model of verifier)"
    )
    max_sessions: int = Field(256, ge=1, description="draft sessions held at once")
    max_context: int = Field(32768, ge=1, description="context positions one draft session may hold")
    proposal_top_k: int = Field(8, ge=1, description="K of the sparse draft distribution sent per slot")
    batch_window_ms: float = Field(1.0, ge=0, description="how long a draft request waits for others to batch with")
    max_batch: int = Field(64, ge=1, description="most blocks drafted in one forward")


class VerifierSettings(ServiceSettings):
    port: int = Field(50051, description="port to listen on (0 = any free port, printed at start)")
    model: str = Field("smollm2", description="target: 'smollm2' (packaged), a directory, a .gguf file or a hub id")
    drafter: list[str] = Field(
        default_factory=list, description="drafter addresses HOST:PORT[,HOST:PORT...] ('' = target-only)"
    )
    feature_layers: list[int] = Field(
        default_factory=list, description="target layers whose features feed the drafter ('' = ask the drafter)"
    )
    max_sessions: int = Field(64, ge=1, description="sessions holding target KV at once (running + kept)")
    max_context: int = Field(0, ge=0, description="context window in tokens (0 = the model's)")
    draft_deadline_ms: float = Field(2000.0, gt=0, description="a draft reply later than this falls back to target-only")
    reconnect_min_ms: float = Field(50.0, gt=0, description="first reconnect delay to a lost drafter (doubles)")
    reconnect_max_ms: float = Field(2000.0, gt=0, description="longest reconnect delay to a lost drafter")
    drafter_wait_s: float = Field(30.0, ge=0, description="at start, how long to wait for a drafter to describe itself")
    feature_wire_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the projected context features sent to the drafter"
    )
    profile_sps: bool = Field(True, description="profile target steps/s at start for the confidence scheduler")
