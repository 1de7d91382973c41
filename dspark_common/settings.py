"""One configuration mechanism for every service: typed settings classes whose fields are read,
in order of precedence, from CLI flags (`--max-sessions`), environment variables
(`DSPARK_MAX_SESSIONS`) and the defaults below. `dspark <command> --help` lists them all."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError

from dspark_common.errors import InvalidRequest

ENV_PREFIX = "DSPARK_"
# The drafter setting both the drafter service and the in-process loop (`generate`, `eval`) have.
DRAFT_VOCAB_HELP = ("propose from the drafter checkpoint's draft vocabulary when it has one "
                    "(draft_vocab.safetensors; drafter_svc/draft_vocab.py); off = the full vocabulary")


def cache_root() -> Path:
    """Where converted targets and the compiled CPU kernel are kept (`DSPARK_CACHE_DIR`)."""
    return Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark"))


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
            help_text = f"{f.description or ''} [env {cls.env_name(name)}; default {f.get_default(call_default_factory=True)!r}]"
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
    cpu_kernel: bool = Field(True, description="few-row float32 CPU linears (decode steps, verify and draft blocks) "
                             "through the batch-invariant small-batch kernel instead of BLAS (dspark_common/small_batch_linear.py)")


class LookupSettings(Settings):
    """Drafts copied from the sequence itself (verifier_svc/ngram_lookup.py): whoever runs the
    decode loop has them — the verifier service and the in-process `generate`/`bench`."""

    ngram_lookup: bool = Field(True, description="when the last n tokens recurred earlier in the prompt or output, "
                               "draft the tokens that followed them instead of asking the drafter")
    lookup_min_ngram: int = Field(2, ge=1, le=16, description="shortest recurring suffix that counts as a match")
    lookup_max_ngram: int = Field(3, ge=1, le=16, description="longest suffix tried (longest match wins)")

    def lookup_config(self):
        """The decode loop's LookupConfig, or None when lookup is off."""
        from verifier_svc.ngram_lookup import LookupConfig

        if not self.ngram_lookup:
            return None
        try:
            return LookupConfig(self.lookup_min_ngram, self.lookup_max_ngram)
        except ValueError as e:  # the one check is LookupConfig's; here it names the setting
            raise InvalidRequest(f"setting lookup_min_ngram: {e}", "lookup_min_ngram") from None


class GenerateSettings(ModelSettings, LookupSettings):
    model: str = Field("smollm2", description="target: 'smollm2' (packaged), a directory, a .gguf file or a hub id")
    drafter: str = Field("default", description="DSpark checkpoint directory; 'default' = the committed drafter, 'random' = untrained")
    draft_vocab: bool = Field(True, description=DRAFT_VOCAB_HELP)


class ServiceSettings(ModelSettings):
    """What every gRPC service has: where it listens and how it names itself."""

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(0, description="port to listen on (0 = any free port, printed at start)")
    replica_id: str = Field("", description="this replica's id in KV handles ('' = a fresh random id per start)")
    max_message_mb: int = Field(64, ge=1, description="largest gRPC message accepted or sent, in MiB")
    metrics_port: int = Field(0, ge=0, description="port of the Prometheus /metrics endpoint (0 = off)")
    redis_url: str = Field("", description="register this replica in Redis (heartbeat with a TTL) ('' = don't)")
    redis_prefix: str = Field("dspark", description="prefix of the replica keys in Redis")
    advertise_host: str = Field("", description="host other replicas dial ('' = --host, or this machine's IP)")


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
    draft_vocab: bool = Field(True, description=DRAFT_VOCAB_HELP)
    batch_window_ms: float = Field(1.0, ge=0, description="how long a draft request waits for others to batch with")
    max_batch: int = Field(64, ge=1, description="most blocks drafted in one forward")


class VerifierSettings(ServiceSettings, LookupSettings):
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
    trace_round_spans: int = Field(32, ge=0, description="tracing: a span per round for the first this many rounds "
                                                         "of a generation; later rounds are aggregated into the decode span")


class RouterSettings(Settings):
    """`dspark router`: the public HTTP (OpenAI-compatible) and gRPC front door."""

    host: str = Field("127.0.0.1", description="address the HTTP and gRPC APIs listen on")
    port: int = Field(8000, ge=0, description="HTTP port (0 = any free port, printed at start)")
    grpc_port: int = Field(50050, ge=-1, description="gRPC port of dspark.v1.Router (0 = any free port, -1 = off)")
    model: str = Field("smollm2", description="the target whose tokenizer and chat template the router uses "
                                              "('smollm2', a directory, a .gguf file or a hub id); no weights load")
    model_name: str = Field("", description="model id served by /v1/models ('' = derived from --model)")
    verifier: list[str] = Field(default_factory=list, description="fixed verifier addresses HOST:PORT[,HOST:PORT...]")
    redis_url: str = Field("", description="Redis for sessions and the replica registry ('' = embedded in-process store)")
    redis_prefix: str = Field("dspark", description="prefix of every Redis key the router reads or writes")
    api_key: str = Field("", description="bearer token clients must send ('' = no auth)")
    max_sessions: int = Field(64, ge=1, description="generations running at once; more get 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with a 429")
    max_body_kb: int = Field(1024, ge=1, description="largest request body in KiB (413 above)")
    max_prompt_tokens: int = Field(4096, ge=1, description="longest prompt in tokens, session history included (413 above)")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    session_ttl_s: int = Field(3600, ge=1, description="a session (history, KV handle, stats) expires this long after its last use")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of one generation's Decode stream")
    health_interval_s: float = Field(1.0, gt=0, description="how often verifiers are probed (Stats) and Redis is scanned")
    failover_attempts: int = Field(3, ge=0, description="times one generation is re-placed after losing its verifier")
    failover_wait_s: float = Field(30.0, ge=0, description="how long a generation waits for a live verifier to appear")
    draft_prior: float = Field(0.6, ge=0, le=1, description="controller: acceptance assumed at every position before any is seen")
    draft_prior_weight: float = Field(2.0, gt=0, description="controller: how many observations the prior counts as")
    draft_smoothing: float = Field(0.05, gt=0, le=1, description="controller: smallest weight of a new observation (the EMA rate)")
    draft_forget: float = Field(0.05, ge=0, le=1, description="controller: per-round decay of the weight of positions a round did not observe")
    draft_probe_every: int = Field(32, ge=0, description="controller: at draft length 0, draft 1 token every this many rounds (0 = never)")
    max_draft_length: int = Field(16, ge=0, le=16, description="controller: longest draft length it chooses")
    verify_cost_per_token: float = Field(0.05, ge=0, description="controller: T(b) = 1 + this*(b-1) when no SPS profile is known")
    draft_cost: float = Field(0.1, ge=0, description="controller: time of one draft round, in target forwards of 1 token")
    draft_cost_per_token: float = Field(0.01, ge=0, description="controller: extra draft time per drafted token, same unit")
    sps_table: str = Field("", description="controller: target steps/s per forward size 'B:SPS,B:SPS' ('' = from verifier Stats or the linear model)")


class UpSettings(Settings):
    """`dspark up`: drafter(s), verifier(s) and the router as supervised child processes."""

    host: str = Field("127.0.0.1", description="address of the router's HTTP (and gRPC) API")
    port: int = Field(8000, ge=0, description="router HTTP port")
    grpc_port: int = Field(50050, ge=-1, description="router gRPC port (0 = any free port, -1 = off)")
    redis_url: str = Field("", description="Redis for sessions and registry ('' = the router's embedded store)")
    verifiers: int = Field(1, ge=1, description="verifier processes")
    drafters: int = Field(1, ge=0, description="drafter processes (0 = target-only)")
    model: str = Field("smollm2", description="target model of the verifiers, drafters and router tokenizer")
    checkpoint: str = Field("default", description="DSpark checkpoint of the drafters ('default', 'random' or a directory)")
    verifier_ports: list[int] = Field(default_factory=list, description="verifier gRPC ports ('' = free ports)")
    drafter_ports: list[int] = Field(default_factory=list, description="drafter gRPC ports ('' = free ports)")
    threads: int = Field(0, ge=0, description="torch threads per model process (0 = 1 on <= 4 cores, else cores / processes)")
    startup_timeout_s: float = Field(900.0, gt=0, description="how long to wait for the stack to become healthy")
    max_backoff_s: float = Field(30.0, gt=0, description="longest delay before restarting a child that keeps dying")
