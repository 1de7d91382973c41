"""Speculative acceptance (verifier_svc/acceptance.py): exact output law, empirical χ², greedy."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2, chisquare, ncx2

from verifier_svc import acceptance
from verifier_svc.acceptance import AcceptResult, accept_block, dense_draft_probs, residual_probs

PROPERTY = settings(max_examples=100, deadline=None)


# ------------------------------------------------------------------------------------------------
# Strategies and helpers


@st.composite
def distribution(draw, size: int, allow_zeros: bool = True) -> torch.Tensor:
    """A probability vector of length `size` (some entries may be exactly 0, at least one > 0)."""
    low = 0.0 if allow_zeros else 0.05
    weights = draw(st.lists(st.floats(low, 1.0), min_size=size, max_size=size))
    if allow_zeros:
        weights = [w if w > 0.2 else 0.0 for w in weights]  # exact zeros are the edge case that matters
    if sum(weights) == 0.0:
        weights[draw(st.integers(0, size - 1))] = 1.0
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


@st.composite
def sparse_draft(draw, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_ids [K], q_probs [K]): a draft distribution supported on K distinct ids of the vocab."""
    k = draw(st.integers(1, vocab))
    ids = draw(st.permutations(list(range(vocab))))[:k]
    return torch.tensor(ids, dtype=torch.int64), draw(distribution(k, allow_zeros=False)).float()


def exact_step_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact law of the token committed at one slot when x ~ q is verified against p.

    P(out = y) = q(y)·min(1, p(y)/q(y)) + (1 − Σ_x q(x)·min(1, p(x)/q(x)))·residual(y),
    with the residual taken from the module under test."""
    p, q = p.double(), q.double()
    accept = torch.where(q > 0, q * torch.minimum(torch.ones_like(q), p / q.clamp_min(1e-300)), 0.0)
    reject_mass = 1.0 - accept.sum()
    return accept + reject_mass * residual_probs(p.float(), q.float()).double()


# ------------------------------------------------------------------------------------------------
# Exact (analytic) losslessness of one slot


@PROPERTY
@given(st.data())
def test_one_slot_output_law_is_exactly_p(data):
    vocab = data.draw(st.integers(2, 6))
    p = data.draw(distribution(vocab))
    q_ids, q_probs = data.draw(sparse_draft(vocab))
    q = dense_draft_probs(q_ids[None], q_probs[None], vocab)[0]
    law = exact_step_law(p, q)
    assert torch.allclose(law, p, atol=1e-6), (p, q, law)


def test_dense_draft_probs_adds_repeated_ids():
    dense = dense_draft_probs(torch.tensor([[2, 0, 2]]), torch.tensor([[0.25, 0.5, 0.25]]), 4)
    assert dense.tolist() == [[0.5, 0.0, 0.5, 0.0]]


def test_residual_is_p_when_p_equals_q():
    p = torch.tensor([0.2, 0.8])
    assert torch.equal(residual_probs(p, p.clone()), p)


def test_residual_is_normalised_positive_part():
    r = residual_probs(torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.8, 0.0]))
    assert torch.allclose(r, torch.tensor([0.8, 0.0, 0.2]))


# ------------------------------------------------------------------------------------------------
# Properties of accept_block itself (sampling mode)


@st.composite
def sampled_block(draw):
    """A random block of n ≤ 4 draft tokens with sparse q and arbitrary target rows."""
    vocab = draw(st.integers(2, 5))
    n = draw(st.integers(0, 4))
    k = draw(st.integers(1, vocab))
    ids, probs, tokens = [], [], []
    for _ in range(n):
        perm = draw(st.permutations(list(range(vocab))))[:k]
        w = draw(distribution(k, allow_zeros=False)).float()
        ids.append(perm)
        probs.append(w)
        tokens.append(perm[draw(st.integers(0, k - 1))])  # any token in q's support
    target = torch.stack([draw(distribution(vocab)) for _ in range(n + 1)]).float()
    q_ids = torch.tensor(ids, dtype=torch.int64).reshape(n, k)
    q_probs = torch.stack(probs) if n else torch.zeros(0, k)
    return torch.tensor(tokens, dtype=torch.int64), q_ids, q_probs, target


@PROPERTY
@given(sampled_block(), st.integers(0, 2**31 - 1))
def test_sampling_result_is_well_formed(block, seed):
    tokens, q_ids, q_probs, target = block
    res = accept_block(tokens, q_ids, q_probs, target, greedy=False, generator=torch.Generator().manual_seed(seed))
    n = len(tokens)
    assert 0 <= res.num_accepted <= n
    # Accepted drafts and the next token are all possible under the target.
    for i in range(res.num_accepted):
        assert target[i, tokens[i]] > 0
    assert target[res.num_accepted, res.next_token] > 0
    # After a rejection the correction comes from max(0, p − q): never where q ≥ p
    # (unless that residual is empty, which these inputs make impossible when p ≠ q).
    m = res.num_accepted
    if m < n:
        q = dense_draft_probs(q_ids[m : m + 1], q_probs[m : m + 1], target.shape[1])[0]
        if (target[m] - q).clamp_min(0).sum() > 1e-6:
            assert target[m, res.next_token] > q[res.next_token]


@PROPERTY
@given(sampled_block(), st.integers(0, 2**31 - 1))
def test_same_seed_same_result(block, seed):
    tokens, q_ids, q_probs, target = block
    a = accept_block(tokens, q_ids, q_probs, target, greedy=False, generator=torch.Generator().manual_seed(seed))
    b = accept_block(tokens, q_ids, q_probs, target, greedy=False, generator=torch.Generator().manual_seed(seed))
    assert a == b


@PROPERTY
@given(sampled_block(), st.integers(0, 2**31 - 1))
def test_every_draft_accepted_when_target_likes_it_at_least_as_much(block, seed):
    tokens, q_ids, q_probs, target = block
    n, vocab = len(tokens), target.shape[1]
    # Make p(x_k) ≥ q(x_k) for every slot: put all of row k's mass on x_k.
    target = target.clone()
    for k in range(n):
        target[k] = torch.nn.functional.one_hot(tokens[k], vocab).float()
    res = accept_block(tokens, q_ids, q_probs, target, greedy=False, generator=torch.Generator().manual_seed(seed))
    assert res.num_accepted == n
    assert target[n, res.next_token] > 0  # the bonus comes from the last row


def test_rejection_when_target_gives_zero_probability():
    # x_1 = 0 has p = 0: always rejected, and the correction is never 0.
    tokens = torch.tensor([0, 1])
    q_ids = torch.tensor([[0, 1], [1, 2]])
    q_probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    target = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        res = accept_block(tokens, q_ids, q_probs, target, greedy=False, generator=g)
        assert res.num_accepted == 0
        assert res.next_token in (1, 2)


def test_empty_block_samples_row_zero():
    target = torch.tensor([[0.0, 0.0, 1.0]])
    res = accept_block(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(0, 3),
        target,
        greedy=False,
        generator=torch.Generator().manual_seed(1),
    )
    assert res == AcceptResult(0, 2)


@pytest.mark.parametrize(
    "shapes",
    [
        ((2,), (2, 3), (2, 3), (2, 5)),  # target needs n + 1 rows
        ((2,), (2, 3), (2, 2), (3, 5)),  # q_ids / q_probs mismatch
        ((2, 1), (2, 3), (2, 3), (3, 5)),  # draft tokens not 1-D
    ],
)
def test_bad_shapes_are_rejected(shapes):
    t, i, p, tp = shapes
    with pytest.raises(ValueError):
        accept_block(
            torch.zeros(t, dtype=torch.int64),
            torch.zeros(i, dtype=torch.int64),
            torch.full(p, 1 / 3),
            torch.full(tp, 0.2),
            greedy=False,
            generator=None,
        )


def test_out_of_vocab_ids_are_rejected():
    with pytest.raises(ValueError):
        accept_block(
            torch.tensor([7]), torch.tensor([[7]]), torch.tensor([[1.0]]), torch.full((2, 3), 1 / 3),
            greedy=False, generator=None,
        )


# ------------------------------------------------------------------------------------------------
# Greedy


@st.composite
def greedy_block(draw):
    vocab = draw(st.integers(2, 6))
    n = draw(st.integers(0, 5))
    target_tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n + 1, max_size=n + 1))
    # Draft tokens agree with the target for a random prefix, then are arbitrary.
    agree = draw(st.integers(0, n))
    tail = draw(st.lists(st.integers(0, vocab - 1), min_size=n - agree, max_size=n - agree))
    tokens = target_tokens[:agree] + tail
    target = torch.nn.functional.one_hot(torch.tensor(target_tokens), vocab).float()
    q_ids = torch.tensor(tokens, dtype=torch.int64).reshape(n, 1)
    return torch.tensor(tokens, dtype=torch.int64), q_ids, torch.ones(n, 1), target, target_tokens


@PROPERTY
@given(greedy_block())
def test_greedy_is_token_identical_to_target_argmax(block):
    tokens, q_ids, q_probs, target, target_tokens = block
    res = accept_block(tokens, q_ids, q_probs, target, greedy=True, generator=None)
    committed = tokens[: res.num_accepted].tolist() + [res.next_token]
    # Target-only greedy would have produced exactly these tokens ...
    assert committed == target_tokens[: len(committed)]
    # ... and the round stops at the first disagreement (or after the bonus).
    m = res.num_accepted
    assert m == len(tokens) or tokens[m] != target_tokens[m]


def test_greedy_examples():
    target = torch.nn.functional.one_hot(torch.tensor([3, 1, 4, 2]), 5).float()
    q_probs = torch.ones(3, 1)
    for draft, expected in [([3, 1, 4], (3, 2)), ([3, 0, 4], (1, 1)), ([0, 1, 4], (0, 3))]:
        t = torch.tensor(draft)
        assert accept_block(t, t[:, None], q_probs, target, greedy=True, generator=None) == AcceptResult(*expected)
    empty = accept_block(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, 1),
        target[:1], greedy=True, generator=None,
    )
    assert empty == AcceptResult(0, 3)


# ------------------------------------------------------------------------------------------------
# Empirical χ²: the first two committed tokens of 2-step blocks with sparse drafts
#
# A toy world with V = 3 where the target's second row depends on the first token and the draft
# never proposes token 1 at the first slot (so the residual must supply it).

P1 = torch.tensor([0.5, 0.3, 0.2])
P2 = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.25, 0.25, 0.5]])  # row y1: p(y2 | y1)
P3 = torch.full((3,), 1 / 3)  # bonus row, not part of the tested pair
Q1_IDS, Q1_PROBS = torch.tensor([0, 2]), torch.tensor([0.3, 0.7])
Q2_IDS = torch.tensor([[1, 2], [0, 1], [2, 0]])  # row x1: sparse q(x2 | x1)
Q2_PROBS = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.9, 0.1]])

EXPECTED_PAIR = (P1.double()[:, None] * P2.double()).flatten()  # p(y1, y2) = p1(y1)·p2(y2 | y1)
N_ROUNDS = 20_000
ALPHA = 1e-3


# Everything a round needs, per first draft token x1, built once (the loop below runs 20k times).
BLOCK_Q_IDS = [torch.stack([Q1_IDS, Q2_IDS[x1]]) for x1 in range(3)]
BLOCK_Q_PROBS = [torch.stack([Q1_PROBS, Q2_PROBS[x1]]) for x1 in range(3)]
BLOCK_TARGET = [torch.stack([P1, P2[x1], P3]) for x1 in range(3)]
NEXT_TARGET = [torch.stack([P2[y1], P3]) for y1 in range(3)]


def draw_sparse(ids: torch.Tensor, probs: torch.Tensor, rng: random.Random) -> int:
    return int(ids[rng.choices(range(len(ids)), weights=probs.tolist())[0]])


def first_two_tokens(rng: random.Random, g: torch.Generator) -> tuple[int, int]:
    """Run speculative rounds like the decode loop does until two tokens are committed.

    The drafter's sampling uses `rng`; acceptance uses `g`, as in the services."""
    x1 = draw_sparse(Q1_IDS, Q1_PROBS, rng)
    x2 = draw_sparse(Q2_IDS[x1], Q2_PROBS[x1], rng)
    res = accept_block(
        torch.tensor([x1, x2]), BLOCK_Q_IDS[x1], BLOCK_Q_PROBS[x1], BLOCK_TARGET[x1], greedy=False, generator=g
    )
    committed = [x1, x2][: res.num_accepted] + [res.next_token]
    if len(committed) >= 2:
        return committed[0], committed[1]
    # Rejected at slot 1: the next round starts from y1 with a fresh one-token draft.
    y1 = committed[0]
    x = draw_sparse(Q2_IDS[y1], Q2_PROBS[y1], rng)
    res = accept_block(
        torch.tensor([x]), Q2_IDS[y1][None], Q2_PROBS[y1][None], NEXT_TARGET[y1], greedy=False, generator=g
    )
    return y1, (x if res.num_accepted else res.next_token)


def pair_counts(n: int, seed: int) -> torch.Tensor:
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = torch.zeros(9, dtype=torch.float64)
    for _ in range(n):
        y1, y2 = first_two_tokens(rng, g)
        counts[3 * y1 + y2] += 1
    return counts


def expected_counts(n: int):
    return (EXPECTED_PAIR / EXPECTED_PAIR.sum() * n).numpy()  # sums to n exactly, as chisquare checks


def test_chi2_sample_size_detects_a_two_point_bias():
    # Power against the hardest 2-percentage-point bias: 0.02 of mass moved between the two largest
    # cells (largest expected counts, so the smallest χ² contribution). Noncentrality
    # λ = N·0.02²·(1/p_a + 1/p_b) = 20000·0.0004·(1/0.25 + 1/0.18) ≈ 76.4; with 8 degrees of freedom
    # and α = 1e-3 (critical value 26.1) the power is > 0.999.
    p_a, p_b = EXPECTED_PAIR.sort(descending=True).values[:2].tolist()
    lam = N_ROUNDS * 0.02**2 * (1 / p_a + 1 / p_b)
    power = ncx2.sf(chi2.isf(ALPHA, df=8), df=8, nc=lam)
    assert power > 0.99


def test_two_step_blocks_commit_the_target_joint_distribution():
    counts = pair_counts(N_ROUNDS, seed=20240611)
    result = chisquare(counts.numpy(), expected_counts(N_ROUNDS))
    assert result.pvalue > ALPHA, (counts / N_ROUNDS, EXPECTED_PAIR)


def test_chi2_catches_a_correction_drawn_from_p_instead_of_the_residual(monkeypatch):
    # The classic bug: on rejection, resample from p instead of max(0, p − q). The first token's law
    # becomes q·min(1, p/q) + P(reject)·p = (0.55, 0.15, 0.30) instead of (0.5, 0.3, 0.2), a bias
    # far larger than 2 points, so a small run must reject it.
    monkeypatch.setattr(acceptance, "residual_probs", lambda p, q: p)
    counts = pair_counts(2_000, seed=7)
    result = chisquare(counts.numpy(), expected_counts(2_000))
    assert result.pvalue < 1e-6
