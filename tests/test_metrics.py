"""Prometheus metrics of the three real services (tiny models, loopback): the router's /metrics
on its HTTP port, the verifier's and drafter's on their --metrics-port. Scraped before and after
one request, the counters move by exactly what the response's `speculative` statistics say, and
the gauges (KV slots, running sessions, queues) are back to 0 afterwards."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from dspark_common.metrics import DrafterMetrics, VerifierMetrics
from tests.router_stack import free_port, models, router_tokenizer, start_router
from tests.service_stack import start_drafter, start_verifier, wait_for


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(m: dict, name: str, **labels) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(v for (n, ls), v in m.items() if n == name and all((k, x) in ls for k, x in labels.items()))


def by_position(m: dict, name: str) -> dict[int, float]:
    return {int(dict(ls)["position"]): v for (n, ls), v in m.items() if n == name}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_registries_are_per_service():
    a, b = VerifierMetrics(), VerifierMetrics()
    a.rounds.inc()
    assert b"dspark_verifier_rounds_total 0.0" in b.render()
    DrafterMetrics(), DrafterMetrics()  # no duplicate-timeseries error: not the global registry


async def test_metrics_move_with_a_request():
    target, drafter = models()
    d = await start_drafter(drafter, metrics_port=free_port())
    v = await start_verifier(target, [d.address], metrics_port=free_port())
    core = await start_router(router_tokenizer(), [v.address])
    urls = {"router": core.url + "/metrics", "verifier": f"http://127.0.0.1:{v.metrics_server.port}/metrics",
            "drafter": f"http://127.0.0.1:{d.metrics_server.port}/metrics"}
    try:
        async with aiohttp.ClientSession() as http:
            before = {k: await scrape(http, u) for k, u in urls.items()}
            async with http.post(core.url + "/v1/completions", json={
                    "model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0,
                    "speculative": {"draft_length": 4}}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            spec, usage = body["speculative"], body["usage"]

            async def settled():
                # queue depth too: a release runs on the worker thread, which frees the KV slot (read live
                # by kv_slots_in_use) a moment before the event loop decrements queue_depth; a scrape in
                # between saw kv 0, queue 1 once in CI. A gauge that never returns to 0 still fails here.
                m = await scrape(http, urls["verifier"])
                return m if total(m, "dspark_verifier_kv_slots_in_use") == 0 and \
                    total(m, "dspark_verifier_queue_depth") == 0 and \
                    total(m, "dspark_verifier_requests_total", status="ok") == 1 else None
            await wait_for(settled, timeout=10)
            after = {k: await scrape(http, u) for k, u in urls.items()}

        r0, r1 = before["router"], after["router"]
        assert delta(r0, r1, "dspark_router_requests_total", api="/v1/completions", status="200") == 1
        assert delta(r0, r1, "dspark_router_rounds_total") == spec["rounds"]
        assert delta(r0, r1, "dspark_router_draft_tokens_total") == spec["draft_tokens"]
        assert delta(r0, r1, "dspark_router_accepted_draft_tokens_total") == spec["accepted_draft_tokens"]
        assert delta(r0, r1, "dspark_router_time_to_first_token_seconds_count") == 1
        assert delta(r0, r1, "dspark_router_inter_token_latency_seconds_count") >= 1
        assert total(r1, "dspark_router_running") == 0

        v0, v1 = before["verifier"], after["verifier"]
        assert delta(v0, v1, "dspark_verifier_requests_total", status="ok") == 1
        assert delta(v0, v1, "dspark_verifier_requests_total") == 1
        assert delta(v0, v1, "dspark_verifier_rounds_total") == spec["rounds"]
        assert delta(v0, v1, "dspark_verifier_generated_tokens_total") == usage["completion_tokens"]
        assert delta(v0, v1, "dspark_verifier_time_to_first_token_seconds_count") == 1
        assert delta(v0, v1, "dspark_verifier_accepted_length_count") == spec["rounds"]
        assert delta(v0, v1, "dspark_verifier_accepted_length_sum") == usage["completion_tokens"] - 1  # prefill token
        assert delta(v0, v1, "dspark_verifier_draft_length_sum") == spec["draft_tokens"]
        assert delta(v0, v1, "dspark_verifier_verify_batch_tokens_sum") == spec["draft_tokens"] + spec["rounds"]
        # per position: exactly the response's proposed/accepted by position
        verified = by_position(v1, "dspark_verifier_draft_verified_tokens_total")
        accepted = by_position(v1, "dspark_verifier_draft_accepted_tokens_total")
        n = len(spec["proposed_by_position"])
        assert [verified.get(k, 0) for k in range(1, n + 1)] == spec["proposed_by_position"]
        assert [accepted.get(k, 0) for k in range(1, len(spec["accepted_by_position"]) + 1)] == \
            spec["accepted_by_position"]
        assert sum(verified.values()) == spec["draft_tokens"]
        assert sum(accepted.values()) == spec["accepted_draft_tokens"]
        proposed = by_position(v1, "dspark_verifier_draft_proposed_tokens_total")
        assert all(proposed.get(k, 0) >= verified[k] for k in verified)
        assert total(v1, "dspark_verifier_drafter_fallbacks_total") == spec["fallback_rounds"] == 0
        assert total(v1, "dspark_verifier_kv_slots_in_use") == 0
        assert total(v1, "dspark_verifier_sessions_running") == 0
        assert total(v1, "dspark_verifier_queue_depth") == 0

        d0, d1 = before["drafter"], after["drafter"]
        drafted = delta(d0, d1, "dspark_drafter_drafted_blocks_total")
        # one block per round that drafted (the last round may have no room left to draft)
        assert drafted == proposed[1] and spec["rounds"] - 1 <= drafted <= spec["rounds"]
        assert delta(d0, d1, "dspark_drafter_requests_total", status="ok") >= drafted
        assert delta(d0, d1, "dspark_drafter_batch_size_count") == drafted
        assert delta(d0, d1, "dspark_drafter_block_size_sum") >= spec["draft_tokens"]
        assert delta(d0, d1, "dspark_drafter_draft_seconds_count") == drafted
        assert total(d1, "dspark_drafter_queue_depth") == 0
        assert total(d1, "dspark_drafter_open_streams") == 1
    finally:
        await core.stop()
        await v.stop()
        await d.stop()
