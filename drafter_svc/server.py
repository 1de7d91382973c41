"""The drafter gRPC service (`dspark drafter`): a thin adapter from `dspark.v1.Drafter` to a
`DraftEngine`.

Owns the wire side of drafting: decoding and validating each `DraftMessage`, checking the KV handle
(replica, session, epoch, context length) on every message, and micro-batching — messages that
arrive together from any sessions and streams are applied and drafted in ONE `DraftEngine.propose`
call on a single worker thread, so model forwards never block the event loop. Sessions belong to
the stream that opened them and are released when it ends."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from drafter_svc.checkpoint import CONFIG_NAME, FROZEN_FLAG, load_checkpoint
from drafter_svc.config import DSparkConfig
from drafter_svc.draft_engine import DraftEngine
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common import small_batch_linear
from dspark_common.errors import DSparkError, FailedPrecondition, InvalidRequest, NotFound
from dspark_common.registry import advertise_address, register_forever
from dspark_common.grpc_server import GrpcServer, serve_until_signal
from dspark_common.grpc_status import abort, code_name, session_error
from dspark_common import tracing
from dspark_common.metrics import DrafterMetrics, MetricsServer
from dspark_common.micro_batch import MicroBatcher
from dspark_common.proto import common_pb2, drafter_pb2, drafter_pb2_grpc
from dspark_common.settings import DrafterSettings
from dspark_common.shutdown import STOP_STEP_LIMIT_S, bounded_step
from dspark_common.tensor_codec import FLOAT_DTYPES, decode_tensor, encode_tensor
from dspark_common.types import DraftRequest, Proposal
from dspark_common.wire import proposal_to_proto, sampling_from_proto

log = logging.getLogger(__name__)

SERVICE_NAME = "dspark.v1.Drafter"
_tracer = tracing.tracer("drafter")


# ---------------------------------------------------------------------------- domain of one message


@dataclass
class DraftWork:
    """One decoded, statically validated DraftMessage."""

    request_id: int
    stream_id: int
    session_id: str
    epoch: int
    length: int  # context length the sender expects before `context`
    replica_id: str
    open: bool = False
    close: bool = False
    context: torch.Tensor | None = None
    projected: bool = False
    draft: DraftRequest | None = None
    trace_context: object | None = None  # the sender's round (OpenTelemetry Context), when traced


# ---------------------------------------------------------------------------- the servicer


@dataclass
class _Owner:
    epoch: int
    stream_id: int


@dataclass
class _Counters:
    batches: int = 0
    drafted_blocks: int = 0
    max_batch: int = 0
    errors: int = 0
    open_streams: int = 0


class DrafterService(drafter_pb2_grpc.DrafterServicer):
    def __init__(
        self,
        model: DSparkDrafter,
        engine: DraftEngine,
        *,
        replica_id: str,
        executor: ThreadPoolExecutor,
        batch_window_s: float = 0.001,
        max_batch: int = 64,
        max_message_bytes: int = 64 << 20,
        proposal_top_k: int = 8,
        metrics: DrafterMetrics | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics or DrafterMetrics()
        self.metrics.sessions.set_function(lambda: len(self._owners))
        self.metrics.streams.set_function(lambda: self._counters.open_streams)
        self.engine = engine
        self.config: DSparkConfig = engine.config
        self.replica_id = replica_id
        self.max_message_bytes = max_message_bytes
        self.proposal_top_k = proposal_top_k
        self._executor = executor
        self._owners: dict[str, _Owner] = {}  # touched only on the worker thread
        # Epochs grow across restarts too, so a handle from before a restart is never current.
        self._epochs = itertools.count(time.time_ns() // 1000)
        self._stream_ids = itertools.count(1)
        self._counters = _Counters()
        self._max_context = engine.stats()["max_context"]
        self.batcher = MicroBatcher(self._run_batch, executor, key=lambda w: w.session_id, window_s=batch_window_s,
                                    max_batch=max_batch, expected=lambda: len(self._owners))
        self._info = self._build_info()

    # ---- decoding (event loop) ----------------------------------------------------------
    def _decode(self, msg: drafter_pb2.DraftMessage, stream_id: int) -> DraftWork:
        c = self.config
        h = msg.handle
        if not h.session_id:
            raise InvalidRequest("handle.session_id is empty", "handle.session_id")
        w = DraftWork(msg.request_id, stream_id, h.session_id, h.epoch, 0 if msg.open else h.length, h.replica_id,
                      open=msg.open, close=msg.close)
        if msg.trace_context:
            w.trace_context = tracing.extract(dict(msg.trace_context))
        n = 0
        if msg.HasField("context"):
            kind = msg.context.WhichOneof("features")
            if kind is None:
                raise InvalidRequest("context carries no features (set raw or projected)", "context")
            width = c.hidden_size if kind == "projected" else c.context_feature_size
            w.context = decode_tensor(getattr(msg.context, kind), f"context.{kind}", dtypes=FLOAT_DTYPES,
                                      shape=(None, width), max_elements=self._max_context * width)
            w.projected = kind == "projected"
            n = int(w.context.shape[0])
            if msg.context.start_pos != w.length:
                raise FailedPrecondition(
                    f"context.start_pos {msg.context.start_pos} differs from handle.length {w.length}: "
                    "context must continue exactly where the session's context ends"
                )
        if msg.HasField("draft"):
            d = msg.draft
            if not 1 <= d.block_size <= c.block_size:
                raise InvalidRequest(f"draft.block_size must be in 1..{c.block_size}, got {d.block_size}",
                                     "draft.block_size")
            if not d.anchor_token < c.vocab_size:
                raise InvalidRequest(
                    f"draft.anchor_token {d.anchor_token} is outside the vocabulary 0..{c.vocab_size - 1}",
                    "draft.anchor_token",
                )
            if d.anchor_pos != w.length + n:
                raise FailedPrecondition(
                    f"draft.anchor_pos {d.anchor_pos} must equal the context length after this message "
                    f"({w.length} + {n} = {w.length + n})"
                )
            sampling = sampling_from_proto(d.sampling)
            gen = None if sampling.greedy else torch.Generator().manual_seed(d.seed)
            w.draft = DraftRequest(w.session_id, int(d.anchor_token), int(d.anchor_pos), int(d.block_size), sampling,
                                   gen)
        return w

    # ---- applying a batch (worker thread) ------------------------------------------------
    def _handle(self, sid: str) -> common_pb2.KvHandle:
        owner = self._owners.get(sid)
        if owner is None:
            return common_pb2.KvHandle(replica_id=self.replica_id, session_id=sid)
        return common_pb2.KvHandle(replica_id=self.replica_id, session_id=sid, epoch=owner.epoch,
                                   length=self.engine.context_length(sid))

    def _check_handle(self, replica_id: str, session_id: str, epoch: int, length: int | None = None) -> None:
        """The handle must name this replica, an open session, its current epoch and (when given)
        the context length the drafter holds."""
        if replica_id != self.replica_id:
            raise FailedPrecondition(
                f"handle names drafter replica {replica_id!r} but this is {self.replica_id!r} "
                "(restarted?): re-open the session"
            )
        owner = self._owners.get(session_id)
        if owner is None:
            raise NotFound(f"unknown draft session {session_id!r}: open it first")
        if epoch != owner.epoch:
            raise FailedPrecondition(
                f"stale handle for session {session_id!r}: epoch {epoch}, current epoch {owner.epoch}"
            )
        held = self.engine.context_length(session_id)
        if length is not None and length != held:
            raise FailedPrecondition(
                f"handle for session {session_id!r} says {length} context positions, the drafter holds {held}"
            )

    def _apply(self, w: DraftWork) -> None:
        """Open and append context; drafting happens batched afterwards."""
        if w.open:
            if w.session_id in self._owners:
                self.engine.release(w.session_id)
                del self._owners[w.session_id]
            self.engine.open(w.session_id)
            self._owners[w.session_id] = _Owner(next(self._epochs), w.stream_id)
        else:  # a bare close needs no length: the sender may not know whether its last message landed
            uses_length = w.context is not None or w.draft is not None
            self._check_handle(w.replica_id, w.session_id, w.epoch, w.length if uses_length else None)
        if w.context is not None:
            try:
                if w.projected:
                    self.engine.append_projected(w.session_id, w.context, w.length)
                else:
                    self.engine.append_context(w.session_id, w.context, w.length)
            except DSparkError:
                if w.open:  # an open that cannot take its context leaves nothing behind
                    self._release(w.session_id)
                raise

    def _release(self, sid: str) -> bool:
        if self._owners.pop(sid, None) is None:
            return False
        self.engine.release(sid)
        return True

    def _run_batch(self, batch: list[DraftWork]) -> list[drafter_pb2.DraftReply]:
        replies: list[drafter_pb2.DraftReply | None] = [None] * len(batch)
        drafting: list[int] = []
        for i, w in enumerate(batch):
            try:
                self._apply(w)
            except DSparkError as e:
                replies[i] = self._error_reply(w, e)
                continue
            if w.draft is not None:
                drafting.append(i)
        if drafting:
            t0, t0_ns = time.perf_counter(), time.time_ns()
            proposals = self._propose([batch[i].draft for i in drafting])
            draft_ms = (time.perf_counter() - t0) * 1e3
            self._observe_batch(batch, drafting, proposals, draft_ms, t0_ns, time.time_ns())
            self._counters.batches += 1
            self._counters.drafted_blocks += len(drafting)
            self._counters.max_batch = max(self._counters.max_batch, len(drafting))
            for i, p in zip(drafting, proposals):
                if isinstance(p, DSparkError):
                    replies[i] = self._error_reply(batch[i], p)
                else:
                    replies[i] = drafter_pb2.DraftReply(
                        request_id=batch[i].request_id, handle=self._handle(batch[i].session_id),
                        proposal=proposal_to_proto(p, draft_ms=draft_ms, batch_size=len(drafting)),
                    )
        for i, w in enumerate(batch):
            if replies[i] is None:
                replies[i] = drafter_pb2.DraftReply(request_id=w.request_id, handle=self._handle(w.session_id))
            if w.close and replies[i].error.code == 0:
                self._release(w.session_id)
                replies[i].handle.length = 0
        return replies  # type: ignore[return-value]

    def _observe_batch(self, batch: list[DraftWork], drafting: list[int], proposals, draft_ms: float,
                       start_ns: int, end_ns: int) -> None:
        """Metrics of one batched forward, and a span for each traced message in it."""
        m = self.metrics
        m.draft_seconds.observe(draft_ms / 1e3)
        m.batch_size.observe(len(drafting))
        m.blocks.inc(len(drafting))
        for i, p in zip(drafting, proposals):
            w = batch[i]
            m.block_size.observe(w.draft.block_size)
            if w.trace_context is None:
                continue
            span = _tracer.start_span("drafter.draft", context=w.trace_context, start_time=start_ns, attributes={
                "dspark.service": "drafter", "dspark.replica_id": self.replica_id, "dspark.session_id": w.session_id,
                "dspark.draft.block_size": w.draft.block_size, "dspark.draft.batch_size": len(drafting),
                "dspark.draft.draft_ms": draft_ms, "dspark.draft.anchor_pos": w.draft.anchor_pos,
                "dspark.draft.context_tokens": int(w.context.shape[0]) if w.context is not None else 0,
                "dspark.draft.open": w.open,
            })
            if isinstance(p, DSparkError):
                span.set_status(tracing.error_status(str(p)))
            span.end(end_time=end_ns)

    def _propose(self, requests: list[DraftRequest]) -> list[Proposal | DSparkError]:
        """One batched propose; if it refuses, each request alone so only the bad one fails."""
        try:
            return list(self.engine.propose(requests))
        except DSparkError:
            out: list[Proposal | DSparkError] = []
            for r in requests:
                try:
                    out.extend(self.engine.propose([r]))
                except DSparkError as e:
                    out.append(e)
            return out

    def _error_reply(self, w: DraftWork, e: BaseException) -> drafter_pb2.DraftReply:
        self._counters.errors += 1
        handle = self._handle(w.session_id) if w.session_id in self._owners else None
        return drafter_pb2.DraftReply(request_id=w.request_id, handle=handle, error=session_error(e))

    def _release_stream(self, stream_id: int) -> int:
        mine = [sid for sid, o in self._owners.items() if o.stream_id == stream_id]
        for sid in mine:
            self._release(sid)
        return len(mine)

    # ---- RPCs ---------------------------------------------------------------------------
    async def Draft(self, request_iterator, context: grpc.aio.ServicerContext):
        stream_id = next(self._stream_ids)
        self._counters.open_streams += 1
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[asyncio.Future | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    self.metrics.queue_depth.inc()
                    try:
                        out.put_nowait(self.batcher.submit(self._decode(msg, stream_id)))
                    except DSparkError as e:  # malformed: answered at once, nothing applied
                        fut = loop.create_future()
                        self._counters.errors += 1
                        fut.set_result(drafter_pb2.DraftReply(request_id=msg.request_id, error=session_error(e)))
                        out.put_nowait(fut)
            finally:
                out.put_nowait(None)

        reader = loop.create_task(read())
        try:
            while (fut := await out.get()) is not None:
                try:
                    reply = await fut
                finally:
                    self.metrics.queue_depth.dec()
                code = reply.error.code
                self.metrics.messages.labels(status=code_name(code) if code else "ok").inc()
                yield reply
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            self._counters.open_streams -= 1
            # The stream's sessions go with it (also when the peer vanished or cancelled).
            try:
                loop.run_in_executor(self._executor, self._release_stream, stream_id)
            except RuntimeError:  # the server is shutting down: the engine goes with it
                pass

    async def Release(self, request: drafter_pb2.ReleaseDraftRequest, context) -> drafter_pb2.ReleaseDraftReply:
        h = request.handle

        def release() -> bool:
            self._check_handle(h.replica_id, h.session_id, h.epoch)
            return self._release(h.session_id)

        try:
            released = await asyncio.get_running_loop().run_in_executor(self._executor, release)
        except DSparkError as e:
            await abort(context, e)
        return drafter_pb2.ReleaseDraftReply(released=released)

    async def Stats(self, request, context) -> drafter_pb2.DrafterStats:
        s = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.stats)
        c = self._counters
        return drafter_pb2.DrafterStats(
            replica_id=self.replica_id, sessions=s["sessions"], cached_positions=s["cached_positions"],
            cache_bytes=s["cache_bytes"], max_sessions=s["max_sessions"], max_context=s["max_context"],
            open_streams=c.open_streams, batches=c.batches, drafted_blocks=c.drafted_blocks, max_batch=c.max_batch,
            errors=c.errors,
        )

    async def Info(self, request, context) -> drafter_pb2.DrafterInfo:
        return self._info

    def _build_info(self) -> drafter_pb2.DrafterInfo:
        c = self.config
        fc = self.model.fc.weight.detach().float()
        norm = self.model.hidden_norm.weight.detach().float()
        fp = hashlib.sha256(json.dumps(c.to_dict(), sort_keys=True, default=str).encode())
        fp.update(fc.numpy().tobytes())
        fp.update(norm.numpy().tobytes())
        stats = self.engine.stats()
        return drafter_pb2.DrafterInfo(
            replica_id=self.replica_id, block_size=c.block_size, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            target_layer_ids=c.target_layer_ids, num_target_layers=c.num_target_layers or 0,
            max_context=stats["max_context"], max_sessions=stats["max_sessions"], proposal_top_k=self.proposal_top_k,
            fc_weight=encode_tensor(fc), hidden_norm_weight=encode_tensor(norm), rms_norm_eps=c.rms_norm_eps,
            projection_fingerprint=fp.hexdigest()[:32], dtype=str(self.model.dtype).removeprefix("torch."),
            max_message_bytes=self.max_message_bytes,
        )


# ---------------------------------------------------------------------------- the server


class DrafterServer:
    """The drafter service on a grpc.aio server, with its worker thread and batcher."""

    def __init__(self, model: DSparkDrafter, settings: DrafterSettings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter-worker")
        engine = DraftEngine(model, model.config, max_sessions=settings.max_sessions,
                             max_context=settings.max_context, proposal_top_k=settings.proposal_top_k,
                             use_draft_vocab=settings.draft_vocab)
        max_bytes = settings.max_message_mb << 20
        self.metrics = DrafterMetrics()
        self.metrics_server = MetricsServer(self.metrics.registry, settings.host, settings.metrics_port)
        self.service = DrafterService(
            model, engine, replica_id=settings.replica_id or uuid.uuid4().hex[:12], executor=self._executor,
            batch_window_s=settings.batch_window_ms / 1e3, max_batch=settings.max_batch,
            max_message_bytes=max_bytes, proposal_top_k=settings.proposal_top_k, metrics=self.metrics,
        )
        self._grpc = GrpcServer([(drafter_pb2_grpc.add_DrafterServicer_to_server, self.service, SERVICE_NAME)],
                                host=settings.host, port=settings.port, max_message_bytes=max_bytes)

    @property
    def port(self) -> int:
        return self._grpc.port

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        self.service.batcher.start()
        port = await self._grpc.start()
        self.metrics_server.start()
        return port

    async def stop(self, grace: float | None = 0.5) -> None:
        await self._grpc.stop(grace)  # bounded inside
        await bounded_step("drafter micro-batcher", self.service.batcher.stop(), STOP_STEP_LIMIT_S)
        self.metrics_server.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- loading and the CLI


def load_model(settings: DrafterSettings) -> DSparkDrafter:
    """The drafter `settings.checkpoint` names. The target (`settings.target`) is loaded only when
    the drafter needs its frozen embed_tokens/lm_head: a slim checkpoint, 'default' or 'random'."""
    dtype = getattr(torch, settings.dtype)
    spec = settings.checkpoint
    if spec not in ("default", "random"):
        config_path = Path(spec) / CONFIG_NAME
        if not config_path.is_file():
            raise FailedPrecondition(f"no DSpark checkpoint at {spec} (no {CONFIG_NAME})")
        if not json.loads(config_path.read_text()).get(FROZEN_FLAG):
            return _with_kernel(load_checkpoint(spec, dtype=dtype, device=settings.device), settings)
    from drafter_svc.loading import load_drafter  # imports transformers: only when a target is needed
    from verifier_svc.target_loading import load_target

    target = load_target(settings.target, dtype=dtype, device=settings.device)
    model, description = load_drafter(spec, target.model, dtype=dtype, device=settings.device)
    log.info("serving %s for target %s", description, target.name)
    return _with_kernel(model, settings)


def _with_kernel(model: DSparkDrafter, settings: DrafterSettings) -> DSparkDrafter:
    if settings.cpu_kernel:
        small_batch_linear.install(model)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    DrafterSettings.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    settings = DrafterSettings.from_sources(args)
    tracing.setup_tracing("drafter")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    model = load_model(settings)

    async def main() -> None:
        server = DrafterServer(model, settings)
        port = await server.start()
        metrics = f", metrics :{server.metrics_server.port}" if server.metrics_server.port else ""
        print(f"dspark drafter listening on {server.address} (replica {server.service.replica_id}{metrics})",
              flush=True)
        heartbeat = None
        if settings.redis_url:
            def load() -> dict:
                return {"sessions": server.service.engine.stats()["sessions"]}

            heartbeat = asyncio.create_task(register_forever(
                settings.redis_url, "drafter", advertise_address(settings.host, port, settings.advertise_host), load,
                prefix=settings.redis_prefix))

        async def stop() -> None:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            await server.stop()

        await serve_until_signal(stop)

    asyncio.run(main())
    return 0
