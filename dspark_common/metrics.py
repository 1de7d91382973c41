"""Prometheus metrics of the verifier and drafter services, one `CollectorRegistry` per service
instance (never the global default, so several services in one process do not collide), and the
small HTTP endpoint that serves them (`--metrics-port`; the router serves its own on `/metrics`).
Names follow Prometheus conventions: `_seconds` for times, `_total` for counters (prometheus_client
appends it to a Counter's name). docs/OBSERVABILITY.md describes every metric."""

from __future__ import annotations

import logging
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LENGTH_BUCKETS = tuple(float(i) for i in range(0, 18))  # draft lengths 0..16, τ 1..17
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_POSITION = 16  # position labels 1..16: bounded cardinality


class MetricsServer:
    """prometheus_client's HTTP server for one registry on its own thread; port 0 = off."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry, self.host, self.requested = registry, host, port
        self._server = None
        self.port = 0

    def start(self) -> int:
        if self.requested <= 0:
            return 0
        self._server, _ = start_http_server(self.requested, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class VerifierMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("dspark_verifier_requests", "Decode streams by final status (ok, cancelled, or a gRPC code)",
                                ["status"], registry=r)
        self.ttft = Histogram("dspark_verifier_time_to_first_token_seconds",
                              "open message to the first token (prefill, incl. queueing)", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("dspark_verifier_inter_token_latency_seconds",
                             "time between tokens: a round's wall time over the tokens it produced, once per token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tau = Histogram("dspark_verifier_accepted_length", "τ: tokens produced per verification round "
                             "(accepted draft tokens + the bonus/correction token)", buckets=LENGTH_BUCKETS[1:],
                             registry=r)
        self.rounds = Counter("dspark_verifier_rounds", "verification rounds run", registry=r)
        self.generated = Counter("dspark_verifier_generated_tokens", "tokens produced (prefill tokens included)",
                                 registry=r)
        self.proposed = Counter("dspark_verifier_draft_proposed_tokens", "draft tokens received, by position (1-based)",
                                ["position"], registry=r)
        self.verified = Counter("dspark_verifier_draft_verified_tokens",
                                "draft tokens the scheduler sent to verification, by position", ["position"], registry=r)
        self.accepted = Counter("dspark_verifier_draft_accepted_tokens", "draft tokens accepted, by position",
                                ["position"], registry=r)
        self.draft_length = Histogram("dspark_verifier_draft_length", "draft tokens verified per round (the "
                                      "scheduled length; 0 = target-only)", buckets=LENGTH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("dspark_verifier_verify_batch_tokens", "tokens in one verification forward",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.verify_seconds = Histogram("dspark_verifier_verify_seconds", "time of one verification forward",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.draft_seconds = Histogram("dspark_verifier_draft_seconds", "round trip of one draft request",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("dspark_verifier_drafter_fallbacks", "rounds that wanted a draft and ran "
                                 "target-only, by reason", ["reason"], registry=r)
        self.queue_depth = Gauge("dspark_verifier_queue_depth", "target work items queued or running on the worker "
                                 "thread", registry=r)
        self.running = Gauge("dspark_verifier_sessions_running", "Decode streams generating now", registry=r)
        self.kv_slots = Gauge("dspark_verifier_kv_slots_in_use", "sessions holding target KV (running + kept)",
                              registry=r)
        self.kv_slots_max = Gauge("dspark_verifier_kv_slots", "KV slots (max sessions)", registry=r)

    def observe_round(self, *, proposed: int, scheduled: int, accepted: int, tokens: int, verify_s: float,
                      draft_s: float | None, round_s: float, fallback: str) -> None:
        self.rounds.inc()
        self.generated.inc(tokens)
        self.tau.observe(tokens)
        self.draft_length.observe(scheduled)
        self.batch_tokens.observe(scheduled + 1)
        self.verify_seconds.observe(verify_s)
        if draft_s is not None:
            self.draft_seconds.observe(draft_s)
        for k in range(1, min(proposed, MAX_POSITION) + 1):
            self.proposed.labels(position=str(k)).inc()
        for k in range(1, min(scheduled, MAX_POSITION) + 1):
            self.verified.labels(position=str(k)).inc()
        for k in range(1, min(accepted, MAX_POSITION) + 1):
            self.accepted.labels(position=str(k)).inc()
        if tokens:
            for _ in range(tokens):
                self.itl.observe(round_s / tokens)
        if fallback:
            self.fallbacks.labels(reason=fallback.split(":")[0]).inc()


class DrafterMetrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.messages = Counter("dspark_drafter_requests", "Draft messages by status (ok or a gRPC code name)",
                                ["status"], registry=r)
        self.blocks = Counter("dspark_drafter_drafted_blocks", "blocks drafted", registry=r)
        self.draft_seconds = Histogram("dspark_drafter_draft_seconds", "time of one batched draft forward",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("dspark_drafter_batch_size", "blocks drafted in one forward", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.block_size = Histogram("dspark_drafter_block_size", "tokens asked for per block", buckets=LENGTH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("dspark_drafter_queue_depth", "messages received and not yet answered", registry=r)
        self.sessions = Gauge("dspark_drafter_sessions", "draft sessions (context caches) held", registry=r)
        self.streams = Gauge("dspark_drafter_open_streams", "Draft streams open (one per verifier)", registry=r)
