"""A streaming client for the router's OpenAI-compatible chat endpoint that records when things
arrive: the request is sent, each SSE chunk with text, the final chunk (finish reason, `usage`,
`speculative`). It only reads clocks and parses; `bench.metrics` turns the readings into figures.
The clock is injected so tests can drive it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.metrics import generated_in_rounds, request_figures


@dataclass
class ChatRequest:
    """One benchmark request: the first turn of a prompt, as a single user message."""

    prompt_index: int
    content: str
    max_tokens: int
    temperature: float
    draft_length: int | str
    seed: int | None = None
    model: str | None = None

    def body(self) -> dict:
        body: dict = {
            "messages": [{"role": "user", "content": self.content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,  # always sent: the OpenAI default is 1, not greedy
            "stream": True,
            "speculative": {"draft_length": self.draft_length},
        }
        if self.seed is not None and self.temperature > 0:
            body["seed"] = self.seed
        if self.model:
            body["model"] = self.model
        return body


@dataclass
class StreamRecord:
    """What one streamed request showed: clock readings (seconds, the client's clock) and the
    final chunk's fields."""

    prompt_index: int
    sent: float = 0.0
    content_times: list[float] = field(default_factory=list)
    end: float = 0.0
    ok: bool = False
    error: str | None = None
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    speculative: dict = field(default_factory=dict)

    def figures(self, *, keep_text: bool = False) -> dict:
        """The request's entry in results.json: identity, counts and timing figures."""
        out = {
            "prompt_index": self.prompt_index, "ok": self.ok, "error": self.error, "status": self.status,
            "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "chunks": len(self.content_times),
            "round_tokens": generated_in_rounds(self.speculative) if self.speculative else None,
            "speculative": self.speculative,
            "text_sha1": hashlib.sha1(self.text.encode()).hexdigest() if self.ok else None,
        }
        if keep_text:
            out["text"] = self.text
        if self.ok:
            out.update(request_figures(sent=self.sent, content_times=self.content_times, end=self.end,
                                       completion_tokens=self.completion_tokens))
        return out


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


def _finish_reason(chunk: dict) -> str | None:
    choices = chunk.get("choices") or []
    return choices[0].get("finish_reason") if choices else None


async def stream_chat(session: aiohttp.ClientSession, url: str, request: ChatRequest, *,
                      clock: Callable[[], float] = time.perf_counter, api_key: str = "") -> StreamRecord:
    """POST one streaming chat completion to `url` (the router's base URL) and record it. Errors
    (HTTP status, an in-band error event, a broken stream) are recorded, not raised."""
    rec = StreamRecord(request.prompt_index)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    parts: list[str] = []
    rec.sent = clock()
    try:
        async with session.post(url.rstrip("/") + "/v1/chat/completions", json=request.body(), headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.end = clock()
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            done = False
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                now = clock()
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.end, rec.error = now, f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return rec
                text = _chunk_text(chunk)
                if text:
                    parts.append(text)
                    rec.content_times.append(now)
                reason = _finish_reason(chunk)
                if reason is not None:
                    rec.end = now
                    rec.finish_reason = reason
                    usage = chunk.get("usage") or {}
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    rec.completion_tokens = int(usage.get("completion_tokens") or 0)
                    rec.speculative = chunk.get("speculative") or {}
            if not done or rec.finish_reason is None:
                rec.end = rec.end or clock()
                rec.error = "the stream ended without a final chunk and [DONE]"
                return rec
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        rec.end = clock()
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.text = "".join(parts)
    rec.ok = True
    return rec
