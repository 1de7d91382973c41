"""The verifier gRPC service (`dspark verifier`): a thin adapter from `dspark.v1.Verifier` to the
decode loop.

Owns the per-session async driver of a Decode stream — start (or resume a kept session), then per
round: draft over the network (`RemoteProposer.propose_one`), schedule, verify on the target
worker thread, stream a Round event — and the registry of sessions and their KV handles. Every
target forward runs on ONE worker thread, so the event loop never blocks on the model. A failed
drafter turns a round into a target-only round (the Round says why); generation never fails
because of the drafter."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import torch
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from transformers import PreTrainedModel

from dspark_common.errors import DSparkError, FailedPrecondition, InvalidRequest, NotFound
from dspark_common.grpc_server import GrpcServer, serve_until_signal
from dspark_common.grpc_status import abort
from dspark_common import tracing
from dspark_common.metrics import MetricsServer, VerifierMetrics
from dspark_common.proto import common_pb2, verifier_pb2, verifier_pb2_grpc
from dspark_common.registry import advertise_address, register_forever, registered
from dspark_common.settings import VerifierSettings
from dspark_common.shutdown import STOP_STEP_LIMIT_S, bounded_step
from dspark_common.types import RoundStats, validate_draft_length
from dspark_common.wire import sampling_from_proto, stats_to_proto
from verifier_svc.decode_loop import DecodeLoop, DecodeSession, GenerationRequest
from verifier_svc.drafter_client import DraftOutcome, RemoteProposer
from verifier_svc.scheduler import SpsTable
from verifier_svc.sps_profile import profile_sps
from verifier_svc.target_engine import TargetEngine

log = logging.getLogger(__name__)

SERVICE_NAME = "dspark.v1.Verifier"
# After the Summary, how long Decode waits for the client to half-close before it ends the call.
# Ending it first races any control message the client sends meanwhile: grpc.aio fails such a
# write with INTERNAL "Internal error from Core" and overwrites the call's OK status with it
# (grpc/grpc#36066), which a router takes for a lost verifier.
HALF_CLOSE_WAIT_S = 2.0
_tracer = tracing.tracer("verifier")


@dataclass
class _Trace:
    """One generation's decode span, and the rounds past the round-span limit, aggregated."""

    span: trace.Span
    round_spans: int  # rounds that may still get a span of their own
    aggregated: dict = field(default_factory=lambda: dict(rounds=0, proposed=0, scheduled=0, accepted=0, tokens=0,
                                                          draft_ms=0.0, verify_ms=0.0, fallbacks=0))


def draft_length_from_proto(d: verifier_pb2.DraftLength) -> int | str:
    if d.WhichOneof("value") == "tokens":
        return validate_draft_length(int(d.tokens))
    return "auto"


def round_to_proto(r: RoundStats, *, prefill: bool = False) -> verifier_pb2.Round:
    return verifier_pb2.Round(
        tokens=r.tokens, proposed=r.proposed, scheduled=r.scheduled, accepted=r.accepted, confidences=r.confidences,
        draft_ms=r.draft_ms, verify_ms=r.verify_ms, fallback=r.fallback, prefill=prefill, source=r.source,
    )


@dataclass
class _Entry:
    """A session the verifier holds target KV for."""

    epoch: int
    keep: bool
    running: bool = True
    length: int = 0  # cached positions when idle (what a continuing handle must say)
    last_used: float = field(default_factory=time.monotonic)


class VerifierService(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, loop: DecodeLoop, proposer: RemoteProposer | None, executor: ThreadPoolExecutor, *,
                 replica_id: str, metrics: VerifierMetrics | None = None, model_name: str = "",
                 trace_round_spans: int = 32) -> None:
        self.loop = loop
        self.metrics = metrics or VerifierMetrics()
        self.model_name = model_name
        self.trace_round_spans = trace_round_spans
        self.metrics.kv_slots.set_function(lambda: loop.target.num_sessions)
        self.metrics.kv_slots_max.set(loop.target.max_sessions)
        self.metrics.running.set_function(lambda: sum(e.running for e in list(self._entries.values())))
        self.proposer = proposer
        self.replica_id = replica_id
        self._executor = executor
        self._entries: dict[str, _Entry] = {}
        self._epochs = itertools.count(time.time_ns() // 1000)
        self._rounds = 0
        self._fallbacks: Counter[str] = Counter()

    async def _work(self, fn, *args):
        """Run target work on the one worker thread."""
        self.metrics.queue_depth.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.metrics.queue_depth.dec()

    # ---- sessions -------------------------------------------------------------------------
    def _parse_open(self, o: verifier_pb2.OpenSession) -> GenerationRequest:
        request = GenerationRequest(
            prompt_ids=[int(t) for t in o.prompt_ids], max_new_tokens=int(o.max_new_tokens),
            sampling=sampling_from_proto(o.sampling), draft_length=draft_length_from_proto(o.draft_length),
            stop_ids=frozenset(int(t) for t in o.stop_ids),
        )
        return request.validate(self.loop.target)

    def _check_handle(self, h: common_pb2.KvHandle, *, check_length: bool = True) -> _Entry:
        if h.replica_id != self.replica_id:
            raise FailedPrecondition(
                f"handle names verifier replica {h.replica_id!r} but this is {self.replica_id!r} (restarted?): "
                "open a new session with the full history"
            )
        entry = self._entries.get(h.session_id)
        if entry is None:
            raise NotFound(
                f"unknown session {h.session_id!r} (released or evicted): open it again with the full history"
            )
        if entry.epoch != h.epoch:
            raise FailedPrecondition(
                f"stale handle for session {h.session_id!r}: epoch {h.epoch}, current {entry.epoch}"
            )
        if entry.running:
            raise FailedPrecondition(f"session {h.session_id!r} is generating; wait for its Summary or cancel it")
        if check_length and entry.length != h.length:
            raise FailedPrecondition(
                f"handle for session {h.session_id!r} says {h.length} cached positions, "
                f"the verifier holds {entry.length}"
            )
        return entry

    async def _make_room(self) -> None:
        """At the session limit, evict the least recently used kept sessions that are idle. Counts
        the registry, not the target: a session being opened holds its slot already."""
        while len(self._entries) >= self.loop.target.max_sessions:
            idle = [(e.last_used, sid) for sid, e in self._entries.items() if not e.running]
            if not idle:
                return  # the target refuses the open: RESOURCE_EXHAUSTED
            sid = min(idle)[1]
            log.info("evicting idle kept session %s", sid)
            await self._release(sid)

    async def _open(self, o: verifier_pb2.OpenSession) -> tuple[DecodeSession, _Entry, int]:
        request = self._parse_open(o)
        resume = bool(o.handle.session_id)
        if resume:
            entry = self._check_handle(o.handle)
            sid, reused = o.handle.session_id, entry.length
            entry.keep = o.keep_session
        else:
            sid, reused = o.session_id or uuid.uuid4().hex, 0
            if sid in self._entries:
                raise FailedPrecondition(f"session {sid!r} exists: continue it with its handle or release it first")
            await self._make_room()
            entry = self._entries[sid] = _Entry(next(self._epochs), o.keep_session)
        entry.running = True
        try:
            s = await self._work(self.loop.resume if resume else self.loop.start, request, sid)
        except DSparkError:
            entry.running = False
            if not self.loop.target.has(sid):  # a refused resume keeps its cache; a failed prefill does not
                self._entries.pop(sid, None)
            raise
        except BaseException:  # cancelled while the worker opens it: free whatever it leaves
            self._entries.pop(sid, None)
            asyncio.ensure_future(self._work(self.loop.release, sid))
            raise
        return s, entry, reused

    async def _release(self, sid: str) -> bool:
        if self._entries.pop(sid, None) is None:
            return False
        await self._work(self.loop.release, sid)
        return True

    def _handle(self, sid: str, entry: _Entry) -> common_pb2.KvHandle:
        return common_pb2.KvHandle(replica_id=self.replica_id, session_id=sid, epoch=entry.epoch, length=entry.length)

    # ---- Decode ----------------------------------------------------------------------------
    async def Decode(self, request_iterator, context: grpc.aio.ServicerContext):
        t_open = time.perf_counter()
        parent = tracing.context_from_metadata(context.invocation_metadata())
        span = _tracer.start_span("verifier.decode", context=parent, kind=trace.SpanKind.INTERNAL, attributes={
            "dspark.service": "verifier", "dspark.replica_id": self.replica_id,
            "gen_ai.operation.name": "text_completion", "gen_ai.request.model": self.model_name})
        tr = _Trace(span, self.trace_round_spans)
        status = "cancelled"
        events = self._decode(request_iterator, context, tr, t_open)
        try:
            async for ev in events:
                if ev.WhichOneof("kind") == "summary":
                    status = "ok"
                yield ev
        except grpc.aio.AbortError:
            code = context.code() if hasattr(context, "code") else None
            status = getattr(code, "name", None) or "error"
            span.set_status(Status(StatusCode.ERROR, status))
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            status = "INTERNAL"
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            raise
        finally:
            await events.aclose()
            self.metrics.requests.labels(status=status).inc()
            self._end_trace(tr, status)

    def _end_trace(self, tr: _Trace, status: str) -> None:
        a = tr.aggregated
        tr.span.set_attribute("dspark.status", status)
        if a["rounds"]:
            attrs = {f"dspark.aggregated.{k}": v for k, v in a.items()}
            tr.span.set_attributes(attrs)
            tr.span.add_event("rounds.aggregated", attrs)
        tr.span.end()

    async def _decode(self, request_iterator, context: grpc.aio.ServicerContext, tr: _Trace, t_open: float):
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            await abort(context, InvalidRequest("the Decode stream ended before an open message", "open"))
        if first.WhichOneof("kind") != "open":
            await abort(context, InvalidRequest("the first Decode message must be open", "open"))
        try:
            s, entry, reused = await self._open(first.open)
        except DSparkError as e:
            tr.span.set_attribute("dspark.error", str(e))
            await abort(context, e)
        sid, t0 = s.session_id, time.perf_counter()
        self.metrics.ttft.observe(t0 - t_open)
        self.metrics.generated.inc(len(s.output))
        tr.span.set_attributes({"dspark.session_id": sid, "gen_ai.usage.input_tokens": len(s.request.prompt_ids),
                                "dspark.reused_tokens": reused, "gen_ai.request.max_tokens": s.request.max_new_tokens,
                                "gen_ai.request.temperature": float(s.request.sampling.temperature),
                                "dspark.draft_length": str(s.draft_length)})
        state = {"finished": False, "cancel": False, "error": None}

        def on_done(_ctx) -> None:
            if not state["finished"]:  # cancelled or failed before its Summary: free the session
                asyncio.ensure_future(self._release(sid))

        context.add_done_callback(on_done)
        control = asyncio.get_running_loop().create_task(self._control(requests, s, state))
        try:
            yield verifier_pb2.DecodeEvent(opened=verifier_pb2.Opened(
                session_id=sid, prompt_tokens=len(s.request.prompt_ids), reused_tokens=reused,
                drafter=self.proposer.drafter_of(sid) if self.proposer is not None and s.drafting else "",
            ))
            yield verifier_pb2.DecodeEvent(round=verifier_pb2.Round(tokens=s.output, prefill=True))
            while not s.done and not state["cancel"]:
                if state["error"] is not None:
                    raise state["error"]
                r = await self._round(s, tr)
                yield verifier_pb2.DecodeEvent(round=round_to_proto(r))
            kept = entry.keep and s.done  # a cancelled session is never kept
            entry.length, entry.running, entry.last_used = s.anchor_pos, False, time.monotonic()
            if not kept:
                await self._release(sid)
            state["finished"] = True
            st = s.stats
            tr.span.set_attributes({
                "gen_ai.usage.output_tokens": len(s.output), "gen_ai.response.finish_reasons": [s.finish_reason or "cancelled"],
                "dspark.speculative.rounds": st.rounds, "dspark.speculative.draft_tokens": st.draft_tokens,
                "dspark.speculative.accepted_draft_tokens": st.accepted_draft_tokens,
                "dspark.speculative.mean_accepted_length": float(st.to_dict().get("mean_accepted_length", 0.0)),
            })
            yield verifier_pb2.DecodeEvent(summary=verifier_pb2.Summary(
                finish_reason=s.finish_reason or "cancelled", stats=stats_to_proto(s.stats),
                generated_tokens=len(s.output), seconds=time.perf_counter() - t0,
                handle=self._handle(sid, entry) if kept else None,
            ))
            await asyncio.wait({control}, timeout=HALF_CLOSE_WAIT_S)  # `_control` returns at the half-close
        except DSparkError as e:
            await abort(context, e)
        finally:
            control.cancel()

    async def _round(self, s: DecodeSession, tr: _Trace | None = None) -> RoundStats:
        t_round = time.perf_counter()
        span = None
        if tr is not None and tr.round_spans > 0 and tr.span.is_recording():
            tr.round_spans -= 1
            span = _tracer.start_span("verifier.round", context=tracing.span_context(tr.span),
                                      attributes={"dspark.service": "verifier", "dspark.round": self._session_round(s)})
        copied = self.loop.lookup_proposal(s)  # a copy from the sequence saves the drafter call
        r = self.loop.draft_request(s) if copied is None else None
        outcome, draft_ms = DraftOutcome(copied), 0.0
        if r is not None:
            t0 = time.perf_counter()
            carrier = tracing.inject(tracing.span_context(span)) if span is not None else None
            outcome = await self.proposer.propose_one(r, trace_context=carrier)
            draft_ms = (time.perf_counter() - t0) * 1e3
        scheduled = self.loop.schedule(s, outcome.proposal)
        rs = await self._work(self.loop.verify, s, outcome.proposal, scheduled, draft_ms, outcome.fallback)
        self._rounds += 1
        if rs.fallback:
            self._fallbacks[rs.fallback.split(":")[0]] += 1
        self.metrics.observe_round(proposed=rs.proposed, scheduled=rs.scheduled, accepted=rs.accepted,
                                   tokens=len(rs.tokens), verify_s=rs.verify_ms / 1e3,
                                   draft_s=draft_ms / 1e3 if r is not None else None,
                                   round_s=time.perf_counter() - t_round, fallback=rs.fallback)
        if span is not None:
            span.set_attributes({
                "dspark.round.proposed": rs.proposed, "dspark.round.scheduled": rs.scheduled,
                "dspark.round.accepted": rs.accepted, "dspark.round.tokens": len(rs.tokens),
                "dspark.round.batch_tokens": rs.scheduled + 1, "dspark.round.draft_ms": rs.draft_ms,
                "dspark.round.verify_ms": rs.verify_ms, "dspark.round.fallback": rs.fallback,
            })
            span.end()
        elif tr is not None:
            a = tr.aggregated
            a["rounds"] += 1
            a["proposed"] += rs.proposed
            a["scheduled"] += rs.scheduled
            a["accepted"] += rs.accepted
            a["tokens"] += len(rs.tokens)
            a["draft_ms"] += rs.draft_ms
            a["verify_ms"] += rs.verify_ms
            a["fallbacks"] += bool(rs.fallback)
        return rs

    @staticmethod
    def _session_round(s: DecodeSession) -> int:
        return int(s.stats.rounds) + 1

    async def _control(self, requests, s: DecodeSession, state: dict) -> None:
        """Messages after open: change the draft length, cancel."""
        try:
            async for m in requests:
                kind = m.WhichOneof("kind")
                if kind == "cancel":
                    state["cancel"] = True
                    return
                if kind == "set_draft_length":
                    s.draft_length = draft_length_from_proto(m.set_draft_length)
                else:
                    raise InvalidRequest(f"unexpected {kind or 'empty'} message after open", kind or "kind")
        except DSparkError as e:
            state["error"] = e

    # ---- unary RPCs ------------------------------------------------------------------------
    async def Release(self, request: verifier_pb2.ReleaseSessionRequest, context) -> verifier_pb2.ReleaseSessionReply:
        h = request.handle
        try:
            self._check_handle(h, check_length=False)
        except DSparkError as e:
            await abort(context, e)
        return verifier_pb2.ReleaseSessionReply(released=await self._release(h.session_id))

    async def Stats(self, request, context) -> verifier_pb2.VerifierStats:
        target = self.loop.target
        slots, positions = await self._work(lambda: (target.num_sessions, target.cached_positions()))
        links = self.proposer.link_stats() if self.proposer is not None else []
        return verifier_pb2.VerifierStats(
            replica_id=self.replica_id, sessions=len(self._entries),
            running=sum(e.running for e in self._entries.values()), kv_slots_in_use=slots,
            max_sessions=target.max_sessions, kv_positions=positions, rounds=self._rounds,
            fallback_rounds=sum(self._fallbacks.values()), fallbacks_by_reason=dict(self._fallbacks),
            drafters=[verifier_pb2.DrafterLink(**link) for link in links],
            # What a router needs to price draft lengths like this replica's own scheduler does.
            sps={int(b): float(v) for b, v in self.loop.sps.to_dict().items()},
            round_overhead_s=self.loop.round_overhead_s,
        )


# ---------------------------------------------------------------------------- the server


class VerifierServer:
    """The verifier service on a grpc.aio server: discovers the drafters' feature layout, builds
    the target engine and decode loop, profiles SPS (unless given), and serves."""

    def __init__(self, model: PreTrainedModel, settings: VerifierSettings, *, sps: SpsTable | None = None) -> None:
        self.model = model
        self.settings = settings
        self.replica_id = settings.replica_id or uuid.uuid4().hex[:12]
        self._sps = sps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-worker")
        self.proposer: RemoteProposer | None = None
        self.service: VerifierService | None = None
        self._grpc: GrpcServer | None = None
        self.metrics = VerifierMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry, settings.host, settings.metrics_port)
        self.model_name = settings.model or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        self._redis = None  # set when drafters are discovered through Redis
        self._background: list[asyncio.Task] = []

    @property
    def port(self) -> int:
        return self._grpc.port if self._grpc is not None else 0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _discover_drafters(self, wait_s: float) -> list[str]:
        """Drafter addresses registered in Redis, waiting up to `wait_s` for the first one."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                found = sorted(await registered(self._redis, self.settings.redis_prefix, "drafter"))
            except Exception as e:  # Redis not up yet: keep waiting
                log.warning("cannot read drafters from Redis: %s", e)
                found = []
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(0.5)

    async def _follow_drafters(self) -> None:
        """Keep the proposer's drafter links equal to the live Redis registrations (scaling)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                live = set(await registered(self._redis, self.settings.redis_prefix, "drafter"))
            except Exception:
                continue
            if self.proposer is None or not live:
                continue  # never drop the last links on an empty read
            for address in live - {link.address for link in self.proposer.links}:
                log.info("drafter %s registered: connecting", address)
                self.proposer.add_link(address)
            for address in {link.address for link in self.proposer.links} - live:
                log.info("drafter %s no longer registered: dropping", address)
                self.proposer.remove_link(address)

    async def _connect_drafters(self) -> list[int]:
        st = self.settings
        layers = list(st.feature_layers)
        addresses = list(st.drafter)
        if not addresses and st.redis_url:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(st.redis_url, decode_responses=True)
            addresses = await self._discover_drafters(st.drafter_wait_s)
        if not addresses:
            return []
        proposer = RemoteProposer(
            addresses, replica_id=self.replica_id, deadline_s=st.draft_deadline_ms / 1e3,
            backoff_s=(st.reconnect_min_ms / 1e3, st.reconnect_max_ms / 1e3),
            max_message_bytes=st.max_message_mb << 20, wire_dtype=st.feature_wire_dtype,
        )
        if not await proposer.start(st.drafter_wait_s):
            log.warning("no drafter of %s answered within %.0f s: serving target-only", st.drafter, st.drafter_wait_s)
            await proposer.stop()
            return []
        info, cfg = proposer.info, self.model.config
        wanted = {"vocab_size": int(self.model.get_output_embeddings().weight.shape[0]),
                  "hidden_size": int(cfg.hidden_size), "num_target_layers": int(cfg.num_hidden_layers)}
        for name, value in wanted.items():
            if getattr(info, name) != value:
                await proposer.stop()
                raise FailedPrecondition(f"the drafter was built for a target with {name} {getattr(info, name)}, "
                                         f"this target has {value}")
        if layers and layers != list(info.target_layer_ids):
            await proposer.stop()
            raise FailedPrecondition(
                f"--feature-layers {layers} differ from the drafter's {list(info.target_layer_ids)}"
            )
        self.proposer = proposer
        return list(info.target_layer_ids)

    async def start(self) -> int:
        st = self.settings
        layers = await self._connect_drafters()
        target = TargetEngine(self.model, feature_layer_ids=layers, max_sessions=st.max_sessions,
                              max_context=st.max_context or None)
        sps = self._sps
        if sps is None and st.profile_sps:
            block = (self.proposer.block_size if self.proposer is not None
                     else DecodeLoop.LOOKUP_BLOCK if st.ngram_lookup else 1)
            sps = await asyncio.get_running_loop().run_in_executor(
                self._executor, lambda: profile_sps(target, max_tokens=block + 1))
        # A profiled table comes with a learned round overhead; a given one (tests) schedules by it alone.
        loop = DecodeLoop(target, self.proposer, sps=sps, track_context=True,
                          round_overhead_s=None if self._sps is None else 0.0, lookup=st.lookup_config())
        self.service = VerifierService(loop, self.proposer, self._executor, replica_id=self.replica_id,
                                       metrics=self.metrics, model_name=self.model_name,
                                       trace_round_spans=st.trace_round_spans)
        self._grpc = GrpcServer([(verifier_pb2_grpc.add_VerifierServicer_to_server, self.service, SERVICE_NAME)],
                                host=st.host, port=st.port, max_message_bytes=st.max_message_mb << 20)
        port = await self._grpc.start()
        self.metrics_server.start()
        if self._redis is not None and self.proposer is not None and not st.drafter:
            self._background.append(asyncio.create_task(self._follow_drafters()))
        if st.redis_url:
            self._background.append(asyncio.create_task(register_forever(
                st.redis_url, "verifier", advertise_address(st.host, port, st.advertise_host), self._load,
                prefix=st.redis_prefix)))
        return port

    def _load(self) -> dict:
        target = self.service.loop.target
        return {"sessions": target.num_sessions, "max_sessions": target.max_sessions}

    async def stop(self, grace: float | None = 0.5) -> None:
        for task in self._background:
            task.cancel()
        await bounded_step("verifier background tasks", asyncio.gather(*self._background, return_exceptions=True),
                           STOP_STEP_LIMIT_S)
        if self._grpc is not None:
            await self._grpc.stop(grace)  # bounded inside
        if self.proposer is not None:
            await bounded_step("verifier drafter links", self.proposer.stop(), STOP_STEP_LIMIT_S)
        if self._redis is not None:  # drafter discovery's client
            await bounded_step("verifier Redis client", self._redis.aclose(), STOP_STEP_LIMIT_S)
        self.metrics_server.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    VerifierSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from verifier_svc.target_loading import load_target

    settings = VerifierSettings.from_sources(args)
    tracing.setup_tracing("verifier")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    target = load_target(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device,
                         small_batch_kernel=settings.cpu_kernel)

    async def main() -> None:
        server = VerifierServer(target.model, settings)
        await server.start()
        metrics = f", metrics :{server.metrics_server.port}" if server.metrics_server.port else ""
        print(f"dspark verifier listening on {server.address} (replica {server.replica_id}, "
              f"drafters {settings.drafter or 'none'}{metrics})", flush=True)
        await serve_until_signal(server.stop)

    asyncio.run(main())
    return 0
