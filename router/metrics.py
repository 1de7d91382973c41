"""The router's Prometheus metrics, in one place (one registry per router, no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class RouterMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dspark_router_requests", "requests by API and status", ["api", "status"], registry=r)
        self.rejected = Counter("dspark_router_rejected", "requests refused before generating, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("dspark_router_prompt_tokens", "prompt tokens of generations", registry=r)
        self.generated_tokens = Counter("dspark_router_generated_tokens", "tokens generated", registry=r)
        self.rounds = Counter("dspark_router_rounds", "verification rounds", registry=r)
        self.draft_tokens = Counter("dspark_router_draft_tokens", "draft tokens verified", registry=r)
        self.accepted_draft_tokens = Counter("dspark_router_accepted_draft_tokens", "draft tokens accepted", registry=r)
        self.failovers = Counter("dspark_router_failovers", "generations re-placed after losing their verifier",
                                 registry=r)
        self.draft_length_changes = Counter("dspark_router_draft_length_changes",
                                            "DraftLength messages sent by the controller", registry=r)
        self.finished = Counter("dspark_router_finished", "generations by finish reason", ["reason"], registry=r)
        self.running = Gauge("dspark_router_running", "generations running now", registry=r)
        self.live_verifiers = Gauge("dspark_router_live_verifiers", "verifiers answering probes", registry=r)
        self.ttft = Histogram("dspark_router_time_to_first_token_seconds",
                              "request start to the first generated token reaching the router", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("dspark_router_inter_token_latency_seconds",
                             "time between tokens: gap between two rounds over the tokens of the later, once per token",
                             registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.duration = Histogram("dspark_router_generation_seconds", "wall time of a generation", registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def render(self) -> bytes:
        return generate_latest(self.registry)
