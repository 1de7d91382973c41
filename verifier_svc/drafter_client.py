"""The verifier's side of the Draft stream: a `Proposer` whose drafter runs in another service.

Owns, per session, the history of the drafter's context (projected features, [L, d], so a drafter
that lost the session — restart, timeout, failover — can be re-opened with the full context), the
drafter's KV handle, and which drafter serves it. A session's context update (features of the
tokens accepted last round) rides on its next draft request, so a round costs one message each
way. The projection hidden_norm(fc(.)) is done here, with weights from the drafter's Info: it
divides the feature bytes per token by T (see docs/SERVICES.md).

Failures never fail generation: an unreachable drafter, a reply past the deadline, a per-session
error or an invalid proposal make `propose_one` return no proposal and the reason, and the round
runs target-only. Each `DrafterLink` reconnects in the background with exponential backoff; the
sessions it served are re-opened (resynced) on their next round.

`open`/`append_context`/`truncate`/`release` run on the verifier's target worker thread;
`propose_one` runs on the event loop; a session is never used from both at once."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from dspark_common.errors import FailedPrecondition, InvalidRequest, Unavailable
from dspark_common.grpc_server import message_options
from dspark_common.grpc_status import code_name
from dspark_common.proto import common_pb2, drafter_pb2, drafter_pb2_grpc
from dspark_common.tensor_codec import DTYPES, FLOAT_DTYPES, decode_tensor, encode_tensor
from dspark_common.types import DraftRequest, Proposal
from dspark_common.wire import proposal_from_proto, sampling_to_proto

log = logging.getLogger(__name__)

_INITIAL_HISTORY = 256
REFUSED_RETRY_S = 1.0  # how long a session waits after the drafter hit a limit (sessions, context)


class ContextProjection:
    """H_ctx = hidden_norm(fc(features)): the drafter's context projection ([n, T*d] -> [n, d]),
    done on the verifier so only d numbers per token travel."""

    def __init__(self, info: drafter_pb2.DrafterInfo) -> None:
        d, td = info.hidden_size, info.hidden_size * len(info.target_layer_ids)
        self.fc = decode_tensor(info.fc_weight, "info.fc_weight", dtypes=FLOAT_DTYPES, shape=(d, td)).float()
        self.norm = decode_tensor(info.hidden_norm_weight, "info.hidden_norm_weight", dtypes=FLOAT_DTYPES,
                                  shape=(d,)).float()
        self.eps = float(info.rms_norm_eps)
        self.in_features, self.out_features = td, d

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        # Features come from the target's device; the projection weights live on the CPU side
        # that encodes the wire message.
        x = features.to(self.fc.device, torch.float32) @ self.fc.T
        return self.norm * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


# ---------------------------------------------------------------------------- one drafter


class DrafterLink:
    """A long-lived Draft stream to one drafter address, multiplexing this verifier's sessions.

    `run()` (a background task) connects — Info, then the stream — and reconnects with exponential
    backoff whenever the stream breaks or `reset()` is called. `generation` counts successful
    connections: state opened under an older generation is gone from the drafter."""

    def __init__(self, address: str, *, check_info: Callable[[drafter_pb2.DrafterInfo], str | None],
                 max_message_bytes: int, deadline_s: float, backoff_s: tuple[float, float]) -> None:
        self.address = address
        self.ready = False
        self.generation = 0
        self.sessions = 0
        self.reconnects = 0
        self.last_error = ""
        self.info: drafter_pb2.DrafterInfo | None = None
        self._check_info = check_info
        self._options = message_options(max_message_bytes) + [
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", int(backoff_s[1] * 1000)),
        ]
        self._deadline_s = deadline_s
        self._backoff_s = backoff_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._outbox: asyncio.Queue | None = None
        self._became_ready = asyncio.Event()
        self._reset = asyncio.Event()

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._became_ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def run(self) -> None:
        backoff = self._backoff_s[0]
        while True:
            channel = grpc.aio.insecure_channel(self.address, options=self._options)
            try:
                stub = drafter_pb2_grpc.DrafterStub(channel)
                info = await stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=self._deadline_s)
                problem = self._check_info(info)
                if problem:
                    raise FailedPrecondition(problem)
                self.info, self._outbox = info, asyncio.Queue()
                call = stub.Draft()
                self.generation += 1
                self.ready, self.last_error = True, ""
                self._became_ready.set()
                backoff = self._backoff_s[0]
                log.info("drafter %s ready (replica %s)", self.address, info.replica_id)
                await self._pump(call, self._outbox)
            except asyncio.CancelledError:  # stopping
                self.last_error = "stopped"
                raise
            except grpc.aio.AioRpcError as e:
                self.last_error = f"{e.code().name}: {e.details()}"
            except FailedPrecondition as e:  # refused: a different drafter model
                self.last_error = str(e)
            except Exception as e:  # anything else breaks this connection, never the link
                log.exception("drafter %s stream failed", self.address)
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                was_ready, self.ready = self.ready, False
                self._became_ready.clear()
                self._fail_pending(Unavailable(f"drafter {self.address} lost: {self.last_error}"))
                await channel.close(grace=None)
                if was_ready and self.last_error != "stopped":
                    self.reconnects += 1
                    log.warning("drafter %s lost (%s); reconnecting", self.address, self.last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_s[1])

    async def _pump(self, call, outbox: asyncio.Queue) -> None:
        """Write the outbox to the stream and route replies to their callers until the stream
        breaks, ends, or `reset()` is called."""

        async def write() -> None:
            while True:
                await call.write(await outbox.get())

        async def read() -> None:
            async for reply in call:
                fut = self._pending.pop(reply.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            self.last_error = "the drafter ended the stream"

        self._reset.clear()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(write()), loop.create_task(read()), loop.create_task(self._reset.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        finally:
            call.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _fail_pending(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    def reset(self, reason: str) -> None:
        """Drop the current stream (e.g. after a missed deadline); `run` reconnects."""
        if self.ready:
            self.last_error = reason
            self._reset.set()

    def send(self, msg: drafter_pb2.DraftMessage) -> None:
        """Fire and forget (a close): the reply is dropped."""
        if self.ready and self._outbox is not None:
            msg.request_id = next(self._ids)
            self._outbox.put_nowait(msg)

    async def call(self, msg: drafter_pb2.DraftMessage, timeout: float) -> drafter_pb2.DraftReply:
        if not self.ready or self._outbox is None:
            raise Unavailable(f"drafter {self.address} is not connected: {self.last_error}")
        msg.request_id = rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._outbox.put_nowait(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)


# ---------------------------------------------------------------------------- the proposer


def _empty_proposal() -> Proposal:
    return Proposal(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1),
                    torch.zeros(0))


@dataclass
class _Session:
    remote_id: str
    history: torch.Tensor  # [capacity, d] projected features, wire dtype
    length: int = 0  # context positions [0, length) in history
    link: DrafterLink | None = None
    generation: int = 0  # link.generation of the last message sent: the drafter may hold state then
    handle: common_pb2.KvHandle | None = None  # the drafter's, as of its last reply
    synced: bool = False  # False: the drafter's state is unknown or gone; re-open on the next draft
    retry_at: float = 0.0  # after the drafter refused the session (a limit), no drafts before this


@dataclass
class DraftOutcome:
    proposal: Proposal | None
    fallback: str = ""  # why there is no proposal ("" = none was asked for or it succeeded)


class RemoteProposer:
    """A `Proposer` backed by one or more drafter services."""

    def __init__(self, addresses: list[str], *, replica_id: str, deadline_s: float = 2.0,
                 backoff_s: tuple[float, float] = (0.05, 2.0), max_message_bytes: int = 64 << 20,
                 wire_dtype: str = "float16") -> None:
        self.replica_id = replica_id
        self.deadline_s = deadline_s
        self.wire_dtype = DTYPES[wire_dtype]
        self.info: drafter_pb2.DrafterInfo | None = None
        self.projection: ContextProjection | None = None
        self._link_args = dict(check_info=self._check_info, max_message_bytes=max_message_bytes,
                               deadline_s=deadline_s, backoff_s=backoff_s)
        self.links = [DrafterLink(a, **self._link_args) for a in addresses]
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rr = itertools.count()

    # ---- connecting ----------------------------------------------------------------------
    def _check_info(self, info: drafter_pb2.DrafterInfo) -> str | None:
        """The first drafter to answer fixes the layout; later ones must serve the same projection."""
        if self.info is None:
            self.info, self.projection = info, ContextProjection(info)
            return None
        for name in ("block_size", "vocab_size", "hidden_size", "projection_fingerprint"):
            if getattr(info, name) != getattr(self.info, name):
                return f"drafter {info.replica_id} has a different {name} than the first drafter: refused"
        if list(info.target_layer_ids) != list(self.info.target_layer_ids):
            return "drafter reads different target layers than the first drafter: refused"
        return None

    async def start(self, wait_s: float) -> bool:
        """Start every link; True once one drafter has described itself (within `wait_s`)."""
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(link.run()) for link in self.links]
        if self.info is not None:
            return True
        waits = [asyncio.ensure_future(link.wait_ready(wait_s)) for link in self.links]
        for fut in asyncio.as_completed(waits):
            if await fut:
                break
        for w in waits:
            w.cancel()
        return self.info is not None

    def add_link(self, address: str) -> None:
        """Start using a drafter that appeared (Redis discovery); call on the event loop."""
        if any(link.address == address for link in self.links):
            return
        link = DrafterLink(address, **self._link_args)
        self.links.append(link)
        if self._loop is not None:
            self._tasks.append(self._loop.create_task(link.run()))

    def remove_link(self, address: str) -> None:
        """Stop using a drafter whose registration expired; its sessions fail over next round."""
        for i, link in enumerate(self.links):
            if link.address == address:
                del self.links[i]
                link.ready = False
                task = self._tasks.pop(i) if i < len(self._tasks) else None
                if task is not None:
                    task.cancel()
                return

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def block_size(self) -> int:
        return int(self.info.block_size) if self.info is not None else 0

    # ---- Proposer (target worker thread) -----------------------------------------------------
    def open(self, session_id: str) -> None:
        if self.projection is None:
            raise FailedPrecondition("no drafter has described itself yet")
        with self._lock:
            if session_id in self._sessions:
                raise FailedPrecondition(f"draft session {session_id!r} is already open")
            history = torch.empty(_INITIAL_HISTORY, self.projection.out_features, dtype=self.wire_dtype)
            self._sessions[session_id] = _Session(f"{self.replica_id}/{session_id}", history)

    def release(self, session_id: str) -> bool:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return False
        if s.link is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_remote, s)
        return True

    def _close_remote(self, s: _Session) -> None:
        """(Event loop) Free a released session on its drafter. State on an older stream went with
        it; a session whose state is unknown (its open may be in flight) is re-opened and closed in
        one message."""
        s.link.sessions -= 1
        if s.generation != s.link.generation:
            return
        if s.synced:
            msg = drafter_pb2.DraftMessage(handle=s.handle, close=True)
        else:
            msg = drafter_pb2.DraftMessage(handle=common_pb2.KvHandle(session_id=s.remote_id), open=True, close=True)
        s.link.send(msg)

    def context_length(self, session_id: str) -> int:
        return self._get(session_id).length

    def append_context(self, session_id: str, features: torch.Tensor, start_pos: int) -> None:
        s = self._get(session_id)
        if start_pos != s.length:
            raise FailedPrecondition(f"session {session_id!r} holds {s.length} context positions, not {start_pos}")
        h = self.projection(features).to(self.wire_dtype)
        end = s.length + h.shape[0]
        if end > s.history.shape[0]:
            grown = torch.empty(max(end, 2 * s.history.shape[0]), s.history.shape[1], dtype=s.history.dtype)
            grown[: s.length] = s.history[: s.length]
            s.history = grown
        s.history[s.length : end] = h
        s.length = end

    def truncate(self, session_id: str, length: int) -> None:
        s = self._get(session_id)
        if not 0 <= length <= s.length:
            raise FailedPrecondition(f"cannot truncate session {session_id!r} of {s.length} positions to {length}")
        s.length = length
        if s.handle is not None and s.handle.length > length:
            s.synced = False  # the drafter holds more than we want: re-open on the next draft

    def propose(self, requests: list[DraftRequest]) -> list[Proposal]:
        """The blocking `Proposer` form, for a caller on another thread than the event loop (e.g.
        `DecodeLoop.generate` run in a worker). A failed draft comes back as an empty proposal,
        which the loop verifies as a target-only round."""
        if self._loop is None:
            raise FailedPrecondition("the remote proposer is not started")
        futures = [asyncio.run_coroutine_threadsafe(self.propose_one(r), self._loop) for r in requests]
        outs = [f.result() for f in futures]
        return [o.proposal if o.proposal is not None else _empty_proposal() for o in outs]

    def _get(self, session_id: str) -> _Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise KeyError(session_id)
        return s

    # ---- drafting (event loop) ---------------------------------------------------------------
    def _link_for(self, s: _Session) -> DrafterLink | None:
        """The session's drafter while it is up; otherwise the least loaded ready one (failover)."""
        if s.link is not None and s.link.ready:
            return s.link
        ready = [link for link in self.links if link.ready]
        if not ready:
            return s.link
        start = next(self._rr)
        order = ready[start % len(ready):] + ready[: start % len(ready)]
        best = min(order, key=lambda link: link.sessions)
        if s.link is not None:
            s.link.sessions -= 1
        best.sessions += 1
        s.link, s.synced = best, False
        return best

    def drafter_of(self, session_id: str) -> str:
        s = self._sessions.get(session_id)
        link = self._link_for(s) if s is not None else None
        return link.address if link is not None else ""

    async def propose_one(self, r: DraftRequest, trace_context: dict[str, str] | None = None) -> DraftOutcome:
        """One draft for one session. `trace_context` (W3C traceparent of the round) rides on the
        message: the stream is shared by all sessions, so context cannot travel in its metadata."""
        s = self._get(r.session_id)
        link = self._link_for(s)
        if link is None or not link.ready:
            return DraftOutcome(None, "drafter_unavailable")
        if time.monotonic() < s.retry_at:
            return DraftOutcome(None, "drafter_refused: waiting before asking again")
        resync = not s.synced or s.generation != link.generation  # a new stream: the old state is gone
        start = 0 if resync else int(s.handle.length)
        if r.anchor_pos != s.length:
            return DraftOutcome(None, f"internal: context {s.length} != anchor position {r.anchor_pos}")
        msg = drafter_pb2.DraftMessage(
            handle=common_pb2.KvHandle(session_id=s.remote_id) if resync else s.handle,
            open=resync,
            draft=drafter_pb2.DraftSpec(
                anchor_token=r.anchor_token, anchor_pos=r.anchor_pos, block_size=r.block_size,
                sampling=sampling_to_proto(r.sampling),
                seed=0 if r.sampling.greedy else int(torch.randint(0, 2**62, (1,), generator=r.generator)),
            ),
        )
        if trace_context:
            msg.trace_context.update(trace_context)
        if s.length > start:
            msg.context.start_pos = start
            msg.context.projected.CopyFrom(encode_tensor(s.history[start : s.length]))
        if msg.ByteSize() > link.info.max_message_bytes:
            return DraftOutcome(None, f"drafter_refused: {msg.ByteSize()} bytes of context exceed the drafter's "
                                      f"message limit of {link.info.max_message_bytes}")
        s.synced, s.generation = False, link.generation  # until a valid reply says otherwise
        try:
            reply = await link.call(msg, self.deadline_s)
        except asyncio.TimeoutError:
            link.reset(f"no reply within {self.deadline_s * 1e3:.0f} ms")
            return DraftOutcome(None, "drafter_timeout")
        except Unavailable:
            return DraftOutcome(None, "drafter_unavailable")
        if reply.error.code:
            if reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:  # a limit: do not hammer it
                s.retry_at = time.monotonic() + REFUSED_RETRY_S
            return DraftOutcome(None, f"drafter_error: {code_name(reply.error.code)}: {reply.error.message}")
        try:
            h = reply.handle
            if h.session_id != s.remote_id or h.length != s.length:
                raise InvalidRequest(f"reply handle {h.session_id}@{h.length} does not match {s.remote_id}@{s.length}")
            proposal = proposal_from_proto(reply.proposal, block_size=r.block_size, vocab_size=self.info.vocab_size)
        except InvalidRequest as e:
            return DraftOutcome(None, f"invalid_proposal: {e}")
        s.handle, s.synced = h, True
        return DraftOutcome(proposal)

    def link_stats(self) -> list[dict]:
        return [dict(address=link.address, ready=link.ready, sessions=link.sessions, last_error=link.last_error,
                     reconnects=link.reconnects, replica_id=link.info.replica_id if link.info else "")
                for link in self.links]

