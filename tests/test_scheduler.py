"""Verification-length scheduling (verifier_svc/scheduler.py), including the paper's Appendix A
counterexample run through the real acceptance rule."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from verifier_svc.acceptance import accept_block, dense_draft_probs, residual_probs
from verifier_svc.scheduler import SpsTable, schedule_fixed, schedule_prefix, schedule_threshold

PROPERTY = settings(max_examples=100, deadline=None)

# Confidences are exactly 0 or in [0.01, 1], so every positive prefix survival (≤ 7 factors) is
# ≥ 1e-14 and visibly changes the expected-accept sum (a 1e-300 would vanish in float rounding).
confidence = st.one_of(st.just(0.0), st.floats(0.01, 1.0))
batches = st.lists(st.lists(confidence, min_size=0, max_size=7), min_size=0, max_size=5).map(
    lambda rows: [torch.tensor(r, dtype=torch.float32) for r in rows]
)


def survival(conf: torch.Tensor) -> list[float]:
    out, a = [], 1.0
    for c in conf.tolist():
        a *= c
        out.append(a)
    return out


def leading_nonzero(conf: torch.Tensor) -> int:
    return next((j for j, c in enumerate(conf.tolist()) if c == 0.0), len(conf))


# ------------------------------------------------------------------------------------------------
# SpsTable


def test_sps_interpolates_and_extrapolates():
    sps = SpsTable({1: 100.0, 5: 60.0, 9: 40.0})
    assert sps(1) == 100.0
    assert sps(3) == pytest.approx(80.0)
    assert sps(7) == pytest.approx(50.0)
    assert sps(9) == 40.0
    assert sps(18) == pytest.approx(20.0)  # time ∝ tokens beyond the last point
    assert SpsTable({4: 10.0})(2) == 10.0  # below the first point: its value


def test_sps_json_round_trip():
    sps = SpsTable({8: 55.5, 1: 90.0, 64: 12.25})
    back = SpsTable.from_dict(json.loads(json.dumps(sps.to_dict())))
    assert back.to_dict() == {1: 90.0, 8: 55.5, 64: 12.25}
    assert [back(b) for b in range(1, 100)] == [sps(b) for b in range(1, 100)]


@pytest.mark.parametrize("points", [{}, {0: 1.0}, {1: 0.0}, {2: float("nan")}, {3: -1.0}])
def test_sps_rejects_bad_points(points):
    with pytest.raises(ValueError):
        SpsTable(points)


# ------------------------------------------------------------------------------------------------
# schedule_prefix properties


@PROPERTY
@given(batches, st.floats(0.0, 50.0), st.booleans())
def test_lengths_within_bounds(confs, overhead, early_stop):
    lengths = schedule_prefix(confs, lambda b: 1.0 / (b + overhead), early_stop=early_stop)
    assert len(lengths) == len(confs)
    for n, conf in zip(lengths, confs):
        assert 0 <= n <= leading_nonzero(conf) <= len(conf)


@PROPERTY
@given(batches, st.floats(0.0, 50.0))
def test_admitted_tokens_are_the_most_likely_to_survive(confs, overhead):
    # The admitted set is a top slice of all candidates by prefix survival: admitting (r, j) means
    # every candidate with a larger a was admitted first (which, as a is non-increasing in j,
    # also means every request's admitted tokens are a prefix).
    lengths = schedule_prefix(confs, lambda b: 1.0 / (b + overhead))
    admitted, rejected = [], []
    for n, conf in zip(lengths, confs):
        for j, a in enumerate(survival(conf), start=1):
            if a > 0:
                (admitted if j <= n else rejected).append(a)
    if admitted and rejected:
        assert min(admitted) >= max(rejected)


@PROPERTY
@given(batches, st.booleans())
def test_free_tokens_are_all_admitted(confs, early_stop):
    # Constant SPS: each extra token only adds expected accepts, so every candidate with a > 0 goes in.
    assert schedule_prefix(confs, lambda b: 7.0, early_stop=early_stop) == [leading_nonzero(c) for c in confs]


@PROPERTY
@given(batches, st.booleans())
def test_nothing_admitted_when_each_token_halves_the_speed(confs, early_stop):
    # SPS halves per extra token: (τ + a)/2 > τ needs a > τ ≥ 1, impossible since a ≤ 1.
    assert schedule_prefix(confs, lambda b: 2.0**-b, early_stop=early_stop) == [0] * len(confs)


@PROPERTY
@given(batches, st.floats(0.0, 50.0))
def test_early_stop_finds_the_global_best_when_throughput_is_unimodal(confs, overhead):
    # SPS = 1/(Btok + overhead) (a fixed cost plus a per-token cost) makes Θ along the sorted
    # path unimodal, the case in which the paper's early stop loses nothing.
    sps = lambda b: 1.0 / (b + overhead)  # noqa: E731
    assert schedule_prefix(confs, sps, early_stop=True) == schedule_prefix(confs, sps, early_stop=False)


@PROPERTY
@given(batches, st.lists(st.floats(0.05, 1.0), min_size=1, max_size=12))
def test_global_search_never_scores_below_early_stop(confs, sps_values):
    sps = SpsTable({b: s for b, s in enumerate(sorted(sps_values, reverse=True), start=1)})

    def throughput(lengths: list[int]) -> float:
        expected = sum(1.0 + sum(survival(c)[:n]) for n, c in zip(lengths, confs))
        return expected * sps(len(confs) + sum(lengths)) if confs else 0.0

    stopped = schedule_prefix(confs, sps, early_stop=True)
    searched = schedule_prefix(confs, sps, early_stop=False)
    assert throughput(searched) >= throughput(stopped) - 1e-9


def test_worked_example():
    # R = 2. a_0 = (0.9, 0.45), a_1 = (0.6, 0.06); SPS: 10, 9, 8.5, 6 at 2..5 tokens.
    # Θ: 2·10 = 20 → +0.9: 2.9·9 = 26.1 → +0.6: 3.5·8.5 = 29.75 → +0.45: 3.95·6 = 23.7 stop.
    confs = [torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.1])]
    sps = SpsTable({2: 10.0, 3: 9.0, 4: 8.5, 5: 6.0})
    assert schedule_prefix(confs, sps) == [1, 1]


def test_round_overhead_lengthens_blocks_by_hand():
    # One request, survivals 0.5, 0.25; forward 1, 1.25, 1.6 s at 1..3 tokens.
    # Forward alone: 1/1 = 1 → 1.5/1.25 = 1.2 → 1.75/1.6 = 1.09 stop: one draft.
    # With 1 s more per round: 1/2 = 0.5 → 1.5/2.25 = 0.667 → 1.75/2.6 = 0.673: both drafts.
    confs = [torch.tensor([0.5, 0.5])]
    sps = SpsTable({1: 1.0, 2: 0.8, 3: 1 / 1.6})
    assert schedule_prefix(confs, sps) == [1]
    assert schedule_prefix(confs, sps, round_overhead_s=1.0) == [2]
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            schedule_prefix(confs, sps, round_overhead_s=bad)


def test_ties_go_to_the_earlier_request():
    confs = [torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5])]
    # 3·1 = 3 → 3.5·0.9 = 3.15 → 4·0.7 = 2.8 stop: exactly one token is admitted, request 0's.
    assert schedule_prefix(confs, SpsTable({3: 1.0, 4: 0.9, 5: 0.7})) == [1, 0, 0]


def test_empty_inputs():
    assert schedule_prefix([], lambda b: 1.0) == []
    assert schedule_prefix([torch.zeros(0)], lambda b: 1.0) == [0]


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_confidences_must_be_probabilities(bad):
    with pytest.raises(ValueError):
        schedule_prefix([torch.tensor([0.5, bad])], lambda b: 1.0)


# ------------------------------------------------------------------------------------------------
# Fixed length and threshold rules


def test_schedule_fixed():
    assert schedule_fixed([0, 3, 7], 4) == [0, 3, 4]
    assert schedule_fixed([5], 0) == [0]
    with pytest.raises(ValueError):
        schedule_fixed([1], -1)


def test_schedule_threshold_cuts_at_the_first_low_slot():
    confs = [torch.tensor([0.9, 0.4, 0.95]), torch.tensor([0.2, 0.9]), torch.tensor([0.8, 0.7]), torch.zeros(0)]
    assert schedule_threshold(confs, 0.5) == [1, 0, 2, 0]
    assert schedule_threshold(confs, 0.0) == [3, 2, 2, 0]  # threshold 0 keeps every block whole


@PROPERTY
@given(batches, st.floats(0.0, 1.0))
def test_schedule_threshold_property(confs, threshold):
    for n, conf in zip(schedule_threshold(confs, threshold), confs):
        values = conf.tolist()
        assert all(c >= threshold for c in values[:n])
        assert n == len(values) or values[n] < threshold


# ------------------------------------------------------------------------------------------------
# Appendix A: selection bias without early stop
#
# One request, γ = 2, vocabulary {A, B}. The target's processed distribution is p_t = (0.7, 0.3) at
# every position; the drafter proposes from p_d = (0.5, 0.5) at both slots. Confidences: c_1 = 0.8
# (= Σ min(p_t, p_d), known before x_1 is drawn); c_2 depends on the sampled x_1 through the Markov
# feature: 0.9 if x_1 = A, 0 if x_1 = B. SPS(1, 2, 3) = 1.0, 0.5, 0.45.
# Without early stop: x_1 = A → a = (0.8, 0.72), Θ = 1.0, 0.9, 1.134 → ℓ = 2;
#                     x_1 = B → a = (0.8, 0), Θ = 1.0, 0.9 → ℓ = 0. Output A w.p. 0.5 + 0.5·0.7 = 0.85.
# With early stop: Θ_1 = 0.9 < Θ_0 = 1.0 → ℓ = 0 whatever x_1 is, and the output is p_t.

A, B = 0, 1
P_T = torch.tensor([0.7, 0.3])
Q_IDS = torch.tensor([A, B])
Q_PROBS = torch.tensor([0.5, 0.5])
APPENDIX_SPS = SpsTable({1: 1.0, 2: 0.5, 3: 0.45})


def toy_confidences(x1: int) -> torch.Tensor:
    return torch.tensor([0.8, 0.9 if x1 == A else 0.0])


def scheduled_length(x1: int, sps: SpsTable, early_stop: bool) -> int:
    return schedule_prefix([toy_confidences(x1)], sps, early_stop=early_stop)[0]


def exact_first_token_law(sps: SpsTable, early_stop: bool) -> torch.Tensor:
    """Enumerate x_1: P(Y) = Σ_x1 q(x1)·P(Y | x1), where P(Y | x1) is the one-slot acceptance law if
    x_1 is scheduled and p_t otherwise (the target samples a fresh token from the anchor row)."""
    q = dense_draft_probs(Q_IDS[None], Q_PROBS[None], 2)[0].double()
    p = P_T.double()
    law = torch.zeros(2, dtype=torch.float64)
    for x1 in (A, B):
        if scheduled_length(x1, sps, early_stop) >= 1:
            accept = min(1.0, float(p[x1] / q[x1]))
            given_x1 = (1 - accept) * residual_probs(P_T, q.float()).double()
            given_x1[x1] += accept
        else:
            given_x1 = p
        law += q[x1] * given_x1
    return law


def simulate_first_tokens(n: int, early_stop: bool, seed: int) -> int:
    """Run n rounds of the toy drafter → scheduler → accept_block; return how many start with A."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    count_a = 0
    for _ in range(n):
        draft = rng.choices((A, B), weights=(0.5, 0.5), k=2)  # x_1, x_2 ~ p_d
        length = schedule_prefix([toy_confidences(draft[0])], APPENDIX_SPS, early_stop=early_stop)[0]
        res = accept_block(
            torch.tensor(draft[:length], dtype=torch.int64),
            Q_IDS.expand(length, 2),
            Q_PROBS.expand(length, 2),
            P_T.expand(length + 1, 2),
            greedy=False,
            generator=g,
        )
        first = draft[0] if res.num_accepted >= 1 else res.next_token
        count_a += first == A
    return count_a


def test_appendix_a_schedules():
    assert [scheduled_length(x1, APPENDIX_SPS, early_stop=False) for x1 in (A, B)] == [2, 0]
    assert [scheduled_length(x1, APPENDIX_SPS, early_stop=True) for x1 in (A, B)] == [0, 0]


def test_appendix_a_exact_laws():
    biased = exact_first_token_law(APPENDIX_SPS, early_stop=False)
    assert torch.allclose(biased, torch.tensor([0.85, 0.15], dtype=torch.float64), atol=1e-6)
    lossless = exact_first_token_law(APPENDIX_SPS, early_stop=True)
    assert torch.allclose(lossless, P_T.double(), atol=1e-6)


def test_early_stop_admits_on_pre_token_information_and_stays_lossless():
    # Cheaper second token (SPS(2) = 0.6, Θ_1 = 1.08 > 1.0): x_1 is admitted before c_2 is read, for
    # both values of x_1; only x_2's admission depends on x_1 (ℓ = 2 after A, 1 after B), which is
    # legitimate. The first token is still distributed exactly as p_t.
    sps = SpsTable({1: 1.0, 2: 0.6, 3: 0.45})
    assert [scheduled_length(x1, sps, early_stop=True) for x1 in (A, B)] == [2, 1]
    assert torch.allclose(exact_first_token_law(sps, early_stop=True), P_T.double(), atol=1e-6)


# 20 000 rounds: the standard error of a proportion near 0.7 is √(0.21/20000) ≈ 0.0032, so a
# 2-percentage-point bias is 6.2 standard errors; a two-sided binomial test at α = 1e-3 (3.29 s.e.)
# detects it with power Φ(6.2 − 3.29) ≈ 0.998.
N_ROUNDS = 20_000


def test_appendix_a_without_early_stop_is_biased_empirically():
    # The bias is 15 points; 4 000 rounds put it ~20 standard errors away from 0.7.
    n = 4_000
    count_a = simulate_first_tokens(n, early_stop=False, seed=1234)
    assert binomtest(count_a, n, 0.7).pvalue < 1e-12
    assert binomtest(count_a, n, 0.85).pvalue > 1e-3


def test_appendix_a_with_early_stop_matches_the_target_empirically():
    count_a = simulate_first_tokens(N_ROUNDS, early_stop=True, seed=1234)
    assert binomtest(count_a, N_ROUNDS, 0.7).pvalue > 1e-3
