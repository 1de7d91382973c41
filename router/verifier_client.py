"""The router's gRPC client side of the verifiers: one channel per verifier address (fast
reconnects, bounded messages), `Stats` probes, `Release` of kept KV, and `DecodeStream`, one
bidirectional Decode call that the router steers (draft length, cancel) while reading its events."""

from __future__ import annotations

import asyncio
import logging

import grpc

from dspark_common.grpc_server import message_options
from dspark_common.proto import common_pb2, verifier_pb2, verifier_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def draft_length_proto(k: int | str) -> verifier_pb2.DraftLength:
    return verifier_pb2.DraftLength(auto=True) if k == "auto" else verifier_pb2.DraftLength(tokens=int(k))


class DecodeStream:
    """One Decode call: write the open message, then read events and send control messages."""

    def __init__(self, stub: verifier_pb2_grpc.VerifierStub, address: str, timeout_s: float,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.address = address
        # `metadata` carries the trace context (traceparent): the stream is one generation
        self._call = stub.Decode(timeout=timeout_s, metadata=metadata or None)
        self._closed = False

    async def open(self, request: verifier_pb2.OpenSession) -> None:
        await self._call.write(verifier_pb2.DecodeRequest(open=request))

    async def read(self) -> verifier_pb2.DecodeEvent | None:
        """The next event, or None when the verifier ended the stream."""
        ev = await self._call.read()
        return None if ev is grpc.aio.EOF else ev

    async def set_draft_length(self, k: int | str) -> bool:
        """Ask for draft length `k` from the next round on; False when the call is ending (the
        next `read` says how it ended). A write that races the end is dropped rather than
        raised: grpc.aio would report that race as the call's status (INTERNAL)."""
        if self._closed or self._call.done():
            return False
        try:
            await self._call.write(verifier_pb2.DecodeRequest(set_draft_length=draft_length_proto(k)))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("draft length write to %s dropped: %s", self.address, e)
            return False
        return True

    async def finish(self) -> None:
        """The Summary arrived: close our side."""
        if not self._closed:
            self._closed = True
            try:
                await self._call.done_writing()
            except Exception:
                pass

    def cancel(self) -> None:
        """Stop the generation now; the verifier frees the session's KV when the call ends."""
        if not self._closed:
            self._closed = True
        self._call.cancel()


class VerifierPool:
    """Channels to verifiers, by address."""

    def __init__(self, *, max_message_bytes: int = 64 << 20) -> None:
        self._options = message_options(max_message_bytes) + CHANNEL_OPTIONS
        self._channels: dict[str, tuple[grpc.aio.Channel, verifier_pb2_grpc.VerifierStub]] = {}

    def stub(self, address: str) -> verifier_pb2_grpc.VerifierStub:
        if address not in self._channels:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = (channel, verifier_pb2_grpc.VerifierStub(channel))
        return self._channels[address][1]

    async def stats(self, address: str, timeout_s: float = 2.0) -> verifier_pb2.VerifierStats:
        return await self.stub(address).Stats(verifier_pb2.VerifierStatsRequest(), timeout=timeout_s)

    async def release(self, address: str, handle: dict, timeout_s: float = 5.0) -> bool:
        """Release a kept session's KV; False when the verifier no longer holds it."""
        try:
            reply = await self.stub(address).Release(
                verifier_pb2.ReleaseSessionRequest(handle=common_pb2.KvHandle(**handle)), timeout=timeout_s)
            return reply.released
        except grpc.aio.AioRpcError as e:
            log.info("release of %s on %s: %s", handle.get("session_id"), address, e.code().name)
            return False

    def decode(self, address: str, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()) -> DecodeStream:
        return DecodeStream(self.stub(address), address, timeout_s, metadata)

    async def drop(self, address: str) -> None:
        item = self._channels.pop(address, None)
        if item is not None:
            await item[0].close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.drop(address)
