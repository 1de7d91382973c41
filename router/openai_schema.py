"""The OpenAI request and response shapes: parsing and validating `/v1/completions` and
`/v1/chat/completions` bodies into `GenerateParams` (every bad input is a typed error naming its
field), the validators the gRPC API shares, and the response / stream-chunk bodies."""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from dspark_common.errors import InvalidRequest
from dspark_common.types import MAX_DRAFT_LENGTH, SamplingParams, validate_draft_length
from router.errors import ModelNotFound, PayloadTooLarge
from router.generation import Finished, GenerateParams
from router.tokenizer import TargetTokenizer

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
SESSION_ID = re.compile(r"^[A-Za-z0-9_\-:]{1,128}$")
ROLES = {"system", "user", "assistant", "developer"}
# Parameters accepted only at their no-op value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None,), "tools": (None,), "tool_choice": (None, "none"),
    "response_format": (None,), "functions": (None,), "parallel_tool_calls": (None, False, True),
}


@dataclass
class Limits:
    default_max_tokens: int
    max_tokens_limit: int
    max_prompt_tokens: int


@dataclass
class ParsedRequest:
    kind: str  # "completion" | "chat"
    params: GenerateParams
    stream: bool


# ---------------------------------------------------------------------------- field validators


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_model(model: Any, served: str) -> None:
    if model is None or model == "":
        return
    if not isinstance(model, str):
        raise InvalidRequest(f"model must be a string, got {model!r}", "model")
    if model != served:
        raise ModelNotFound(f"the model {model!r} does not exist; this router serves {served!r}")


def check_max_tokens(value: Any, limits: Limits, name: str = "max_tokens") -> int:
    if value is None:
        return limits.default_max_tokens
    if not _is_int(value) or value < 1:
        raise InvalidRequest(f"{name} must be a positive integer, got {value!r}", name)
    if value > limits.max_tokens_limit:
        raise InvalidRequest(f"{name} must be at most {limits.max_tokens_limit}, got {value}", name)
    return value


def check_stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequest(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters", "stop")
    return list(stops)


def check_session_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not SESSION_ID.match(value):
        raise InvalidRequest("session_id must be 1-128 characters of letters, digits, '_', '-' or ':'", "session_id")
    return value


def check_prompt_ids(ids: list[int], tokenizer: TargetTokenizer, limits: Limits, name: str) -> list[int]:
    if not ids:
        raise InvalidRequest(f"{name} is empty", name)
    vocab = tokenizer.vocab_size
    if not all(_is_int(t) and 0 <= t < vocab for t in ids):
        raise InvalidRequest(f"{name} has token ids outside the vocabulary 0..{vocab - 1}", name)
    if len(ids) > limits.max_prompt_tokens:
        raise PayloadTooLarge(
            f"the prompt has {len(ids)} tokens; this router accepts at most {limits.max_prompt_tokens}", name)
    return ids


def check_speculative(value: Any) -> int | str:
    if value is None:
        return "auto"
    if not isinstance(value, dict):
        raise InvalidRequest('speculative must be an object like {"draft_length": 4}', "speculative")
    unknown = set(value) - {"draft_length"}
    if unknown:
        raise InvalidRequest(f"unknown speculative option {sorted(unknown)[0]!r}", f"speculative.{sorted(unknown)[0]}")
    dl = value.get("draft_length", "auto")
    try:
        return validate_draft_length(dl)
    except InvalidRequest:
        raise InvalidRequest(f'speculative.draft_length must be an integer in 0..{MAX_DRAFT_LENGTH} or "auto", '
                             f"got {dl!r}", "speculative.draft_length") from None


def check_sampling(body: dict) -> SamplingParams:
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise InvalidRequest(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k in (None, -1) else top_k
    if not _is_int(top_k) or top_k < 0:
        raise InvalidRequest(f"top_k must be an integer >= 0 (or -1 for off), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}", "seed")
    return SamplingParams(float(temperature), float(top_p), top_k, seed).validate()


def _check_neutral(body: dict) -> None:
    for name, allowed in NEUTRAL.items():
        v = body.get(name)
        if v in allowed or (name in ("logit_bias", "tools", "functions") and not v):
            continue
        if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
            continue
        raise InvalidRequest(f"{name}={v!r} is not supported by this router", name)


def _check_stream(body: dict) -> bool:
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise InvalidRequest(f"stream must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise InvalidRequest("stream_options must be an object", "stream_options")
    return bool(stream)


# ---------------------------------------------------------------------------- requests


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                     f"messages[{i}].content[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequest("content must be a string or a list of text parts", f"messages[{i}].content")


def parse_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequest("each message must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"role must be one of {sorted(ROLES)}, got {role!r}", f"messages[{i}].role")
        if "content" not in m or m["content"] is None:
            raise InvalidRequest("content is required", f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": _message_text(m["content"], i)})
    return out


def _prompt_ids(prompt: Any, tokenizer: TargetTokenizer) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty", "prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise InvalidRequest("only one prompt per request is supported", "prompt")
    raise InvalidRequest("prompt must be a string, a list of one string, or a list of token ids", "prompt")


def parse_request(kind: str, body: Any, tokenizer: TargetTokenizer, limits: Limits) -> ParsedRequest:
    """A completions (`kind` "completion") or chat completions ("chat") body -> ParsedRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_model(body.get("model"), tokenizer.model_name)
    _check_neutral(body)
    stream = _check_stream(body)
    if kind == "chat":
        mt = body.get("max_completion_tokens")
        name = "max_completion_tokens" if mt is not None else "max_tokens"
        max_tokens = check_max_tokens(mt if mt is not None else body.get("max_tokens"), limits, name)
        ids = tokenizer.chat(parse_messages(body.get("messages")))
        field = "messages"
    else:
        if "prompt" not in body:
            raise InvalidRequest("prompt is required", "prompt")
        max_tokens = check_max_tokens(body.get("max_tokens"), limits)
        ids = _prompt_ids(body["prompt"], tokenizer)
        field = "prompt"
    params = GenerateParams(
        prompt_ids=check_prompt_ids(ids, tokenizer, limits, field), max_tokens=max_tokens,
        sampling=check_sampling(body), stop=check_stop(body.get("stop")),
        draft_length=check_speculative(body.get("speculative")), session_id=check_session_id(body.get("session_id")),
    )
    return ParsedRequest(kind, params, stream)


# ---------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def _choice(kind: str, text: str, finish: str | None, *, delta: bool, first: bool = False) -> dict:
    if kind == "chat":
        if delta:
            body = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def response_body(kind: str, rid: str, model: str, text: str, fin: Finished) -> dict:
    body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [_choice(kind, text, fin.finish_reason, delta=False)],
            "usage": fin.usage, "speculative": fin.speculative}
    if fin.session_id:
        body["session_id"] = fin.session_id
    return body


def chunk_body(kind: str, rid: str, model: str, created: int, text: str, *, first: bool = False,
               fin: Finished | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model,
            "choices": [_choice(kind, text, fin.finish_reason if fin else None, delta=True, first=first)]}
    if fin is not None:
        body["usage"] = fin.usage
        body["speculative"] = fin.speculative
        if fin.session_id:
            body["session_id"] = fin.session_id
    return body
