"""The in-process lossless core: greedy identity, rollback, bad input (issue 2, must-show 1, 5, 6)."""

from __future__ import annotations

import pytest
import torch

from dspark_common.errors import InvalidRequest, NotFound, ResourceExhausted
from dspark_common.types import SamplingParams
from drafter_svc.loading import draft_engine
from tests.oracle_proposer import OracleProposer
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.scheduler import SpsTable
from verifier_svc.target_engine import TargetEngine

KINDS = ["llama", "qwen3", "deepseek_v4"]


def prompts(n: int, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab - 2, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine_for(target, drafter=None) -> TargetEngine:
    layers = drafter.config.target_layer_ids if drafter is not None else [0]
    return TargetEngine(target, feature_layer_ids=layers)


def baseline(target, prompt, max_new, stop=frozenset()) -> list[int]:
    loop = DecodeLoop(engine_for(target))
    return loop.generate(GenerationRequest(prompt, max_new, draft_length=0, stop_ids=stop)).token_ids


# A cost table where verifying more tokens is nearly free, so "auto" admits long blocks.
FLAT_SPS = SpsTable({1: 100.0, 16: 95.0})


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identity_dspark_drafter(kind):
    """A real (random) DSpark drafter: every draft length and the scheduler give the target's tokens."""
    target = tiny_target(kind)
    drafter = tiny_drafter(target)
    engine = engine_for(target, drafter)
    loop = DecodeLoop(engine, draft_engine(drafter), sps=FLAT_SPS)
    for prompt in prompts(3, seed=1):
        want = baseline(target, prompt, 20)
        for dl in [1, 2, 3, 4, 5, 6, 7, 8, "auto"]:
            got = loop.generate(GenerationRequest(prompt, 20, draft_length=dl))
            assert got.token_ids == want, (kind, dl)
        assert engine.num_sessions == 0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_identity_with_partial_acceptance(kind):
    """Drafts that are mostly right but corrupted on purpose: long accepted prefixes, frequent
    partial acceptance and rollback, stop tokens inside blocks — output still identical."""
    target = tiny_target(kind)
    engine = engine_for(target)
    oracle = OracleProposer(target, engine, block_size=8, corrupt=0.15)
    loop = DecodeLoop(engine, oracle, sps=FLAT_SPS)
    accepted = 0
    for prompt in prompts(4, seed=2):
        want = baseline(target, prompt, 24)
        stop = frozenset({want[10]})  # a stop token that appears mid-generation
        want_stop = baseline(target, prompt, 24, stop)
        for dl in [1, 3, 5, 8, "auto"]:
            got = loop.generate(GenerationRequest(prompt, 24, draft_length=dl))
            assert got.token_ids == want, (kind, dl)
            accepted += got.stats.accepted_draft_tokens
            got = loop.generate(GenerationRequest(prompt, 24, draft_length=dl, stop_ids=stop))
            assert got.token_ids == want_stop and got.finish_reason == "stop"
    assert accepted > 100  # the test really exercised acceptance


def test_stats_arithmetic():
    target = tiny_target("llama")
    engine = engine_for(target)
    oracle = OracleProposer(target, engine, block_size=4)
    loop = DecodeLoop(engine, oracle)
    r = loop.generate(GenerationRequest(prompts(1)[0], 21, draft_length=4))
    s = r.stats
    # Perfect drafts: the prefill gives token 1, then 4 rounds of 4 accepted + 1 bonus.
    assert (s.rounds, s.draft_tokens, s.accepted_draft_tokens, s.generated_tokens) == (4, 16, 16, 20)
    assert s.mean_accepted_length == 5.0
    assert s.to_dict()["accepted_by_position"] == [4, 4, 4, 4]
    assert len(r.token_ids) == 21


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_lengths_and_continuation(kind):
    """After a partial acceptance, both caches cover exactly the accepted tokens, and the next
    forward equals a fresh prefill of the same tokens."""
    target = tiny_target(kind)
    drafter = tiny_drafter(target)
    engine = engine_for(target, drafter)
    drafts = draft_engine(drafter)
    oracle = OracleProposer(target, engine, block_size=6)
    oracle.force_bad_at = 3
    loop = DecodeLoop(engine, oracle)
    s = loop.start(GenerationRequest(prompts(1, seed=3)[0], 40, draft_length=6))
    # Shadow the oracle's bookkeeping with the real drafter's cache to check its rollback too.
    drafts.open(s.session_id)
    drafts.append_context(s.session_id, engine.extend("__probe__", []) if False else
                          _features(engine, engine.tokens(s.session_id)), 0)
    for _ in range(3):
        before = s.anchor_pos
        (r,) = loop.round([s])
        assert r.accepted == 3 and r.scheduled == 6
        assert engine.length(s.session_id) == before + 4 == s.anchor_pos
        assert oracle.context_length(s.session_id) == s.anchor_pos
        drafts.append_context(s.session_id, _features(engine, engine.tokens(s.session_id))[before:], before)
        assert drafts.context_length(s.session_id) == s.anchor_pos
    # Continue: the cached session vs a fresh prefill of the same committed tokens.
    history = engine.tokens(s.session_id)
    cont = engine.extend(s.session_id, [s.anchor]).logits[-1]
    engine.open("fresh")
    fresh = engine.extend("fresh", history + [s.anchor]).logits[-1]
    torch.testing.assert_close(cont, fresh, atol=1e-4, rtol=1e-4)
    # The drafter's rolled-back cache proposes exactly what a freshly built one does.
    drafts.truncate(s.session_id, s.anchor_pos - 2)
    drafts.append_context(s.session_id, _features(engine, history)[s.anchor_pos - 2:], s.anchor_pos - 2)
    drafts.open("fresh")
    drafts.append_context("fresh", _features(engine, history), 0)
    from dspark_common.types import DraftRequest
    a, b = drafts.propose([DraftRequest(sid, s.anchor, s.anchor_pos, 6, SamplingParams()) for sid in (s.session_id, "fresh")])
    assert a.tokens.tolist() == b.tokens.tolist()
    torch.testing.assert_close(a.confidences, b.confidences)
    loop.release(s)


def _features(engine: TargetEngine, tokens: list[int]) -> torch.Tensor:
    """Context features of `tokens` from a throwaway session."""
    engine.open("__feat__")
    try:
        return engine.extend("__feat__", tokens).features
    finally:
        engine.release("__feat__")


def test_bad_input_is_typed_and_engine_stays_usable():
    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    engine = TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids, max_context=64, max_sessions=2)
    loop = DecodeLoop(engine, draft_engine(drafter))
    ok = [5, 6, 7]
    cases = [
        (dict(prompt_ids=[]), "prompt"),
        (dict(prompt_ids=[1, 999]), "prompt"),
        (dict(prompt_ids=[-1]), "prompt"),
        (dict(prompt_ids=list(range(64))), "prompt"),
        (dict(prompt_ids=ok, draft_length=17), "draft_length"),
        (dict(prompt_ids=ok, draft_length=-1), "draft_length"),
        (dict(prompt_ids=ok, draft_length="fast"), "draft_length"),
        (dict(prompt_ids=ok, sampling=SamplingParams(temperature=-0.5)), "temperature"),
        (dict(prompt_ids=ok, sampling=SamplingParams(temperature=1.0, top_p=0.0)), "top_p"),
        (dict(prompt_ids=ok, sampling=SamplingParams(temperature=1.0, top_p=1.5)), "top_p"),
        (dict(prompt_ids=ok, sampling=SamplingParams(temperature=1.0, top_k=-1)), "top_k"),
        (dict(prompt_ids=ok, max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_ids=ok, max_new_tokens=-3), "max_new_tokens"),
    ]
    for kw, field in cases:
        with pytest.raises(InvalidRequest) as e:
            loop.generate(GenerationRequest(**kw))
        assert e.value.field == field, kw
        assert engine.num_sessions == 0
    with pytest.raises(NotFound):
        engine.extend("nope", [1])
    # Context window: a generation runs up to the window and stops there, no error.
    r = loop.generate(GenerationRequest(list(range(60)), 50, draft_length=4))
    assert r.finish_reason == "length" and len(r.token_ids) == 5  # positions 60..64
    base = DecodeLoop(TargetEngine(target, feature_layer_ids=[0], max_context=64))
    assert r.token_ids == base.generate(GenerationRequest(list(range(60)), 50, draft_length=0)).token_ids
    # Session limit.
    engine.open("a"), engine.open("b")
    with pytest.raises(ResourceExhausted):
        loop.generate(GenerationRequest(ok, 4))
    engine.release("a"), engine.release("b")
    assert loop.generate(GenerationRequest(ok, 4)).token_ids == baseline(target, ok, 4)


def test_learned_round_overhead_is_measured_then_frozen():
    """round_overhead_s=None: the loop learns what a round costs besides the forward over its first
    drafted rounds, then keeps that figure, so a seeded request schedules alike whenever it runs."""
    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    loop = DecodeLoop(engine_for(target, drafter), draft_engine(drafter), sps=FLAT_SPS, round_overhead_s=None)
    assert loop.round_overhead_s == 0.0
    first = loop.generate(GenerationRequest(prompts(1, seed=4)[0], 40, draft_length=3))
    assert sum(1 for r in first.rounds if r.proposed) >= DecodeLoop.OVERHEAD_ROUNDS
    learned = loop.round_overhead_s
    assert learned > 0.0
    loop.generate(GenerationRequest(prompts(1, seed=5)[0], 20, draft_length=3))
    assert loop.round_overhead_s == learned
    # A given figure is never replaced.
    fixed = DecodeLoop(engine_for(target, drafter), draft_engine(drafter), sps=FLAT_SPS, round_overhead_s=0.25)
    fixed.generate(GenerationRequest(prompts(1, seed=4)[0], 20, draft_length=3))
    assert fixed.round_overhead_s == 0.25


def test_profiled_sps_never_rises_with_more_tokens():
    from verifier_svc.sps_profile import profile_sps

    target = tiny_target("qwen3")
    table = profile_sps(engine_for(target), max_tokens=8, prefix=16, repeats=3).to_dict()
    values = [table[k] for k in sorted(table)]
    assert sorted(table) == list(range(1, 9))
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cost_curve_fit_pools_noise_instead_of_carrying_it_forward():
    from verifier_svc.sps_profile import non_decreasing

    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    # a slow outlier at k=3 is averaged with the dips after it, not copied to every later size
    assert non_decreasing([48.0, 52.0, 65.0, 55.0, 57.0, 70.0]) == pytest.approx([48, 52, 59, 59, 59, 70])
    assert non_decreasing([5.0, 4.0, 3.0]) == pytest.approx([4.0, 4.0, 4.0])


def test_sps_timings_take_the_lower_quartile() -> None:
    from verifier_svc.sps_profile import lower_quartile

    # a slow spell lifts 5 of 9 timings of one size: the median (0.118) follows it, the quartile does not
    assert lower_quartile([0.080, 0.120, 0.079, 0.125, 0.119, 0.082, 0.130, 0.118, 0.081]) == pytest.approx(0.081)
    assert lower_quartile([0.05]) == 0.05
    assert lower_quartile([3.0, 1.0, 2.0, 4.0, 5.0]) == 2.0
