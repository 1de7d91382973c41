"""OpenTelemetry for every service: the SDK set up from the standard OTEL_* variables, the
maintained instrumentations (aiohttp server, grpc.aio client/server, redis), W3C trace-context
carried per message on multiplexed streams, and an in-memory exporter for tests.

Configuration (standard OpenTelemetry variables):
  OTEL_TRACES_EXPORTER        otlp | console | none (default none: no spans are recorded)
  OTEL_SERVICE_NAME           service.name of the process (default: the component, e.g. dspark-verifier)
  OTEL_EXPORTER_OTLP_ENDPOINT OTLP/gRPC collector, e.g. http://otel-collector:4317
  OTEL_TRACES_SAMPLER(_ARG)   the SDK's sampler (default parentbased_always_on)

The tracer provider is process-global (OpenTelemetry allows setting it once). Spans of the three
services are told apart by their instrumentation scope (`dspark.router`, `dspark.verifier`,
`dspark.drafter`) and the `dspark.service` attribute, so several services in one process (tests,
`dspark generate`) share one provider.

Streams: the gRPC instrumentation puts `traceparent` in the metadata of unary calls; for the two
long-lived bidirectional streams (Decode, one per generation; Draft, ONE per verifier multiplexing
all its sessions) the context travels explicitly: Decode in its call metadata, Draft per message
(`DraftMessage.trace_context`, a string map), injected and extracted with the W3C propagator."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# Bidirectional streams whose context the services carry themselves (see the module docstring):
# the client interceptor would wrap their calls in an async generator, which breaks read()/write().
STREAMING_METHODS = ("Decode", "Draft")


def tracer(component: str) -> trace.Tracer:
    """The tracer of a component (`router`, `verifier`, `drafter`); follows the global provider."""
    return trace.get_tracer(f"dspark.{component}")


def exporter_from_env(env: Mapping[str, str] | None = None):
    """The span exporter OTEL_TRACES_EXPORTER names, or None for 'none' (the default)."""
    env = os.environ if env is None else env
    kind = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT / _HEADERS / _INSECURE
    raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: use otlp, console or none")


def setup_tracing(component: str, env: Mapping[str, str] | None = None) -> bool:
    """At process start: install the SDK provider with the configured exporter (batched) and the
    instrumentations. Returns False (and changes nothing) when OTEL_TRACES_EXPORTER is none."""
    env = os.environ if env is None else env
    exporter = exporter_from_env(env)
    if exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or f"dspark-{component}",
                                "service.namespace": "dspark"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrument()
    log.info("tracing: exporting spans of %s with %s", component, type(exporter).__name__)
    return True


def install_memory_exporter():
    """(Tests) A process-global SDK provider exporting synchronously to an in-memory exporter,
    plus the instrumentations; returns the exporter (cleared). Safe to call more than once."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    exporter = getattr(provider, "_dspark_memory_exporter", None)
    if exporter is None:
        provider = TracerProvider(resource=Resource.create({"service.name": "dspark-test"}))
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        provider._dspark_memory_exporter = exporter  # type: ignore[attr-defined]
        trace.set_tracer_provider(provider)
        instrument()
    exporter.clear()
    return exporter


def instrument() -> None:
    """The maintained instrumentations, each applied once (they patch the libraries globally, so
    call this before creating servers, channels and clients)."""
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    def not_streaming(details: Any) -> bool:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        return method.rsplit("/", 1)[-1] not in STREAMING_METHODS

    todo = [GrpcAioInstrumentorServer(), GrpcAioInstrumentorClient(filter_=not_streaming)]
    try:
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor

        todo.append(AioHttpServerInstrumentor())
    except ImportError:  # pragma: no cover
        pass
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        todo.append(RedisInstrumentor())
    except ImportError:  # pragma: no cover
        pass
    for inst in todo:
        if not inst.is_instrumented_by_opentelemetry:
            inst.instrument()


# ---- carrying context by hand -------------------------------------------------------------------


def inject(ctx: otel_context.Context | None = None, carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The W3C `traceparent` (and `tracestate`) of `ctx` (default: the current context)."""
    carrier = {} if carrier is None else carrier
    _PROPAGATOR.inject(carrier, context=ctx)
    return dict(carrier)


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context a carrier names, or None when it names none (no traceparent)."""
    if not carrier or "traceparent" not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def metadata(ctx: otel_context.Context | None = None) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying `ctx` (empty when there is no active span)."""
    return tuple(inject(ctx).items())


def context_from_metadata(invocation_metadata) -> otel_context.Context | None:
    """A server's parent: the current context when an interceptor opened a server span, else the
    context in the call's metadata, else None."""
    if trace.get_current_span().get_span_context().is_valid:
        return otel_context.get_current()
    return extract({k: v for k, v in (invocation_metadata or ()) if isinstance(v, str)})


def span_context(span: trace.Span) -> otel_context.Context:
    return trace.set_span_in_context(span)


def error_status(description: str):
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR, description)
