"""`dspark.v1.Router/Generate` over grpc.aio: the same generations, parameters and statistics as
the HTTP API. Thin: validate the request (the validators `openai_schema` shares), run it through
`GenerationService`, stream `GenerateResponse`s. Cancelling the call cancels the decode."""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import TYPE_CHECKING

import grpc

from dspark_common.errors import DSparkError, InvalidRequest
from dspark_common.proto import common_pb2  # noqa: F401  (generates the stubs first)
from dspark_common.types import SamplingParams
from dspark_common.wire import sampling_from_proto, stats_to_proto
from dspark_common._proto.dspark.v1 import router_pb2, router_pb2_grpc
from router.admission import check_bearer
from router.errors import grpc_abort
from router.generation import Finished, GenerateParams
from router.openai_schema import (
    check_max_tokens,
    check_model,
    check_prompt_ids,
    check_session_id,
    check_stop,
    new_id,
    parse_messages,
)

if TYPE_CHECKING:
    from router.app import RouterCore

log = logging.getLogger(__name__)

SERVICE_NAME = "dspark.v1.Router"


def parse_generate(req: router_pb2.GenerateRequest, core: "RouterCore") -> GenerateParams:
    tok, limits = core.tokenizer, core.limits
    check_model(req.model, tok.model_name)
    which = req.WhichOneof("input")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequest("prompt is empty", "prompt")
        ids, name = tok.encode(req.prompt), "prompt"
    elif which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        ids, name = tok.chat(parse_messages(messages)), "chat"
    elif which == "prompt_ids":
        ids, name = [int(t) for t in req.prompt_ids.ids], "prompt_ids"
    else:
        raise InvalidRequest("one of prompt, chat or prompt_ids is required", "input")
    sampling = sampling_from_proto(req.sampling) if req.HasField("sampling") else SamplingParams()
    spec = req.speculative.WhichOneof("draft_length") if req.HasField("speculative") else None
    if spec == "tokens":
        if req.speculative.tokens > 16:
            raise InvalidRequest(f"speculative.draft_length must be in 0..16 or auto, got {req.speculative.tokens}",
                                 "speculative.draft_length")
        draft_length: int | str = int(req.speculative.tokens)
    else:
        draft_length = "auto"
    return GenerateParams(
        prompt_ids=check_prompt_ids(ids, tok, limits, name),
        max_tokens=check_max_tokens(req.max_tokens or None, limits), sampling=sampling,
        stop=check_stop(list(req.stop)), draft_length=draft_length,
        session_id=check_session_id(req.session_id or None),
    )


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, core: "RouterCore") -> None:
        self.core = core

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        core = self.core
        rid = new_id("completion")
        try:
            metadata = dict(context.invocation_metadata() or ())
            check_bearer(metadata.get("authorization"), core.settings.api_key)
            params = parse_generate(request, core)
            async with aclosing(core.generations.generate(params)) as events:
                async for ev in events:
                    if isinstance(ev, Finished):
                        yield router_pb2.GenerateResponse(
                            id=rid, finish_reason=ev.finish_reason, session_id=ev.session_id or "",
                            usage=router_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                                 total_tokens=ev.prompt_tokens + ev.completion_tokens), speculative=stats_to_proto(ev.stats),
                            draft_length=ev.draft_length if isinstance(ev.draft_length, int) else 0,
                        )
                    elif ev.text or ev.token_ids:
                        yield router_pb2.GenerateResponse(id=rid, text=ev.text, token_ids=ev.token_ids)
            core.metrics.requests.labels(api="grpc:Generate", status="OK").inc()
        except DSparkError as e:
            core.metrics.requests.labels(api="grpc:Generate", status=type(e).__name__).inc()
            await grpc_abort(context, e)
