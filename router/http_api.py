"""The OpenAI-compatible HTTP API (aiohttp): POST /v1/completions and /v1/chat/completions (JSON,
or SSE with `stream: true`, ending with `data: [DONE]`), GET /v1/models, /healthz, /metrics.

Thin: parse (`openai_schema`), run (`GenerationService`), encode. Every error leaves as an
OpenAI-style error object with the status `router.errors` maps it to; an error after a stream has
started is sent as a final `data: {"error": ...}` event. A client that disconnects cancels its
generation (the handler is cancelled, or its next write fails), which frees its KV."""

from __future__ import annotations

import json
import logging
import time
from contextlib import aclosing
from typing import TYPE_CHECKING

from aiohttp import web

from dspark_common.errors import DSparkError, InvalidRequest, NotFound
from router.admission import check_bearer
from router.errors import PayloadTooLarge, error_body, http_status_of
from router.generation import Finished
from router.openai_schema import chunk_body, new_id, parse_request, response_body

if TYPE_CHECKING:
    from router.app import RouterCore

log = logging.getLogger(__name__)

CORE = web.AppKey("core", object)
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_error(err: BaseException, headers: dict | None = None) -> web.Response:
    status, _ = http_status_of(err)
    headers = dict(headers or {})
    retry = getattr(err, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return web.json_response(error_body(err), status=status, headers=headers)


def _api_of(request: web.Request) -> str:
    route = request.match_info.route.resource
    return route.canonical if route is not None else "unknown"


@web.middleware
async def errors_middleware(request: web.Request, handler):
    core: RouterCore = request.app[CORE]
    try:
        if request.path.startswith("/v1/"):
            check_bearer(request.headers.get("Authorization"), core.settings.api_key)
        response = await handler(request)
    except DSparkError as e:
        core.metrics.rejected.labels(reason=type(e).__name__).inc()
        response = json_error(e)
    except web.HTTPException as e:
        if e.status == 413:
            err: Exception = PayloadTooLarge(f"the request body is over {core.settings.max_body_kb} KiB")
        elif e.status == 404:
            err = NotFound(f"no route {request.method} {request.path}")
        elif e.status == 405:
            err = InvalidRequest(f"method {request.method} is not allowed on {request.path}")
        else:
            raise
        response = json_error(err)
        if e.status == 405:
            response.set_status(405)
    except Exception as e:
        log.exception("internal error on %s", request.path)
        response = json_error(e)
    core.metrics.requests.labels(api=_api_of(request), status=str(response.status)).inc()
    return response


async def _read_json(request: web.Request, max_bytes: int):
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"the request body of {request.content_length} bytes is over {max_bytes // 1024} KiB")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body is over {max_bytes // 1024} KiB") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    core: RouterCore = request.app[CORE]
    body = await _read_json(request, core.settings.max_body_kb * 1024)
    parsed = parse_request(kind, body, core.tokenizer, core.limits)
    rid, model, created = new_id(kind), core.tokenizer.model_name, int(time.time())
    async with aclosing(core.generations.generate(parsed.params)) as events:
        first = await anext(events)  # errors before any output keep their HTTP status
        if not parsed.stream:
            parts, ev = [], first
            while not isinstance(ev, Finished):
                parts.append(ev.text)
                ev = await anext(events)
            return web.json_response(response_body(kind, rid, model, "".join(parts), ev))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        try:
            if kind == "chat":  # OpenAI opens a chat stream with the role
                await send(chunk_body(kind, rid, model, created, "", first=True))
            ev = first
            while True:
                if isinstance(ev, Finished):
                    await send(chunk_body(kind, rid, model, created, "", fin=ev))
                    break
                if ev.text:
                    await send(chunk_body(kind, rid, model, created, ev.text))
                ev = await anext(events)
        except ConnectionResetError:
            log.info("client went away during %s %s: generation cancelled", request.method, request.path)
            return response
        except DSparkError as e:
            await send(error_body(e))
        except Exception as e:  # noqa: BLE001 - the stream has started: report it in-band
            log.exception("internal error during a stream")
            await send(error_body(e))
        await send("[DONE]")
        await response.write_eof()
        return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def models(request: web.Request) -> web.Response:
    core: RouterCore = request.app[CORE]
    return web.json_response({"object": "list", "data": [
        {"id": core.tokenizer.model_name, "object": "model", "created": int(core.started), "owned_by": "dspark"}]})


async def healthz(request: web.Request) -> web.Response:
    core: RouterCore = request.app[CORE]
    if not core.registry.live():
        await core.registry.refresh()
    live = core.registry.live()
    body = {"status": "ok" if live else "unavailable", "store": core.store_kind,
            "verifiers": [r.describe() for r in core.registry.replicas.values()],
            "running": core.admission.running, "max_sessions": core.admission.max_sessions}
    return web.json_response(body, status=200 if live else 503)


async def metrics(request: web.Request) -> web.Response:
    core: RouterCore = request.app[CORE]
    core.metrics.live_verifiers.set(len(core.registry.live()))
    return web.Response(body=core.metrics.render(), headers={"Content-Type": core.metrics.content_type})


def build_app(core: "RouterCore") -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=core.settings.max_body_kb * 1024)
    app[CORE] = core
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
