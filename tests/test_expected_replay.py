"""The expected-rounds replay for T > 0 (`dspark eval --replay --temperature T`)."""

from __future__ import annotations

import random

import pytest
import torch

from drafter_svc.train.evaluate import summarize
from drafter_svc.train.expected_replay import expected_walk, summarize_walks
from drafter_svc.train.replay import replay_rounds


def _random_path(rng: random.Random, n: int, stop: int | None) -> list[int]:
    tokens = [rng.randrange(3, 9) for _ in range(n)]
    if stop is not None:
        tokens[-1] = stop
    return tokens


@pytest.mark.parametrize("stop,budget", [(None, 40), (2, 40), (2, 25), (None, 12)])
def test_walk_with_certain_outcomes_is_the_greedy_replay(stop, budget):
    """a ∈ {0, 1} (a greedy draft either is the path's token or not) must give replay_rounds' rounds."""
    rng = random.Random(5)
    stops = {2}
    for trial in range(30):
        # a complete path: it ends at a stop token or at the budget
        tokens = _random_path(rng, min(budget, 20 + trial % 7) if stop is not None else budget, stop)
        block = 5
        drafts = [[t if rng.random() < 0.7 else 0 for t in tokens[i + 1 : i + 1 + block]] + [0] * block
                  for i in range(len(tokens))]
        accept = [[float(i + 1 + j < len(tokens) and drafts[i][j] == tokens[i + 1 + j]) for j in range(block)]
                for i in range(len(tokens) - 1)]
        want = summarize(replay_rounds(drafts, tokens, blocks=[block] * len(tokens), max_new_tokens=budget,
                                       stop_ids=stops), block)
        got = summarize_walks([expected_walk(accept, tokens, block_size=block, max_new_tokens=budget, stop_ids=stops)],
                              block)
        assert got["rounds"] == want["rounds"]
        for k in ("tau", "tau_uncapped", "mean_proposed"):
            assert got[k] == pytest.approx(want[k])
        assert got["conditional_acceptance"] == pytest.approx(want["conditional_acceptance"])


def test_walk_is_the_mean_of_simulated_rounds():
    """With fractional acceptances the walk's expected rounds and tokens are what many simulated walks average."""
    rng = random.Random(11)
    tokens = _random_path(rng, 40, 2)
    block, budget = 6, 64
    accept = [[rng.random() for _ in range(block)] for _ in range(len(tokens) - 1)]
    walk = expected_walk(accept, tokens, block_size=block, max_new_tokens=budget, stop_ids={2})
    sims, rounds, committed = 20000, 0, 0
    for _ in range(sims):
        i = 0
        while i < len(tokens) and tokens[i] != 2:
            n = min(block, len(tokens) - 1 - i)
            m = 0
            while m < n and rng.random() < accept[i][m]:
                m += 1
            rounds += 1
            if i + 1 + m >= len(tokens):  # accepted through the stop token: no bonus
                committed += m
                break
            committed += m + 1
            i += m + 1
    assert walk.rounds == pytest.approx(rounds / sims, rel=0.01)
    assert walk.committed == pytest.approx(committed / sims, rel=0.01)


def test_near_greedy_sampling_reproduces_the_greedy_replay():
    """At a temperature near 0 the sampled path is the greedy one and every acceptance is 0 or 1, so the
    expected replay must count the rounds the greedy replay (checked against DecodeLoop) counts."""
    from drafter_svc.train.expected_replay import acceptance_probabilities, sampled_paths
    from drafter_svc.train.replay import greedy_paths, replay_path
    from dspark_common.types import SamplingParams
    from tests.tiny_models import tiny_drafter, tiny_target

    target = tiny_target()
    drafter = tiny_drafter(target, block_size=6)
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31], [3, 4]]
    layers = drafter.config.target_layer_ids
    greedy = greedy_paths(target, prompts, max_new_tokens=30, stop_ids=[], layer_ids=layers, batch_size=2)
    flat = [t for p in greedy for t in p.tokens]
    favourite = max(set(flat), key=flat.count)
    with torch.no_grad():  # propose the path's most frequent token: rounds accept 0..5 drafts
        drafter.markov_head.markov_w1.weight.fill_(1.0)
        drafter.markov_head.markov_w2.weight.zero_()
        drafter.markov_head.markov_w2.weight[favourite] = 50.0
    sampling = SamplingParams(temperature=1e-3)
    sampled = sampled_paths(target, prompts, sampling=sampling, seed=3, max_new_tokens=30, stop_ids=[],
                            layer_ids=layers, batch_size=2)
    accepted = 0
    for g, s in zip(greedy, sampled):
        assert s.tokens == g.tokens
        want = summarize(replay_path(drafter, g, block_size=5, max_new_tokens=30, stop_ids=[]), 5)
        accept = acceptance_probabilities(drafter, target.get_output_embeddings(), s, sampling, 5)
        assert set(accept.round(decimals=3).unique().tolist()) <= {0.0, 1.0}
        got = summarize_walks([expected_walk(accept, s.tokens, block_size=5, max_new_tokens=30, stop_ids=[])], 5)
        assert got["rounds"] == want["rounds"] and got["tau"] == pytest.approx(want["tau"])
        accepted += sum(1 for c in want["conditional_acceptance"] if c)
    assert accepted > 0


def test_acceptance_given_the_text_is_min_p_q_over_p():
    """a of slot 1 must be min(p(x), q(x)) / p(x) at the text's token x: p the target's processed
    distribution after the anchor, q the drafter's top-k renormalised, both from full forwards here."""
    from dspark_common.sampling import processed_probs
    from drafter_svc.train.expected_replay import acceptance_probabilities, sampled_paths
    from dspark_common.types import SamplingParams
    from tests.tiny_models import tiny_drafter, tiny_target

    target = tiny_target()
    drafter = tiny_drafter(target, block_size=4)
    sampling = SamplingParams(temperature=1.0)
    (path,) = sampled_paths(target, [[5, 9, 13, 2]], sampling=sampling, seed=0, max_new_tokens=12, stop_ids=[],
                            layer_ids=drafter.config.target_layer_ids)
    a = acceptance_probabilities(drafter, target.get_output_embeddings(), path, sampling, 4, proposal_top_k=8)
    assert a.shape == (len(path.tokens) - 1, 4) and bool(((a >= 0) & (a <= 1 + 1e-6)).all())
    ids = torch.tensor(path.prompt_ids + path.tokens)
    n_p = len(path.prompt_ids)
    with torch.no_grad():
        logits = target(ids[None]).logits[0]
        for i in range(len(path.tokens) - 1):
            x = path.tokens[i + 1]
            p = processed_probs(logits[n_p + i], sampling)  # the token after anchor tokens[i]
            out = drafter.forward_train(path.features[None], ids[None], torch.tensor([[n_p + i]]),
                                        torch.ones(1, 1, dtype=torch.bool))
            z, _ = drafter.markov_features(ids[n_p + i : n_p + i + 1], out.hidden[0][:, 0], None)
            q_full = processed_probs(out.logits[0][0, 0] + drafter.markov_head.markov_w2(z)[0], sampling)
            qv, qi = q_full.topk(8)
            q = torch.zeros_like(q_full).scatter(0, qi, qv / qv.sum())
            # a ratio: batched vs single forwards differ in the 4th digit where p(x) is small
            assert float(a[i, 0]) == pytest.approx(float(min(p[x], q[x]) / p[x]), rel=2e-3, abs=1e-4)


def test_expected_rounds_given_the_text_average_to_the_decode_loops():
    """Over many runs of the real DecodeLoop at T > 0, the rounds each run took and the walk's
    expectation given that run's own text must agree on average (the walk is the loop's
    conditional expectation, not an approximation of it)."""
    from dspark_common.types import SamplingParams
    from drafter_svc.loading import draft_engine
    from drafter_svc.train.expected_replay import acceptance_probabilities, paths_along
    from tests.tiny_models import tiny_drafter, tiny_target
    from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
    from verifier_svc.target_engine import TargetEngine

    target = tiny_target()
    drafter = tiny_drafter(target, block_size=6)
    sampling_t = 0.6
    prompt = [5, 9, 13, 2]
    engine = TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids)
    plain = DecodeLoop(engine, None).generate(GenerationRequest(prompt, 24, draft_length=0)).token_ids
    favourite = max(set(plain), key=plain.count)
    with torch.no_grad():  # a drafter that agrees with the target often enough for rounds to vary
        drafter.markov_head.markov_w1.weight.fill_(1.0)
        drafter.markov_head.markov_w2.weight.zero_()
        # a soft preference: a sharp one makes q(x) either ≥ p(x) or ~0, every a 0 or 1, and the test moot
        drafter.markov_head.markov_w2.weight[favourite] = 0.5
    loop = DecodeLoop(engine, draft_engine(drafter))
    diffs, accepted = [], 0
    for seed in range(120):
        sampling = SamplingParams(temperature=sampling_t, seed=seed)
        real = loop.generate(GenerationRequest(prompt, 24, sampling, 5))
        (path,) = paths_along(target, [prompt], [real.token_ids], layer_ids=drafter.config.target_layer_ids)
        a = acceptance_probabilities(drafter, target.get_output_embeddings(), path, sampling, 5)
        walk = expected_walk(a, path.tokens, block_size=5, max_new_tokens=24, stop_ids=[])
        diffs.append(len(real.rounds) - walk.rounds)
        accepted += sum(r.accepted for r in real.rounds)
    d = torch.tensor(diffs)
    assert accepted > 100 and float(d.std()) > 0.1  # rounds varied, and not only with the text
    # (scaling every a by 0.8 moves the mean by 0.30 rounds, nine standard errors here)
    assert abs(float(d.mean())) < 4 * float(d.std()) / len(diffs) ** 0.5
