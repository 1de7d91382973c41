"""Draft-length control: the controller raises the draft length for a session whose drafts are
mostly accepted and lowers it (to 0) for one whose drafts are mostly rejected — as a pure unit,
and end to end through the router with a drafter service whose drafts are made right or wrong on
purpose (the router sends DraftLength messages only when the length changes)."""

from __future__ import annotations

import random

import pytest
from openai import AsyncOpenAI

from router.controller import ControllerConfig, CostModel, DraftLengthController, expected_tokens, parse_sps_table
from tests.router_stack import (
    MODEL_NAME,
    OracleDrafterService,
    models,
    router_tokenizer,
    start_router,
    target_only,
)
from tests.service_stack import start_drafter, start_verifier


def controller(**kw) -> DraftLengthController:
    return DraftLengthController(ControllerConfig(**kw), CostModel.linear(0.05))


def simulate(ctl: DraftLengthController, accept_p: float, rounds: int, seed: int = 0, block: int = 8) -> list[int]:
    """Rounds against a drafter whose every position is accepted with probability accept_p."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(rounds):
        k = min(ctl.length, block)
        accepted = 0
        while accepted < k and rng.random() < accept_p:
            accepted += 1
        ctl.note_block(ctl.length, k, remaining=1000)
        ctl.observe(scheduled=k, accepted=accepted)
        lengths.append(ctl.length)
    return lengths


def test_expected_tokens():
    assert expected_tokens([1.0] * 16, 4) == 5.0
    assert expected_tokens([0.5] * 16, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([0.0] * 16, 8) == 1.0


def test_prior_gives_a_moderate_start():
    ctl = controller()
    assert 2 <= ctl.length <= 8


def test_mostly_accepted_raises_to_the_block():
    ctl = controller()
    start = ctl.length
    lengths = simulate(ctl, 0.97, 60)
    assert lengths[-1] > start and lengths[-1] == 8  # capped by the drafter's block once seen
    assert min(lengths) >= start  # it never went down
    assert ctl.block_cap == 8


def test_mostly_rejected_lowers_to_zero_and_probes_rarely():
    ctl = controller()
    lengths = simulate(ctl, 0.03, 400)
    assert lengths[-1] <= 1
    assert sum(k == 0 for k in lengths[50:]) / len(lengths[50:]) > 0.8  # speculation off nearly always


def test_follows_a_drifting_session():
    ctl = controller()
    simulate(ctl, 0.97, 60)
    high = ctl.length
    simulate(ctl, 0.1, 200, seed=1)
    assert ctl.length < high and ctl.length <= 1


def test_expensive_verification_prefers_shorter_drafts():
    cheap = DraftLengthController(ControllerConfig(), CostModel.linear(0.01))
    dear = DraftLengthController(ControllerConfig(), CostModel.linear(0.5))
    for c in (cheap, dear):
        simulate(c, 0.8, 100)
    assert dear.length < cheap.length


def test_sps_table_cost_model():
    cost = CostModel.from_sps(parse_sps_table("1:100,4:95,9:85"))
    assert cost(1) == 1.0 and cost(9) == pytest.approx(100 / 85)
    assert parse_sps_table("1:100, 2:90") == {1: 100.0, 2: 90.0}


def test_measured_round_overhead_replaces_the_configured_draft_cost():
    # T(b)/T(1) = 1, 1.04, 1.13, 1.19, 1.41, 1.53 and α = 0.3 everywhere. With the configured draft
    # cost (0.1 forward) one draft looks worth it: 1.3 / (1.04 + 0.1 + 0.01) = 1.13 > 1. A measured
    # 8 ms round overhead on a 26 ms forward (0.31 forward) says it is not: 1.3 / 1.36 = 0.96 < 1.
    t1 = 0.026
    sps = {b: 1 / (t1 * r) for b, r in zip(range(1, 7), (1, 1.04, 1.13, 1.19, 1.41, 1.53))}
    alpha = [0.3] * 5
    configured = DraftLengthController(ControllerConfig(max_draft_length=5), CostModel.from_sps(sps), alpha)
    measured = DraftLengthController(ControllerConfig(max_draft_length=5), CostModel.from_sps(sps, 0.008), alpha)
    assert configured.cost.round_overhead is None and measured.cost.round_overhead == pytest.approx(0.008 / t1)
    assert measured.round_time(3) == pytest.approx(1.19 + 0.008 / t1 + 0.01 * 3)
    assert measured.round_time(0) == 1.0
    assert configured.best() == 1 and measured.best() == 0


def test_state_round_trips():
    ctl = controller()
    simulate(ctl, 0.9, 30)
    again = DraftLengthController.from_state(ctl.config, ctl.cost, ctl.state())
    assert again.length == ctl.length and again.alpha == pytest.approx(ctl.alpha, abs=1e-5)


async def test_router_adapts_draft_length_per_session(monkeypatch):
    target, drafter = models()
    monkeypatch.setattr("drafter_svc.server.DrafterService", OracleDrafterService)
    tok = router_tokenizer()
    prompts = {"good-1": "the good session", "bad-1": "the bad session"}
    max_new = 128
    plans = {}
    for sid, text in prompts.items():
        ids = tok.encode(text)
        plans[sid] = ("good" if sid.startswith("good") else "bad", ids + target_only(target, ids, max_new))
    monkeypatch.setattr(OracleDrafterService, "plans", plans)
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address])
    core = await start_router(tok, [v.address])
    client = AsyncOpenAI(base_url=core.url + "/v1", api_key="none")
    try:
        spec = {}
        for sid, text in prompts.items():
            r = await client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=max_new, temperature=0,
                                                extra_body={"session_id": sid})
            assert r.choices[0].text == tok.decode(plans[sid][1][len(tok.encode(text)):])  # lossless either way
            spec[sid] = r.model_extra["speculative"]
        start = DraftLengthController(core.generations.controller_config, CostModel.linear(0.05)).length
        good, bad = spec["good-1"], spec["bad-1"]
        assert good["draft_length"] >= 8 > start  # raised to (or probing past) the drafter's block
        print(good, bad)
        assert good["accepted_draft_tokens"] == good["draft_tokens"] > 0
        assert bad["draft_length"] == 0 and bad["accepted_draft_tokens"] == 0
        assert bad["rounds"] > good["rounds"] * 3
        assert 0 < core.metrics.draft_length_changes._value.get() < 30  # only on change
    finally:
        await client.close()
        await core.stop()
        await v.stop()
        await d.stop()


async def test_copied_rounds_do_not_steer_the_controller(monkeypatch):
    """With n-gram lookup on, copied rounds come back shorter (a copy ends where the sequence does)
    or longer than the session's k: neither may be read as the drafter's block size or its
    acceptance. A drafter that is always right must still be raised toward its full block."""
    target, drafter = models()
    monkeypatch.setattr("drafter_svc.server.DrafterService", OracleDrafterService)
    tok = router_tokenizer()
    text = "the good session"
    ids = tok.encode(text)
    monkeypatch.setattr(OracleDrafterService, "plans", {"good-2": ("good", ids + target_only(target, ids, 128))})
    d = await start_drafter(drafter)
    v = await start_verifier(target, [d.address], ngram_lookup=True)
    core = await start_router(tok, [v.address])
    client = AsyncOpenAI(base_url=core.url + "/v1", api_key="none")
    try:
        r = await client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=128, temperature=0,
                                            extra_body={"session_id": "good-2"})
        assert r.choices[0].text == tok.decode(target_only(target, ids, 128))
        spec = r.model_extra["speculative"]
        assert spec["lookup_rounds"] > 0  # copies were in play
        # ... and the controller kept climbing from the drafter's rounds alone (4 here, all right):
        # read as block sizes, the copies (4 tokens long in this loop) would have capped it at 4
        assert spec["draft_length"] >= 6
    finally:
        await client.close()
        await core.stop()
        await v.stop()
        await d.stop()
