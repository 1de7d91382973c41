"""DraftEngine: the per-session draft context cache (append, rollback, limits) and batched
proposals (greedy and sampled, exact sparse q, confidences)."""

from __future__ import annotations

import threading

import pytest
import torch

import drafter_svc.draft_engine as draft_engine_module
from drafter_svc.config import DSparkConfig
from drafter_svc.draft_engine import DraftEngine
from drafter_svc.dspark_model import DSparkDrafter
from dspark_common.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted
from dspark_common.sampling import processed_probs
from dspark_common.types import DraftRequest, SamplingParams

V, D, T, B, TOPK = 64, 32, 2, 5, 6
GREEDY = SamplingParams()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds spin-wait stalls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> DSparkConfig:
    base = dict(
        vocab_size=V, hidden_size=D, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_hidden_layers=2, num_target_layers=4, target_layer_ids=[0, 2], block_size=B,
        mask_token_id=V - 1, rope_theta=10000.0, initializer_range=0.2, markov_rank=8,
        markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True,
    )
    base.update(overrides)
    return DSparkConfig(**base)


def make_engine(seed: int = 0, **overrides) -> DraftEngine:
    torch.manual_seed(seed)
    engine_kwargs = {k: overrides.pop(k) for k in ("max_sessions", "max_context", "proposal_top_k") if k in overrides}
    cfg = tiny_config(**overrides)
    return DraftEngine(DSparkDrafter(cfg), cfg, **{"proposal_top_k": TOPK, **engine_kwargs})


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(24, T * D, generator=g), torch.randint(0, V - 1, (24,), generator=g)


def open_with(engine: DraftEngine, sid: str, feats: torch.Tensor, n: int) -> None:
    engine.open(sid)
    engine.append_context(sid, feats[:n], 0)


def req(sid, ids, n, block=B, sampling=GREEDY, seed=None) -> DraftRequest:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DraftRequest(sid, int(ids[n]), n, block, sampling, gen)


def assert_same(p, q) -> None:
    assert torch.equal(p.tokens, q.tokens) and torch.equal(p.q_ids, q.q_ids)
    torch.testing.assert_close(p.q_probs, q.q_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.confidences, q.confidences, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- sessions and cache


def test_session_lifecycle_and_limits(data):
    feats, _ = data
    engine = make_engine(max_sessions=2, max_context=10)
    engine.open("a")
    assert engine.context_length("a") == 0
    with pytest.raises(FailedPrecondition):
        engine.open("a")
    engine.open("b")
    with pytest.raises(ResourceExhausted, match="2 sessions"):
        engine.open("c")
    engine.append_context("a", feats[:6], 0)
    engine.append_context("a", feats[6:10], 6)
    with pytest.raises(ResourceExhausted, match="max_context"):
        engine.append_context("a", feats[10:11], 10)
    assert engine.context_length("a") == 10
    stats = engine.stats()
    assert stats["sessions"] == 2 and stats["cached_positions"] == 10
    assert engine.release("b") is True
    assert engine.release("b") is False  # idempotent: cleanup paths never fail
    engine.open("c")
    for call in (lambda: engine.context_length("zz"),
                 lambda: engine.append_context("zz", feats[:1], 0), lambda: engine.truncate("zz", 0),
                 lambda: engine.propose([DraftRequest("zz", 1, 0, B, GREEDY)])):
        with pytest.raises(NotFound):
            call()
    with pytest.raises(InvalidRequest):
        engine.open("")


def test_append_errors(data):
    feats, _ = data
    engine = make_engine()
    engine.open("s")
    engine.append_context("s", feats[:3], 0)
    with pytest.raises(FailedPrecondition, match="start_pos 2"):
        engine.append_context("s", feats[3:5], 2)
    with pytest.raises(InvalidRequest):
        engine.append_context("s", feats[3:5, :D], 3)
    with pytest.raises(InvalidRequest):
        engine.append_projected("s", feats[3:5], 3)
    with pytest.raises(FailedPrecondition):
        engine.truncate("s", 4)
    with pytest.raises(InvalidRequest):
        engine.truncate("s", -1)
    assert engine.context_length("s") == 3


def test_chunked_and_projected_appends_match_one_append(data, monkeypatch):
    feats, ids = data
    monkeypatch.setattr(draft_engine_module, "_INITIAL_CAPACITY", 4)  # exercise buffer growth
    engine = make_engine()
    open_with(engine, "whole", feats, 13)
    engine.open("chunks")
    for start, end in ((0, 1), (1, 5), (5, 5), (5, 13)):
        engine.append_context("chunks", feats[start:end], start)
    engine.open("projected")
    model = engine._model
    with torch.no_grad():
        engine.append_projected("projected", model.project_context(feats[:7]), 0)
        engine.append_projected("projected", model.project_context(feats[7:13]), 7)
    whole, chunks, projected = engine.propose([req(s, ids, 13) for s in ("whole", "chunks", "projected")])
    assert_same(whole, chunks)
    assert_same(whole, projected)


@pytest.mark.parametrize("head", ["vanilla", "rnn", "dflash"])
def test_greedy_proposal_follows_the_training_forward(data, head):
    """Teacher-forcing the proposed tokens through the training forward reproduces every argmax."""
    feats, ids = data
    overrides = (dict(markov_rank=0, enable_confidence_head=False, confidence_head_with_markov=False)
                 if head == "dflash" else dict(markov_head_type=head))
    engine = make_engine(**overrides)
    a = 9
    open_with(engine, "s", feats, a)
    (p,) = engine.propose([req("s", ids, a)])
    assert p.tokens.shape == (B,) and p.q_ids.shape == (B, 1) and torch.equal(p.q_probs, torch.ones(B, 1))
    assert torch.equal(p.q_ids[:, 0], p.tokens)
    seq = ids.clone()
    seq[a + 1 : a + B] = p.tokens[: B - 1]
    with torch.no_grad():
        out = engine._model.forward_train(feats[None], seq[None], torch.tensor([[a]]), torch.tensor([[True]]))
    assert torch.equal(out.logits[0, 0].argmax(-1), p.tokens)
    if head == "dflash":
        assert torch.equal(p.confidences, torch.ones(B))
    else:
        torch.testing.assert_close(p.confidences, torch.sigmoid(out.confidence_logits[0, 0]), atol=1e-6, rtol=1e-5)


def test_batched_ragged_propose_equals_single(data):
    feats, ids = data
    engine = make_engine(markov_head_type="gated")
    lens, blocks = [5, 0, 13, 9], [B, 3, 2, 0]
    for i, n in enumerate(lens):
        open_with(engine, f"s{i}", feats, n)
    batched = engine.propose([req(f"s{i}", ids, n, blk) for i, (n, blk) in enumerate(zip(lens, blocks))])
    for i, (n, blk) in enumerate(zip(lens, blocks)):
        (alone,) = engine.propose([req(f"s{i}", ids, n, blk)])
        assert len(batched[i]) == blk
        assert_same(batched[i], alone)
    assert batched[3].q_ids.shape == (0, 1)
    (full,) = engine.propose([req("s2", ids, 13)])
    assert torch.equal(full.tokens[:2], batched[2].tokens)  # a shorter block is a prefix


def test_rollback_then_reappend_reproduces_the_proposal(data):
    feats, ids = data
    engine = make_engine(markov_head_type="rnn")
    open_with(engine, "s", feats, 12)
    (before,) = engine.propose([req("s", ids, 12)])
    engine.truncate("s", 8)
    assert engine.context_length("s") == 8
    (at8,) = engine.propose([req("s", ids, 8)])
    open_with(engine, "fresh", feats, 8)
    assert_same(at8, engine.propose([req("fresh", ids, 8)])[0])
    engine.append_context("s", feats[8:12], 8)
    assert_same(before, engine.propose([req("s", ids, 12)])[0])


# ---------------------------------------------------------------------------- sampling


def test_sampled_proposal_is_an_exact_sparse_distribution(data):
    feats, ids = data
    engine = make_engine(markov_head_type="gated")
    open_with(engine, "s", feats, 10)
    params = SamplingParams(temperature=1.3)
    (p,) = engine.propose([req("s", ids, 10, sampling=params, seed=7)])
    assert p.q_ids.shape == (B, TOPK) and p.q_probs.shape == (B, TOPK) and p.q_probs.dtype == torch.float32
    torch.testing.assert_close(p.q_probs.sum(-1), torch.ones(B))
    assert all(int(t) in p.q_ids[k].tolist() for k, t in enumerate(p.tokens))
    assert ((p.confidences >= 0) & (p.confidences <= 1)).all()

    assert_q_recomputes(engine._model, feats, ids, 10, p, params)


def assert_q_recomputes(model, feats, ids, a, p, params, vocab=None) -> None:
    """Recompute q through the model with the sampled tokens fed back, as the head does (over the
    draft vocabulary `vocab` when given)."""
    vocab = torch.arange(V) if vocab is None else vocab
    with torch.no_grad():
        kv = model.context_kv(model.project_context(feats[:a]), torch.arange(a))
        h, base = model.forward_block([kv], ids[a : a + 1], torch.tensor([a]))
        prev, state = ids[a : a + 1], None
        for k in range(B):
            bias, state = model.markov_step(prev, h[:, k], state)
            probs = processed_probs((base[0, k] + bias[0])[vocab], params)
            top_p, top_i = probs.topk(TOPK)
            assert torch.equal(vocab[top_i], p.q_ids[k])
            torch.testing.assert_close(top_p / top_p.sum(), p.q_probs[k], atol=1e-6, rtol=1e-5)
            prev = p.tokens[k : k + 1]


def test_sampling_is_deterministic_per_generator_and_batch_independent(data):
    feats, ids = data
    engine = make_engine()
    open_with(engine, "a", feats, 7)
    open_with(engine, "b", feats, 11)
    hot = SamplingParams(temperature=3.0)
    runs = [engine.propose([req("a", ids, 7, sampling=hot, seed=s)])[0] for s in (1, 1, 2, 3, 4)]
    assert_same(runs[0], runs[1])
    assert any(not torch.equal(runs[0].tokens, r.tokens) for r in runs[2:])
    # Batched with another sampled request of a different block size: same draws per request.
    batched = engine.propose([req("a", ids, 7, 2, hot, seed=5), req("b", ids, 11, B, hot, seed=6)])
    assert_same(batched[0], engine.propose([req("a", ids, 7, 2, hot, seed=5)])[0])
    assert_same(batched[1], engine.propose([req("b", ids, 11, B, hot, seed=6)])[0])


def test_top_k_and_top_p_are_respected(data):
    feats, ids = data
    engine = make_engine()
    open_with(engine, "s", feats, 10)
    (p,) = engine.propose([req("s", ids, 10, sampling=SamplingParams(temperature=1.0, top_k=2), seed=0)])
    assert ((p.q_probs > 0).sum(-1) <= 2).all()
    (greedy,) = engine.propose([req("s", ids, 10)])
    (nucleus,) = engine.propose([req("s", ids, 10, sampling=SamplingParams(temperature=1.0, top_p=1e-4), seed=0)])
    assert torch.equal(nucleus.tokens, greedy.tokens)  # a tiny nucleus keeps only the argmax
    assert torch.equal(nucleus.q_probs[:, 0], torch.ones(B)) and torch.equal(nucleus.q_ids[:, 0], greedy.tokens)
    mixed = engine.propose([req("s", ids, 10), req("s", ids, 10, sampling=SamplingParams(temperature=1.0), seed=3)])
    assert_same(mixed[0], greedy)


def test_sts_temperatures_scale_confidence_logits(data):
    feats, ids = data
    plain = make_engine()
    temps = [1.0, 2.0, 0.5, 3.0, 1.5]
    sts_cfg = tiny_config(sts_temperatures=temps)
    sts_model = DSparkDrafter(sts_cfg)
    sts_model.load_state_dict(plain._model.state_dict())
    sts = DraftEngine(sts_model, sts_cfg, proposal_top_k=TOPK)
    for e in (plain, sts):
        open_with(e, "s", feats, 6)
    (p,) = plain.propose([req("s", ids, 6)])
    (q,) = sts.propose([req("s", ids, 6)])
    assert torch.equal(p.tokens, q.tokens)
    torch.testing.assert_close(torch.logit(p.confidences.double()),
                               torch.logit(q.confidences.double()) * torch.tensor(temps, dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)


def test_propose_errors(data):
    feats, ids = data
    engine = make_engine()
    open_with(engine, "s", feats, 4)
    with pytest.raises(InvalidRequest, match="block_size"):
        engine.propose([req("s", ids, 4, B + 1)])
    with pytest.raises(InvalidRequest, match="block_size"):
        engine.propose([req("s", ids, 4, -1)])
    with pytest.raises(FailedPrecondition, match="anchor"):
        engine.propose([req("s", ids, 3)])
    with pytest.raises(InvalidRequest, match="anchor_token"):
        engine.propose([DraftRequest("s", V, 4, B, GREEDY)])
    with pytest.raises(InvalidRequest, match="top_p"):
        engine.propose([req("s", ids, 4, sampling=SamplingParams(temperature=1.0, top_p=0.0))])
    (empty,) = engine.propose([req("s", ids, 4, 0, SamplingParams(temperature=1.0))])
    assert len(empty) == 0 and empty.q_ids.shape == (0, TOPK)
    assert engine.propose([]) == []
    with pytest.raises(InvalidRequest):
        DraftEngine(engine._model, tiny_config(block_size=3))


def test_concurrent_callers(data):
    feats, ids = data
    engine = make_engine()
    results: dict[str, object] = {}

    def worker(sid: str, n: int) -> None:
        engine.open(sid)
        for start in range(n):
            engine.append_context(sid, feats[start : start + 1], start)
        results[sid] = engine.propose([req(sid, ids, n)])[0]

    threads = [threading.Thread(target=worker, args=(f"t{i}", 6 + i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        open_with(engine, f"ref{i}", feats, 6 + i)
        assert_same(results[f"t{i}"], engine.propose([req(f"ref{i}", ids, 6 + i)])[0])


# ---------------------------------------------------------------------------- draft vocabulary

SUBSET = torch.tensor(sorted(torch.randperm(V, generator=torch.Generator().manual_seed(5))[: V // 2].tolist()))


def test_greedy_draft_vocab_is_the_masked_argmax(data):
    """With a draft vocabulary, slot k proposes argmax over the subset of the same logits the full
    head computes, mapped back to token ids."""
    feats, ids = data
    engine = make_engine(markov_head_type="gated")
    engine._model.draft_vocab = SUBSET
    engine = DraftEngine(engine._model, engine.config)
    assert engine.vocab_size == V // 2
    a = 9
    open_with(engine, "s", feats, a)
    (p,) = engine.propose([req("s", ids, a)])
    assert set(p.tokens.tolist()) <= set(SUBSET.tolist())
    seq = ids.clone()
    seq[a + 1 : a + B] = p.tokens[: B - 1]
    with torch.no_grad():
        out = engine._model.forward_train(feats[None], seq[None], torch.tensor([[a]]), torch.tensor([[True]]))
    assert torch.equal(SUBSET[out.logits[0, 0][:, SUBSET].argmax(-1)], p.tokens)
    # Confidences do not depend on the vocabulary.
    torch.testing.assert_close(p.confidences, torch.sigmoid(out.confidence_logits[0, 0]), atol=1e-6, rtol=1e-5)


def test_sampled_draft_vocab_q_lives_on_the_subset(data):
    feats, ids = data
    engine = make_engine(markov_head_type="rnn")
    model = engine._model
    model.draft_vocab = SUBSET
    engine = DraftEngine(model, engine.config, proposal_top_k=TOPK)
    open_with(engine, "s", feats, 10)
    params = SamplingParams(temperature=1.3)
    (p,) = engine.propose([req("s", ids, 10, sampling=params, seed=7)])
    assert set(p.q_ids.flatten().tolist()) <= set(SUBSET.tolist())
    assert_q_recomputes(model, feats, ids, 10, p, params, SUBSET)


def test_full_vocab_switch_ignores_the_models_draft_vocab(data):
    feats, ids = data
    plain = make_engine()
    open_with(plain, "s", feats, 9)
    model = plain._model
    model.draft_vocab = SUBSET
    full = DraftEngine(model, plain.config, proposal_top_k=TOPK, use_draft_vocab=False)
    open_with(full, "s", feats, 9)
    for params, seed in ((GREEDY, None), (SamplingParams(temperature=0.9), 3)):
        assert_same(full.propose([req("s", ids, 9, sampling=params, seed=seed)])[0],
                    plain.propose([req("s", ids, 9, sampling=params, seed=seed)])[0])
