"""The benchmark harness: its arithmetic against hand-computed values (percentiles, τ, conditional
acceptance, per-request timings, speedup), the SSE client against a canned stream with a scripted
clock, the document merge, the in-process baselines on a tiny model, and one small end-to-end run of
`dspark bench` against a real router + verifier + drafter around tiny models. No speed is
asserted: speed claims come from `bench/run_report.sh`, not from tests."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from bench import metrics
from bench.metrics import (
    add_speedups,
    conditional_acceptance,
    distribution,
    generated_in_rounds,
    paired_speedup,
    percentile,
    request_figures,
    run_figures,
    sum_speculative,
    tau,
)
from dspark_common.types import RoundStats, SpeculativeStats

# ---------------------------------------------------------------------------- arithmetic


def test_percentile_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4; rank position (n-1) q/100 = 3q/100
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 95) == pytest.approx(3.85)  # 3 + 0.85 * (4 - 3)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([10.0, 20.0, 40.0], 75) == pytest.approx(30.0)  # pos 1.5 -> 20 + 0.5 * 20
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)
    d = distribution([1, 2, 3, 4, None])
    assert d == {"n": 4, "mean": 2.5, "p50": 2.5, "p95": pytest.approx(3.85), "p99": pytest.approx(3.97)}


def _stats(rounds: list[tuple[int, int, int]]) -> dict:
    """SpeculativeStats.to_dict() of (scheduled, accepted, committed tokens) rounds."""
    s = SpeculativeStats()
    for scheduled, accepted, committed in rounds:
        s.add(RoundStats(proposed=scheduled, scheduled=scheduled, accepted=accepted, tokens=[0] * committed), committed)
    return s.to_dict()


def test_tau_and_conditional_acceptance_fixed_block():
    # Draft length 3 every round; accepted 3, 1, 0, 2 -> committed 4, 2, 1, 3 tokens in 4 rounds.
    spec = _stats([(3, 3, 4), (3, 1, 2), (3, 0, 1), (3, 2, 3)])
    assert spec["accepted_by_position"] == [3, 2, 1] and spec["proposed_by_position"] == [4, 4, 4]
    assert generated_in_rounds(spec) == 10
    assert tau(10, 4) == 2.5
    # P(pos1) = 3/4; P(pos2 | pos1) = 2/3; P(pos3 | pos1, pos2) = 1/2
    assert conditional_acceptance(spec["accepted_by_position"], spec["proposed_by_position"]) == [
        pytest.approx(0.75), pytest.approx(2 / 3), pytest.approx(0.5)]


def test_conditional_acceptance_when_blocks_are_cut():
    # The scheduler verified 1, 1, 3 drafts; all of the first two were accepted, 2 of the third.
    spec = _stats([(1, 1, 2), (1, 1, 2), (3, 2, 3)])
    assert spec["accepted_by_position"] == [3, 1, 0] and spec["proposed_by_position"] == [3, 1, 1]
    # position 2 was reached (verified with position 1 accepted) only in round 3, where it was
    # accepted: 1/1, not 1/3; position 3 was reached once and rejected.
    assert conditional_acceptance(spec["accepted_by_position"], spec["proposed_by_position"]) == [1.0, 1.0, 0.0]
    assert conditional_acceptance([0, 0], [2, 2]) == [0.0, None]  # never reached
    assert conditional_acceptance([], []) == []


def test_sum_speculative_pads_and_adds():
    a = _stats([(2, 2, 3), (2, 0, 1)])
    b = _stats([(4, 3, 4)])
    tot = sum_speculative([a, b, {}])
    assert tot["rounds"] == 3 and tot["generated_tokens"] == 8
    assert tot["draft_tokens"] == 8 and tot["accepted_draft_tokens"] == 5
    assert tot["accepted_by_position"] == [2, 2, 1, 0]
    assert tot["proposed_by_position"] == [3, 3, 1, 1]
    # τ over requests is Σ generated / Σ rounds (8/3), not the mean of per-request τ (1.5 and 4)
    assert tau(tot["generated_tokens"], tot["rounds"]) == pytest.approx(8 / 3)
    zero = _stats([(0, 0, 1)] * 5)
    assert tau(generated_in_rounds(zero), zero["rounds"]) == 1.0


def test_request_figures_by_hand():
    f = request_figures(sent=10.0, content_times=[10.1, 10.2, 10.45], end=10.5, completion_tokens=5)
    assert f["ttft_ms"] == pytest.approx(100.0)
    assert f["latency_s"] == pytest.approx(0.5)
    assert f["decode_s"] == pytest.approx(0.4)
    assert f["decode_tokens_per_s"] == pytest.approx(10.0)  # 4 tokens after the first in 0.4 s
    assert f["tpot_ms"] == pytest.approx(100.0)
    assert f["itl_ms"] == [pytest.approx(100.0), pytest.approx(250.0)]
    one = request_figures(sent=0.0, content_times=[0.2], end=0.2, completion_tokens=1)
    assert one["decode_tokens_per_s"] is None and one["tpot_ms"] is None and one["itl_ms"] == []


def _req(i, rate, ttft, itl, tokens, spec, ok=True):
    return {"prompt_index": i, "ok": ok, "decode_tokens_per_s": rate, "ttft_ms": ttft, "itl_ms": itl,
            "tpot_ms": 1000 / rate if rate else None, "completion_tokens": tokens, "prompt_tokens": 7,
            "speculative": spec}


def test_run_figures_and_speedup():
    spec = _stats([(3, 3, 4), (3, 1, 2)])
    reqs = [_req(0, 10.0, 100.0, [50.0, 70.0], 7, spec), _req(1, 30.0, 300.0, [10.0], 7, spec),
            _req(2, 20.0, 200.0, [], 7, spec), _req(3, None, None, [], 0, {}, ok=False)]
    m = run_figures(reqs, wall_s=2.0)
    assert m["requests"] == 4 and m["errors"] == 1
    assert m["completion_tokens"] == 21 and m["aggregate_tokens_per_s"] == 10.5
    assert m["decode_tokens_per_s"] == 20.0  # median of 10, 30, 20
    assert m["ttft_ms"]["p50"] == 200.0 and m["ttft_ms"]["n"] == 3
    assert m["itl_ms"]["n"] == 3 and m["itl_ms"]["p50"] == 50.0
    assert m["rounds"] == 6 and m["generated_in_rounds"] == 18 and m["tau"] == 3.0
    assert m["acceptance_by_position"] == [1.0, 0.5, 1.0]
    assert m["draft_acceptance_rate"] == pytest.approx(12 / 18)

    def run(name, source, family, dl, rate, ref, c=1):
        return {"name": name, "source": source, "family": family, "dataset": "d", "temperature": 0.0,
                "concurrency": c, "max_new_tokens": 8, "draft_length": dl, "reference": ref,
                "metrics": {"decode_tokens_per_s": rate}}

    runs = [run("a0", "http", "http", 0, 8.0, True), run("aA", "http", "http", "auto", 14.0, False),
            run("a4", "http", "http", 4, 12.0, False), run("b0", "http", "http", 0, 5.0, True, c=4),
            run("b4", "http", "http", 4, 7.5, False, c=4), run("pl", "prompt-lookup", "hf", 0, 9.0, False),
            run("hf", "hf", "hf", 0, 6.0, True), run("x", "inprocess", "inprocess", "auto", 3.0, False)]
    add_speedups(runs)
    got = {r["name"]: r["metrics"]["speedup"] for r in runs}
    assert got == {"a0": 1.0, "aA": 1.75, "a4": 1.5, "b0": 1.0, "b4": 1.5, "pl": 1.5, "hf": 1.0, "x": None}
    assert runs[1]["reference_run"] == "a0" and runs[4]["reference_run"] == "b0"


def test_paired_speedup_is_the_median_of_per_prompt_ratios():
    def reqs(rates):
        return [{"prompt_index": i, "ok": r is not None, "decode_tokens_per_s": r} for i, r in enumerate(rates)]

    ref = {"requests": reqs([10.0, 20.0, 40.0, 5.0])}
    run = {"requests": reqs([15.0, 20.0, 100.0, None])}  # ratios 1.5, 1.0, 2.5; prompt 3 failed
    assert paired_speedup(run, ref) == 1.5
    assert paired_speedup(ref, ref) == 1.0


def test_update_doc_keeps_the_rest(tmp_path):
    from bench.report import BEGIN, END, update_doc

    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\n## Target profile\n\nforward 12 ms\n")
    update_doc(doc, "first table")
    update_doc(doc, "second table")
    text = doc.read_text()
    assert "## Target profile\n\nforward 12 ms" in text
    assert "second table" in text and "first table" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1


# ---------------------------------------------------------------------------- the SSE client


async def test_stream_client_times_a_canned_stream():
    from aiohttp import web

    from bench.http_client import ChatRequest, stream_chat

    seen = {}

    def chunk(content=None, finish=None, **extra):
        delta = {} if content is None else {"content": content}
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    spec = {"rounds": 2, "draft_tokens": 6, "accepted_draft_tokens": 2, "mean_accepted_length": 2.0,
            "accepted_by_position": [1, 1, 0], "proposed_by_position": [2, 2, 2]}
    events = [chunk(""), chunk("Hel"), chunk("lo, "), chunk("world"),
              chunk(None, "length", usage={"prompt_tokens": 9, "completion_tokens": 5}, speculative=spec)]

    async def handler(request):
        seen.update(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(f"data: {json.dumps(e)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    ticks = iter([100.0, 100.5, 100.6, 100.8, 101.0, 101.1, 101.2])  # sent, then one per data line
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            rec = await stream_chat(session, url, ChatRequest(3, "hi", 5, 0.0, "auto"), clock=lambda: next(ticks))
    finally:
        await runner.cleanup()
    assert seen["stream"] is True and seen["temperature"] == 0.0 and seen["speculative"] == {"draft_length": "auto"}
    assert "seed" not in seen and seen["messages"] == [{"role": "user", "content": "hi"}]
    assert rec.ok and rec.text == "Hello, world" and rec.finish_reason == "length"
    assert rec.content_times == [100.6, 100.8, 101.0] and rec.end == 101.1
    f = rec.figures()
    assert f["completion_tokens"] == 5 and f["round_tokens"] == 4 and f["chunks"] == 3
    assert f["ttft_ms"] == pytest.approx(600.0)
    assert f["decode_tokens_per_s"] == pytest.approx(4 / 0.5)
    assert f["itl_ms"] == [pytest.approx(200.0), pytest.approx(200.0)]


# ---------------------------------------------------------------------------- baselines (tiny model)


def test_baselines_on_a_tiny_model():
    from bench.baselines import baseline_runs
    from tests.router_stack import IM_END, models
    from verifier_svc.decode_loop import DecodeLoop
    from verifier_svc.scheduler import SpsTable
    from verifier_svc.target_engine import TargetEngine
    from drafter_svc.loading import draft_engine

    target, drafter = models()
    loop = DecodeLoop(TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids), draft_engine(drafter),
                      sps=SpsTable({1: 100.0, 4: 95.0, 9: 85.0}))
    prompts = {"tiny": [[72, 105, 33, 10, 1, 2, 3, 1, 2, 3], [5, 6, 7, 8, 5, 6, 7]]}
    runs = baseline_runs(["hf", "prompt-lookup", "inprocess"], prompts, temperatures=[0.0], max_new_tokens=8,
                         draft_lengths=[0, "auto"], seed=0, hf_model=target, loop=loop, stop_ids=frozenset({IM_END}),
                         pad_id=257, prompt_lookup_tokens=3, text_of=lambda ids: " ".join(map(str, ids)))
    add_speedups(runs)
    metrics.identical_outputs(runs)
    by = {r["label"]: r for r in runs}
    assert set(by) == {"generate", "pl=3", "dl=0", "dl=auto"}
    for r in runs:
        m = r["metrics"]
        assert m["requests"] == 2 and m["errors"] == 0
        for q in r["requests"]:
            assert q["completion_tokens"] == 8  # a random tiny model does not stop this early
            assert q["decode_tokens_per_s"] > 0 and q["ttft_ms"] > 0
            # the prefill emits one token and every later step is a round; prompt lookup's first
            # forward may verify candidates too, so its first step can emit more
            counted = generated_in_rounds(q["speculative"]) + 1
            assert counted <= q["completion_tokens"] if r["source"] == "prompt-lookup" else (
                counted == q["completion_tokens"])
    assert by["generate"]["metrics"]["tau"] == 1.0 and by["dl=0"]["metrics"]["tau"] == 1.0
    assert by["generate"]["metrics"]["speedup"] == 1.0 and by["dl=0"]["metrics"]["speedup"] == 1.0
    assert by["pl=3"]["reference_run"] == by["generate"]["name"]
    assert by["dl=auto"]["metrics"]["proposed_by_position"]  # the drafter proposed
    # greedy: every method gives transformers' own greedy output
    want = [q["text_sha1"] for q in by["generate"]["requests"]]
    for r in runs:
        assert [q["text_sha1"] for q in r["requests"]] == want, r["name"]
        assert r["metrics"]["identical_to_reference"] == 1.0


# ---------------------------------------------------------------------------- end to end over HTTP


class _TinyStack:
    """Drafter + verifier + router around tiny models, served from a background event loop so the
    test can call the synchronous `dspark bench` entry point against it."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        from tests.router_stack import models, router_tokenizer, start_router
        from tests.service_stack import start_drafter, start_verifier

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        servers = []
        try:
            target, drafter = models()
            d = await start_drafter(drafter)
            servers.append(d)
            v = await start_verifier(target, [d.address])
            servers.append(v)
            r = await start_router(router_tokenizer(), [v.address], grpc_port=-1)
            servers.append(r)
            self.url = r.url
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for s in reversed(servers):
                await s.stop()

    def __enter__(self) -> str:
        self._thread.start()
        assert self._ready.wait(120), "the tiny stack did not start"
        if self.error is not None:
            raise self.error
        return self.url

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def test_bench_end_to_end_against_a_tiny_stack(tmp_path, capsys):
    from dspark_common.cli import main

    data = tmp_path / "tiny-tail2.jsonl"
    data.write_text("\n".join(json.dumps({"turns": [t, "second turn, unused"]})
                              for t in ["Say hi.", "Count to three.", "Not sent: past --limit."]) + "\n")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"turns": ["Write a haiku."]}) + "\n")
    out = tmp_path / "out"
    with _TinyStack() as url:
        rc = main(["bench", "--url", url, "--dataset", str(data), str(other), "--limit", "2",
                   "--max-new-tokens", "8", "--concurrency", "1,2", "--temperature", "0,1",
                   "--draft-length", "auto,3", "--out", str(out), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("| http |") == len(results["runs"])
    assert sorted(results["figures"]) == ["acceptance_by_position.png", "speedup_by_dataset.png",
                                          "throughput_vs_concurrency.png"]
    for name in results["figures"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert results["machine"]["nproc"] >= 1 and results["machine"]["torch"]
    assert results["settings"]["draft_lengths"] == [0, "auto", 3]  # 0 added: the speedup reference
    runs = results["runs"]
    # 2 datasets x 2 temperatures x 2 concurrencies x 3 draft lengths, in that nesting
    assert len(runs) == 24 and len({r["name"] for r in runs}) == 24
    assert [r["draft_length"] for r in runs[:3]] == [0, "auto", 3]
    prompts = {"tiny": 2, "other": 1}
    for r in runs:
        m, reqs = r["metrics"], r["requests"]
        assert m["errors"] == 0 and m["requests"] == prompts[r["dataset"]] == len(reqs)
        assert [q["prompt_index"] for q in reqs] == list(range(len(reqs)))  # same prompts in every run
        for q in reqs:
            assert q["ok"] and q["finish_reason"] in ("length", "stop")
            assert 1 <= q["completion_tokens"] <= 8
            assert q["completion_tokens"] == 8 or q["finish_reason"] == "stop"
            # tokens counted by the rounds + the prefill's first token == usage.completion_tokens
            assert q["round_tokens"] + 1 == q["completion_tokens"]
            assert q["ttft_ms"] > 0 and q["latency_s"] * 1e3 >= q["ttft_ms"]
            assert 1 <= q["chunks"] <= q["completion_tokens"]
            assert len(q["itl_ms"]) == q["chunks"] - 1
        assert m["completion_tokens"] == sum(q["completion_tokens"] for q in reqs)
        assert m["generated_in_rounds"] + len(reqs) == m["completion_tokens"]
        assert m["aggregate_tokens_per_s"] == pytest.approx(m["completion_tokens"] / m["wall_s"])
        assert m["fallback_rounds"] == 0
        assert r.get("interleaved", False) == (r["concurrency"] == 1)  # c=1: draft lengths alternate per prompt
        if r["draft_length"] == 0:
            assert r["reference"] and m["speedup"] == 1.0 and m["paired_speedup"] == 1.0 and m["tau"] == 1.0
            assert m["draft_tokens"] == 0 and m["proposed_by_position"] == []
        else:
            ref = next(x for x in runs if x["name"] == r["reference_run"])
            assert ref["draft_length"] == 0 and ref["dataset"] == r["dataset"]
            assert ref["temperature"] == r["temperature"] and ref["concurrency"] == r["concurrency"]
            assert m["speedup"] == pytest.approx(m["decode_tokens_per_s"] / ref["metrics"]["decode_tokens_per_s"])
            if r["temperature"] == 0:  # every round commits its accepted drafts + 1 (no stop drawn)
                assert m["tau"] == pytest.approx(1 + m["accepted_draft_tokens"] / m["rounds"])
            assert m["draft_tokens"] > 0 and len(m["acceptance_by_position"]) == len(m["proposed_by_position"])
            assert max(len(q["speculative"]["proposed_by_position"]) for q in reqs) <= (3 if r["draft_length"] == 3
                                                                                        else 8)
            assert all(a is None or 0 <= a <= 1 for a in m["acceptance_by_position"])
        if r["temperature"] == 0:  # greedy output does not depend on the draft length
            assert m["identical_to_reference"] == 1.0
        else:
            assert m["identical_to_reference"] is None
    assert "| http | tiny | 0 | 1 | dl=0 |" in capsys.readouterr().out  # the table is printed


def test_drafter_profile_times_every_block_size_and_its_parts():
    import torch

    from bench.drafter_profile import profile
    from drafter_svc.draft_engine import DraftEngine
    from tests.tiny_models import tiny_drafter, tiny_target

    drafter = tiny_drafter(tiny_target("llama"), block_size=4)
    drafter.draft_vocab = torch.arange(0, drafter.config.vocab_size, 2)
    for use in (False, True):
        engine = DraftEngine(drafter, drafter.config, use_draft_vocab=use)
        out = profile(engine, context=12, repeats=2)
        assert sorted(out["propose"]) == [1, 2, 3, 4] and all(v > 0 for v in out["propose"].values())
        assert set(out["parts_at_full_block"]) == {"backbone", "base_logits", "markov_bias_per_slot"}
        assert engine.stats()["sessions"] == 0  # the profile session is released
