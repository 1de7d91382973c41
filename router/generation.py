"""One generation through the verifiers, shared by the HTTP and gRPC APIs: admission, the session
(lock, history, reuse of a kept KV prefix), placement, the Decode stream with draft-length control,
incremental text with stop strings, and failover.

Failover: when the verifier of a running generation is lost (the stream fails with UNAVAILABLE or
similar, or ends without a Summary), the generation is re-placed on another live verifier and
re-opened with the token history as its prompt (the original prompt plus every token already
received), asking only for the tokens still missing. Tokens reach the client once, in order, so
the stream continues with nothing lost or repeated; greedy output is identical to an uninterrupted
run (sampled output continues from the same prefix with a fresh random stream)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from dspark_common import tracing
from dspark_common.errors import DSparkError, Unavailable
from dspark_common.grpc_status import error_from_status
from dspark_common.proto import common_pb2, verifier_pb2
from dspark_common.settings import RouterSettings
from dspark_common.types import RoundStats, SamplingParams, SpeculativeStats
from dspark_common.wire import sampling_to_proto
from router.admission import Admission
from router.controller import ControllerConfig, CostModel, DraftLengthController, parse_sps_table
from router.errors import SessionBusy
from router.metrics import RouterMetrics
from router.registry import Registry, Replica
from router.sessions import SessionRecord, SessionStore
from router.text_stream import TextStream
from router.tokenizer import TargetTokenizer
from router.verifier_client import DecodeStream, VerifierPool, draft_length_proto

log = logging.getLogger(__name__)
_tracer = tracing.tracer("router")

# A stream that fails with one of these lost its verifier (or the verifier lost its state).
FAILOVER_CODES = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
}
HANDLE_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@dataclass
class GenerateParams:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    draft_length: int | str = "auto"
    session_id: str | None = None


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    speculative: dict
    stats: SpeculativeStats
    session_id: str | None
    draft_length: int | str
    cached_tokens: int = 0  # prompt tokens served from the session's kept KV

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class _Lost(Exception):
    """The verifier ended a stream without a Summary."""


class GenerationService:
    def __init__(self, *, settings: RouterSettings, tokenizer: TargetTokenizer, pool: VerifierPool,
                 registry: Registry, store: SessionStore, admission: Admission, metrics: RouterMetrics) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.pool = pool
        self.registry = registry
        self.store = store
        self.admission = admission
        self.metrics = metrics
        s = settings
        self.controller_config = ControllerConfig(
            prior=s.draft_prior, prior_weight=s.draft_prior_weight, smoothing=s.draft_smoothing, forget=s.draft_forget,
            probe_every=s.draft_probe_every,
            max_draft_length=s.max_draft_length, draft_cost=s.draft_cost, draft_cost_per_token=s.draft_cost_per_token,
        )
        self._sps = parse_sps_table(s.sps_table) if s.sps_table else None
        self._background: set[asyncio.Task] = set()

    def cost_model(self, replica: Replica | None) -> CostModel:
        """The verifier's T(b): --sps-table, else its Stats' SPS table (with its measured round
        overhead) when it publishes one, else linear."""
        if self._sps:
            return CostModel.from_sps(self._sps)
        st = replica.stats if replica is not None else None
        if st is not None and len(st.sps):
            return CostModel.from_sps({int(b): float(v) for b, v in dict(st.sps).items()}, st.round_overhead_s)
        return CostModel.linear(self.settings.verify_cost_per_token)

    def in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(self, params: GenerateParams) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas, then one Finished. Closing the iterator early cancels the decode."""
        with self.admission.slot():
            self.metrics.running.inc()
            t0 = time.perf_counter()
            run = _Run(self, params)
            span = run.span = _tracer.start_span("router.generate", attributes={
                "dspark.service": "router", "dspark.session_id": run.sid, "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": self.tokenizer.model_name, "gen_ai.request.max_tokens": params.max_tokens,
                "gen_ai.usage.input_tokens": len(params.prompt_ids), "dspark.draft_length": str(params.draft_length)})
            try:
                async for ev in run.events():
                    if isinstance(ev, TextDelta) and ev.token_ids:
                        run.observe_tokens(len(ev.token_ids), t0)
                    elif isinstance(ev, Finished):
                        span.set_attributes({"gen_ai.usage.output_tokens": ev.completion_tokens,
                                             "gen_ai.response.finish_reasons": [ev.finish_reason],
                                             **{f"dspark.speculative.{k}": v for k, v in ev.speculative.items()
                                                if isinstance(v, (int, float))}})
                    yield ev
            except BaseException as e:
                if not isinstance(e, (GeneratorExit, asyncio.CancelledError)):
                    span.record_exception(e)
                    span.set_status(tracing.error_status(type(e).__name__))
                raise
            finally:
                span.end()
                self.metrics.running.dec()
                self.metrics.duration.observe(time.perf_counter() - t0)
                await run.close()

    async def release_expired(self) -> int:
        """Free the KV of sessions that expired while a verifier kept it."""
        n = 0
        for e in await self.store.expired():
            if await self.pool.release(e.verifier, e.handle):
                n += 1
                log.info("released the KV of expired session %s on %s", e.session_id, e.verifier)
        return n


class _Run:
    """The state of one generation."""

    def __init__(self, svc: GenerationService, params: GenerateParams) -> None:
        self.svc = svc
        self.p = params
        self.sid = params.session_id or f"gen-{uuid.uuid4().hex[:16]}"
        self.owner = uuid.uuid4().hex
        self.locked = False
        self.record: SessionRecord | None = None
        self.history = list(params.prompt_ids)
        self.generated: list[int] = []
        self.stats = SpeculativeStats()
        self.stream: DecodeStream | None = None
        self.finished = False
        self.failovers = 0
        self.ctl: DraftLengthController | None = None
        self.cached_tokens = 0
        self.span: trace.Span = trace.INVALID_SPAN
        self._last_token_at: float | None = None

    def observe_tokens(self, n: int, t0: float) -> None:
        now, m = time.perf_counter(), self.svc.metrics
        if self._last_token_at is None:
            m.ttft.observe(now - t0)
        else:
            for _ in range(n):
                m.itl.observe((now - self._last_token_at) / n)
        self._last_token_at = now

    async def _begin(self) -> tuple[str, dict] | None:
        """Lock and load the session; return (verifier, handle) when its kept KV can be reused."""
        svc, p = self.svc, self.p
        reuse = None
        if p.session_id:
            if not await svc.store.lock(self.sid, self.owner, svc.settings.request_timeout_s + 30):
                raise SessionBusy(f"session {self.sid!r} is generating another response; wait for it to finish",
                                  "session_id")
            self.locked = True
            self.record = await svc.store.get(self.sid)
        if self.record is None:
            self.record = SessionRecord(self.sid, created=time.time())
        r = self.record
        if r.handle and r.verifier:
            n = int(r.handle.get("length", 0))
            if 0 < n < len(p.prompt_ids) and list(p.prompt_ids[:n]) == r.history[:n]:
                reuse = (r.verifier, dict(r.handle))
            else:  # the new prompt does not extend the cached prefix: free it
                svc.in_background(svc.pool.release(r.verifier, dict(r.handle)))
        r.history, r.handle = list(p.prompt_ids), None
        await svc.store.put(r)
        return reuse

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        svc, p = self.svc, self.p
        reuse = await self._begin()
        auto = p.draft_length == "auto"
        ctl = self.ctl = (DraftLengthController.from_state(svc.controller_config, svc.cost_model(None),
                                                           self.record.controller) if auto else None)
        text = TextStream(svc.tokenizer.decode, p.stop)
        exclude: set[str] = set()
        finish: str | None = None
        k: int | str = p.draft_length
        svc.metrics.prompt_tokens.inc(len(p.prompt_ids))
        while finish is None:
            finish = self._ended()  # lost right after the last token: nothing left to ask for
            if finish is not None:
                break
            rep: Replica | None
            if reuse is not None:
                rep = svc.registry.get(reuse[0])
                if rep is None or not rep.live:
                    svc.in_background(svc.pool.release(*reuse))
                    reuse = None
                    continue
            else:
                with _tracer.start_as_current_span("router.placement", context=tracing.span_context(self.span),
                                                   attributes={"dspark.service": "router",
                                                               "dspark.failovers": self.failovers}) as place:
                    rep = await svc.registry.wait_pick(exclude, svc.settings.failover_wait_s)
                    place.set_attribute("dspark.verifier", rep.address if rep is not None else "")
                if rep is None:
                    raise Unavailable("no verifier is reachable")
            if ctl is not None:
                ctl.cost = svc.cost_model(rep)
                ctl.length = ctl.best()
                k = ctl.length
            handle = reuse[1] if reuse is not None else None
            vsid = handle["session_id"] if handle else f"{self.sid}.{uuid.uuid4().hex[:8]}"
            request = verifier_pb2.OpenSession(
                session_id=vsid, prompt_ids=self.history, sampling=sampling_to_proto(p.sampling),
                max_new_tokens=p.max_tokens - len(self.generated), stop_ids=sorted(svc.tokenizer.stop_ids),
                draft_length=draft_length_proto(k), handle=common_pb2.KvHandle(**handle) if handle else None,
                keep_session=bool(p.session_id),
            )
            decode_span = _tracer.start_span("router.decode", context=tracing.span_context(self.span),
                                             kind=trace.SpanKind.CLIENT, attributes={
                                                 "dspark.service": "router", "dspark.verifier": rep.address,
                                                 "dspark.verifier_session_id": vsid, "rpc.system": "grpc",
                                                 "rpc.method": "Decode", "dspark.reused": handle is not None})
            self.stream = stream = svc.pool.decode(rep.address, svc.settings.request_timeout_s,
                                                   tracing.metadata(tracing.span_context(decode_span)))
            rep.inflight += 1
            got_event, settle = False, 0
            try:
                await stream.open(request)
                while finish is None:
                    ev = await stream.read()
                    if ev is None:
                        raise _Lost("the verifier ended the stream without a summary")
                    got_event = True
                    kind = ev.WhichOneof("kind")
                    if kind == "opened":
                        self.record.verifier = rep.address
                        if not self.generated:
                            self.cached_tokens = int(ev.opened.reused_tokens)
                    elif kind == "round":
                        r = ev.round
                        tokens = [int(t) for t in r.tokens]
                        before = len(self.generated)
                        self.generated += tokens
                        self.history += tokens
                        await svc.store.append_tokens(self.sid, tokens)
                        if not r.prefill:
                            self._count(r, tokens)
                            # The controller sizes the drafter's blocks: a copied round (n-gram
                            # lookup) is not sized by k, and its length says nothing of the block.
                            if ctl is not None and not r.fallback and r.source != "lookup":
                                if settle == 0:
                                    ctl.note_block(int(k), r.proposed, p.max_tokens - before - 1)
                                settle = max(0, settle - 1)
                                new = ctl.observe(scheduled=r.scheduled, accepted=r.accepted)
                                # No use for a new draft length once the budget or a stop token
                                # is reached: the verifier is sending its Summary.
                                ending = self._ended() is not None or any(t in svc.tokenizer.stop_ids for t in tokens)
                                if new is not None and not ending and await stream.set_draft_length(new):
                                    k, settle = new, 2
                                    svc.metrics.draft_length_changes.inc()
                        piece = text.push(tokens)
                        if piece or tokens:
                            yield TextDelta(piece, tokens)
                        if text.stopped:
                            finish = "stop"
                            stream.cancel()  # the verifier frees the session's KV
                    elif kind == "summary":
                        s = ev.summary
                        finish = s.finish_reason if s.finish_reason in ("stop", "length") else "stop"
                        if s.HasField("handle") and s.handle.session_id:
                            h = s.handle
                            self.record.handle = {"replica_id": h.replica_id, "session_id": h.session_id,
                                                  "epoch": int(h.epoch), "length": int(h.length)}
                            self.record.verifier = rep.address
                        await stream.finish()
            except (grpc.aio.AioRpcError, _Lost) as e:
                stream.cancel()
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
                details = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                if reuse is not None and not got_event and code in HANDLE_CODES:
                    log.info("session %s: kept KV on %s is gone (%s); reopening with the history",
                             self.sid, rep.address, details)
                    reuse = None
                    continue
                retryable = code in FAILOVER_CODES or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and not got_event)
                if retryable and self.failovers < svc.settings.failover_attempts:
                    self.failovers += 1
                    svc.metrics.failovers.inc()
                    if code in FAILOVER_CODES:  # lost; a full verifier (RESOURCE_EXHAUSTED) is only skipped
                        svc.registry.mark_down(rep.address, f"{code.name}: {details}")
                    exclude.add(rep.address)
                    reuse = None
                    log.warning("session %s lost verifier %s after %d tokens (%s: %s); re-placing",
                                self.sid, rep.address, len(self.generated), code.name, details)
                    continue
                raise error_from_status(code, details) from None
            finally:
                rep.inflight -= 1
                decode_span.end()
        tail = text.finish()
        if tail:
            yield TextDelta(tail, [])
        self.finished = True
        svc.metrics.finished.labels(reason=finish).inc()
        spec = self.stats.to_dict()
        spec["draft_length"] = k
        spec["failovers"] = self.failovers
        yield Finished(finish, len(p.prompt_ids), len(self.generated), spec, self.stats, p.session_id, k,
                       self.cached_tokens)

    def _ended(self) -> str | None:
        """The finish reason the tokens so far already decide (a stop token last, or the budget)."""
        if self.generated and self.generated[-1] in self.svc.tokenizer.stop_ids:
            return "stop"
        if len(self.generated) >= self.p.max_tokens:
            return "length"
        return None

    def _count(self, r: verifier_pb2.Round, tokens: list[int]) -> None:
        rs = RoundStats(proposed=r.proposed, scheduled=r.scheduled, accepted=r.accepted, tokens=tokens,
                        fallback=r.fallback, source=r.source)
        self.stats.add(rs, len(tokens))
        m = self.svc.metrics
        m.rounds.inc()
        m.draft_tokens.inc(r.scheduled)
        m.accepted_draft_tokens.inc(r.accepted)
        m.generated_tokens.inc(len(tokens))

    async def close(self) -> None:
        """Cancel an unfinished decode; store or drop the session; unlock."""
        svc = self.svc
        if self.stream is not None and not self.finished:
            self.stream.cancel()
        r = self.record
        try:
            if r is None:
                return
            if not self.p.session_id:
                await svc.store.delete(self.sid)
                return
            if not self.finished:
                r.handle = None  # the cancelled stream took the KV with it
            r.history = self.history
            if self.ctl is not None:
                r.controller = self.ctl.state()
            r.turns += 1
            r.updated = time.time()
            totals = r.stats or {}
            for key in ("rounds", "draft_tokens", "accepted_draft_tokens", "generated_tokens"):
                totals[key] = totals.get(key, 0) + getattr(self.stats, key)
            r.stats = totals
            await svc.store.put(r)
        except DSparkError:
            raise
        except Exception:
            log.exception("cannot store session %s", self.sid)
        finally:
            if self.locked:
                try:
                    await svc.store.unlock(self.sid, self.owner)
                except Exception:
                    log.exception("cannot unlock session %s", self.sid)
