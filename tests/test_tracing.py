"""One trace per request across the three real services (tiny models, loopback, one process, one
in-memory span exporter): the router's HTTP span is the root; the router's generate, placement and
Decode spans, the verifier's gRPC server and decode spans, its round spans (the first N only, the
rest aggregated into the decode span) and the drafter's draft spans all share its trace id, with
the right parent links and attributes."""

from __future__ import annotations

import aiohttp

from dspark_common.tracing import install_memory_exporter
from tests.router_stack import models, router_tokenizer, start_router
from tests.service_stack import start_drafter, start_verifier, wait_for

ROUND_SPANS = 3


async def test_one_trace_covers_router_verifier_drafter():
    exporter = install_memory_exporter()  # before any server or channel exists: instrumentation patches them
    target, drafter = models()
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address], trace_round_spans=ROUND_SPANS, model="tiny-llama")
    core = await start_router(router_tokenizer(), [v.address])
    try:
        exporter.clear()
        prompt = "Once upon a time"
        async with aiohttp.ClientSession() as http:
            async with http.post(core.url + "/v1/completions", json={
                    "model": "tiny-llama", "prompt": prompt, "max_tokens": 40, "temperature": 0,
                    "speculative": {"draft_length": 2}}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
        spec, usage = body["speculative"], body["usage"]

        def named(name):
            return [s for s in exporter.get_finished_spans() if s.name == name]

        async def decode_done():
            return named("verifier.decode")
        await wait_for(decode_done, timeout=10)

        (gen,) = named("router.generate")
        tid = gen.context.trace_id
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == tid]
        by_id = {s.context.span_id: s for s in spans}

        def parent(s):
            return by_id.get(s.parent.span_id) if s.parent is not None else None

        # the root: the router's HTTP server span (aiohttp instrumentation)
        http_span = parent(gen)
        assert http_span is not None and http_span.parent is None
        assert http_span.instrumentation_scope.name.startswith("opentelemetry.instrumentation.aiohttp_server")
        assert gen.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert gen.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

        (place,) = [s for s in spans if s.name == "router.placement"]
        assert parent(place) is gen and place.attributes["dspark.verifier"] == v.address
        (rdec,) = [s for s in spans if s.name == "router.decode"]
        assert parent(rdec) is gen

        # the verifier: its gRPC server span (context from the Decode metadata), then the decode span
        (vdec,) = [s for s in spans if s.name == "verifier.decode"]
        server = parent(vdec)
        assert server is not None and server.name.endswith("dspark.v1.Verifier/Decode")
        assert parent(server) is rdec
        assert vdec.instrumentation_scope.name == "dspark.verifier"
        a = vdec.attributes
        assert a["gen_ai.request.model"] == "tiny-llama"
        assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert a["dspark.speculative.rounds"] == spec["rounds"]
        assert a["dspark.speculative.draft_tokens"] == spec["draft_tokens"]
        assert a["dspark.speculative.accepted_draft_tokens"] == spec["accepted_draft_tokens"]

        # round spans: the first ROUND_SPANS rounds, the rest aggregated on the decode span
        rounds = sorted((s for s in spans if s.name == "verifier.round"), key=lambda s: s.start_time)
        assert spec["rounds"] > ROUND_SPANS
        assert len(rounds) == ROUND_SPANS
        assert all(parent(r) is vdec for r in rounds)
        assert [r.attributes["dspark.round"] for r in rounds] == list(range(1, ROUND_SPANS + 1))
        assert a["dspark.aggregated.rounds"] == spec["rounds"] - ROUND_SPANS
        assert (sum(r.attributes["dspark.round.scheduled"] for r in rounds) + a["dspark.aggregated.scheduled"]
                == spec["draft_tokens"])
        assert (sum(r.attributes["dspark.round.accepted"] for r in rounds) + a["dspark.aggregated.accepted"]
                == spec["accepted_draft_tokens"])
        assert any(e.name == "rounds.aggregated" for e in vdec.events)
        for r in rounds:
            for key in ("dspark.round.proposed", "dspark.round.batch_tokens", "dspark.round.verify_ms",
                        "dspark.round.draft_ms"):
                assert key in r.attributes

        # the drafter: one draft span per traced round, child of that round (context per message)
        drafts = [s for s in spans if s.name == "drafter.draft"]
        assert len(drafts) == ROUND_SPANS
        assert {parent(dr).context.span_id for dr in drafts} == {r.context.span_id for r in rounds}
        for dr in drafts:
            assert dr.instrumentation_scope.name == "dspark.drafter"
            assert dr.attributes["dspark.draft.block_size"] == 2
            assert dr.attributes["dspark.draft.batch_size"] >= 1
            assert dr.attributes["dspark.draft.draft_ms"] >= 0
        # untraced rounds leave no drafter spans in other traces
        assert not [s for s in exporter.get_finished_spans() if s.name == "drafter.draft"
                    and s.context.trace_id != tid]
    finally:
        await core.stop()
        await v.stop()
        await d.stop()


def test_exporter_from_env():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from dspark_common.tracing import exporter_from_env, extract, inject

    assert exporter_from_env({}) is None
    assert exporter_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert isinstance(exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)
    assert isinstance(exporter_from_env({"OTEL_TRACES_EXPORTER": "otlp"}), OTLPSpanExporter)
    assert extract({}) is None and extract({"traceparent": "garbage"}) is None
    assert inject() == {} or "traceparent" in inject()
