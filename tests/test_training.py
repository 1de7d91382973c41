"""The DSpark training pipeline on tiny models: objective pieces, target cache, fit + resume,
export through the DeepSpec-format loader, STS calibration, eval arithmetic."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

import pytest
import torch

from dspark_common.errors import FailedPrecondition, InvalidRequest
from drafter_svc import draft_vocab
from drafter_svc.checkpoint import FROZEN_KEYS, WEIGHTS_NAME, load_checkpoint, read_weights
from drafter_svc.loading import default_layer_ids
from drafter_svc.train.cache import CacheReader, build_cache
from drafter_svc.train.data import read_answers
from drafter_svc.train.calibrate import calibrate, greedy_rounds
from drafter_svc.train.evaluate import RoundOutcome, evaluate, summarize
from drafter_svc.train.evaluate import outcome_of as outcome_of_round
from drafter_svc.train.average import average_run
from drafter_svc.train.export import export_run
from drafter_svc.train.fit import FitOptions, Trainer, build_model, draft_config, load_run_model, lr_at
from drafter_svc.train.objective import block_targets, dspark_loss_sums, sample_anchors, sparse_l1, vocab_index
from tests.oracle_proposer import OracleProposer
from tests.tiny_models import tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.target_engine import TargetEngine

VOCAB = 256


def write_answers(path, n: int = 6, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for i in range(n):
            prompt = torch.randint(0, VOCAB - 2, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g)
            answer = torch.randint(0, VOCAB - 2, (int(torch.randint(16, 28, (1,), generator=g)),), generator=g)
            fh.write(json.dumps({"key": f"toy:{i}", "prompt_ids": prompt.tolist(), "answer_ids": answer.tolist()}) + "\n")


def toy_cache(target, out, n: int, seed: int) -> None:
    """A target cache at `out` for `n` random answers (`write_answers`, kept beside it as out.jsonl)."""
    write_answers(out.with_suffix(".jsonl"), n=n, seed=seed)
    build_cache(target, out.with_suffix(".jsonl"), out, default_layer_ids(int(target.config.num_hidden_layers)),
                top_k=8, batch_size=4, shard_size=4, progress=False)


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, target):
    d = tmp_path_factory.mktemp("train")
    write_answers(d / "answers.jsonl", n=6)
    layers = default_layer_ids(int(target.config.num_hidden_layers))
    build_cache(target, d / "answers.jsonl", d / "cache", layers, top_k=8, batch_size=4, shard_size=4, progress=False)
    return d / "cache"


def options(**kw) -> FitOptions:
    base = dict(steps=8, batch_seqs=3, num_anchors=64, layers=1, markov_rank=8, block_size=4, lr=3e-3,
                ckpt_every=100, seed=0)
    base.update(kw)
    return FitOptions(**base)


# ------------------------------------------------------------------ objective


def test_anchors_are_response_positions_sorted_and_padded():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])
    anchors, keep = sample_anchors(mask, 6, torch.Generator().manual_seed(0))
    real = anchors[keep].tolist()
    assert real == sorted(real) == [2, 3, 6]  # i and i+1 both response tokens
    assert keep.tolist() == [True] * 3 + [False] * 3 and anchors[~keep].tolist() == [0, 0, 0]
    few, _ = sample_anchors(torch.ones(50), 5, torch.Generator().manual_seed(1), pad=False)
    assert len(set(few.tolist())) == 5 and few.tolist() == sorted(few.tolist())


def test_block_targets_cumulative_mask_and_decay():
    ids = torch.arange(10)
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    labels, eval_mask, w = block_targets(ids, mask, torch.tensor([2, 7, 0]), torch.tensor([True, True, False]), 4)
    assert labels[0].tolist() == [3, 4, 5, 6]
    assert eval_mask.tolist() == [[True, True, False, False],  # label 5 is a prompt token: later slots off too
                                  [True, True, False, False],  # runs past the end of the sequence
                                  [False] * 4]  # dummy block
    assert torch.allclose(w[0, :2], torch.exp(-torch.arange(2.0) / 4.0)) and w[0, 2:].sum() == 0


def test_sparse_l1_is_exact_when_the_target_fits_in_its_top_k():
    g = torch.Generator().manual_seed(0)
    p_d = torch.softmax(torch.randn(5, 20, generator=g), -1)
    p_t = torch.zeros(5, 20)
    ids = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(5)])
    p_t.scatter_(1, ids, torch.softmax(torch.randn(5, 4, generator=g), -1))
    assert torch.allclose(sparse_l1(p_d, ids, p_t.gather(1, ids)), (p_d - p_t).abs().sum(-1), atol=1e-6)
    # With tail mass the coarsened L1 is a lower bound of the full one.
    full_t = torch.softmax(torch.randn(5, 20, generator=g), -1)
    top = full_t.topk(4)
    assert (sparse_l1(p_d, top.indices, top.values) <= (p_d - full_t).abs().sum(-1) + 1e-6).all()


def test_lr_schedule_warms_up_then_decays_to_zero():
    o = FitOptions(steps=100, lr=1.0)
    assert lr_at(0, o) == pytest.approx(0.25) and lr_at(3, o) == pytest.approx(1.0)
    assert lr_at(50, o) < lr_at(10, o) and lr_at(100, o) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ cache


def test_cache_matches_the_target_engine(target, cache_dir):
    reader = CacheReader(cache_dir, None)
    assert len(reader) == 6
    seq = reader.get(reader.keys[0])
    engine = TargetEngine(target, feature_layer_ids=reader.manifest["target_layer_ids"])
    engine.open("s")
    fwd = engine.extend("s", seq.input_ids.tolist())
    assert torch.allclose(seq.features.float(), fwd.features, atol=2e-2, rtol=2e-3)
    pos = seq.loss_mask[1:].nonzero().squeeze(-1)  # positions whose next token is a response token
    top = torch.softmax(fwd.logits[pos], -1).topk(8)
    assert torch.equal(seq.topk_ids[pos], top.indices)
    assert torch.allclose(seq.topk_probs[pos], top.values, atol=1e-3)


def test_cache_build_resumes_without_redoing(target, cache_dir):
    added = build_cache(target, cache_dir.parent / "answers.jsonl", cache_dir,
                        CacheReader(cache_dir).manifest["target_layer_ids"], top_k=8, progress=False)
    assert added == 0


def test_archived_answers_read_as_the_datagen_output(cache_dir, tmp_path):
    """`data/answers/` keeps datagen output gzipped, so a later session rebuilds the target cache
    with one forward per sequence instead of regenerating the answers."""
    plain = cache_dir.parent / "answers.jsonl"
    (tmp_path / "answers.0.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert read_answers(tmp_path) == read_answers(plain)


# ------------------------------------------------------------------ fit


def test_several_caches_read_as_one(target, cache_dir, tmp_path):
    toy_cache(target, tmp_path / "c2", n=5, seed=1)  # same keys as cache_dir's: toy:0..4
    one, two = CacheReader(cache_dir, None), CacheReader(tmp_path / "c2", None)
    both = CacheReader([cache_dir, tmp_path / "c2"], None)
    assert len(both) == len(one) + len(two)  # same prompt, two answers: both kept
    assert both.keys == sorted([f"0:{k}" for k in one.keys] + [f"1:{k}" for k in two.keys])
    assert torch.equal(both.get("1:toy:3").input_ids, two.get("toy:3").input_ids)
    Trainer(target, [cache_dir, tmp_path / "c2"], tmp_path / "run", options(steps=2), progress=False).fit()
    # Resumed over the caches in another order (keys name positions): the checkpoint's epoch order
    # no longer matches, so the run starts a new order instead of failing on a missing key.
    resumed = Trainer(target, [tmp_path / "c2"], tmp_path / "run", options(steps=4), progress=False)
    assert resumed.step == 2 and resumed.order == []
    resumed.fit()
    assert resumed.step == 4
    build_cache(target, tmp_path / "c2.jsonl", tmp_path / "c3", CacheReader(cache_dir).manifest["target_layer_ids"],
                top_k=4, batch_size=4, shard_size=4, progress=False)
    with pytest.raises(Exception, match="top_k"):
        CacheReader([cache_dir, tmp_path / "c3"])


def test_sequences_cached_mid_epoch_join_it_on_resume(target, cache_dir, tmp_path):
    """A restart that finds a new cache directory reads it in the current epoch, not the next."""
    toy_cache(target, tmp_path / "c2", n=5, seed=1)
    toy_cache(target, tmp_path / "c3", n=5, seed=2)
    opts = options(steps=3, batch_seqs=1)
    first = Trainer(target, [cache_dir, tmp_path / "c2"], tmp_path / "run", opts, progress=False)
    first.fit(until=2)
    read, unread = first.order[: first.pos], first.order[first.pos :]
    del first
    resumed = Trainer(target, [cache_dir, tmp_path / "c2", tmp_path / "c3"], tmp_path / "run", opts, progress=False)
    assert resumed.step == 2 and resumed.order[: resumed.pos] == read  # what was read stays read
    joined = [k for k in resumed.reader.keys if k.startswith("2:")]
    assert joined and sorted(resumed.order[resumed.pos :]) == sorted(unread + joined)
    resumed.fit()
    assert resumed.step == 3


def test_shards_written_mid_epoch_join_it_at_the_next_checkpoint(target, cache_dir, tmp_path):
    toy_cache(target, tmp_path / "c2", n=8, seed=3)
    late = sorted((tmp_path / "c2").glob("shard_*"))[-2:]  # the last shard's .json and .safetensors
    side = json.loads(late[0].read_text())
    late_keys = [f"1:{k}" for k, s in zip(side["keys"], side["splits"]) if s == "train"]
    assert late_keys
    for p in late:  # "not written yet"
        p.rename(p.with_name("later." + p.name))
    trainer = Trainer(target, [cache_dir, tmp_path / "c2"], tmp_path / "run", options(steps=3, batch_seqs=1,
                                                                                   ckpt_every=1), progress=False)
    trainer.fit(until=1)
    assert not set(late_keys) & set(trainer.order)
    for p in late:
        p.with_name("later." + p.name).rename(p)
    trainer.fit(until=2)  # the checkpoint after step 2 finds the shard
    assert set(late_keys) <= set(trainer.order[trainer.pos :])
    trainer.fit()
    assert trainer.step == 3


def test_watched_cache_patterns_take_new_directories_without_a_restart(target, cache_dir, tmp_path):
    """A quoted glob in --cache is re-expanded at each checkpoint: a directory a cache build begins
    beside the fit joins the running epoch, and a resume finds every directory at its position."""
    toy_cache(target, tmp_path / "c_0", n=5, seed=1)
    build_cache(target, tmp_path / "c_0.jsonl", tmp_path / "c_9", CacheReader(cache_dir).manifest["target_layer_ids"],
                top_k=4, batch_size=4, shard_size=4, progress=False)  # another top_k: cannot be read with c_0
    pattern = str(tmp_path / "c_*")
    opts = options(steps=4, batch_seqs=1, ckpt_every=1)
    trainer = Trainer(target, [pattern], tmp_path / "run", opts, progress=False)
    assert trainer.reader.directories == [tmp_path / "c_0"]  # c_9 is left out, with a warning
    assert all(k.startswith("0:") for k in trainer.reader.keys)  # prefixed from the start
    trainer.fit(until=1)
    toy_cache(target, tmp_path / "c_1", n=5, seed=2)
    trainer.fit(until=2)  # the checkpoint after step 2 finds it
    joined = [k for k in trainer.reader.keys if k.startswith("1:")]
    assert joined and set(joined) <= set(trainer.order[trainer.pos :])
    read, unread = trainer.order[: trainer.pos], trainer.order[trainer.pos :]
    del trainer
    toy_cache(target, tmp_path / "c_00", n=4, seed=3)  # sorts before c_1 but was begun after it: goes last
    resumed = Trainer(target, [pattern], tmp_path / "run", opts, progress=False)
    assert resumed.reader.directories == [tmp_path / "c_0", tmp_path / "c_1", tmp_path / "c_00"]
    assert resumed.step == 2 and resumed.order[: resumed.pos] == read  # the state's keys still name them
    assert set(unread) < set(resumed.order[resumed.pos :])
    resumed.fit()
    assert resumed.step == 4
    with pytest.raises(FailedPrecondition, match="no target cache matches"):
        Trainer(target, [str(tmp_path / "none_*")], tmp_path / "run2", opts, progress=False)


def test_training_steps_lower_the_loss(target, cache_dir, tmp_path):
    trainer = Trainer(target, cache_dir, tmp_path / "run", options(steps=12), progress=False)
    recs = trainer.fit()
    assert len(recs) == 12 and all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    first, last = sum(r["loss"] for r in recs[:2]) / 2, sum(r["loss"] for r in recs[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    frozen = load_run_model(tmp_path / "run", target)
    assert torch.equal(frozen.lm_head.weight, target.get_output_embeddings().weight)


def test_resume_continues_from_the_same_step(target, cache_dir, tmp_path):
    opts = options(steps=6, ckpt_every=2)
    straight = Trainer(target, cache_dir, tmp_path / "a", opts, progress=False)
    straight.fit()

    first = Trainer(target, cache_dir, tmp_path / "b", opts, progress=False)
    first.fit(until=3)
    del first  # "crash" after the step-3 checkpoint
    resumed = Trainer(target, cache_dir, tmp_path / "b", opts, progress=False)
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_options(target, cache_dir, tmp_path):
    Trainer(target, cache_dir, tmp_path / "r", options(steps=2), progress=False).fit()
    with pytest.raises(Exception, match="options changed"):
        Trainer(target, cache_dir, tmp_path / "r", options(steps=2, markov_rank=4), progress=False)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_loads_through_the_deepspec_loader(target, cache_dir, tmp_path, dtype):
    Trainer(target, cache_dir, tmp_path / "run", options(steps=2), progress=False).fit()
    out = export_run(tmp_path / "run", tmp_path / "export", dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["frozen_weights_from_target"] is True
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        assert not set(FROZEN_KEYS) & set(f.keys())
    loaded = load_checkpoint(out, target_embed=target.get_input_embeddings().weight,
                             target_lm_head=target.get_output_embeddings().weight)
    trained = load_run_model(tmp_path / "run", target)
    reader = CacheReader(cache_dir)
    seq = reader.get(reader.keys[0])
    anchors, keep = sample_anchors(seq.loss_mask, 4, torch.Generator().manual_seed(0))
    args = (seq.features[None].float(), seq.input_ids[None], anchors[None], keep[None])
    with torch.no_grad():
        ref, got = trained.forward_train(*args), loaded.forward_train(*args)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(ref.logits, got.logits, atol=tol, rtol=tol)
    with pytest.raises(Exception, match="omits the frozen"):
        load_checkpoint(out)


def test_init_from_an_export_continues_that_drafter(target, cache_dir, tmp_path):
    Trainer(target, cache_dir, tmp_path / "run", options(steps=3), progress=False).fit()
    out = export_run(tmp_path / "run", tmp_path / "export", dtype=torch.float32)
    warm = Trainer(target, cache_dir, tmp_path / "warm", options(steps=3, init_from=str(out)), progress=False)
    trained = load_run_model(tmp_path / "run", target)
    for name, p in warm.model.named_parameters():
        assert torch.equal(p, trained.state_dict()[name]), name
    # the continuation starts from the export's loss, not a fresh drafter's
    fresh = Trainer(target, cache_dir, tmp_path / "fresh", options(steps=3, seed=0), progress=False)
    assert warm.train_step()["loss"] < fresh.train_step()["loss"]
    with pytest.raises(Exception, match="markov_rank"):
        Trainer(target, cache_dir, tmp_path / "other", options(steps=3, markov_rank=4, init_from=str(out)),
                progress=False)


def test_average_interpolates_a_warm_start_with_its_init(target, cache_dir, tmp_path):
    Trainer(target, cache_dir, tmp_path / "run", options(steps=3), progress=False).fit()
    init = export_run(tmp_path / "run", tmp_path / "init", dtype=torch.float32)
    Trainer(target, cache_dir, tmp_path / "warm", options(steps=3, init_from=str(init)), progress=False).fit()
    start, end = load_run_model(tmp_path / "run").state_dict(), load_run_model(tmp_path / "warm").state_dict()

    # several alphas: the score picks (here the one nearest 0.5), and the choice is recorded
    seen = []

    def score(model):
        w = model.state_dict()["fc.weight"]
        a = float(((w - start["fc.weight"]).norm() / (end["fc.weight"] - start["fc.weight"]).norm()))
        seen.append(a)
        return -abs(a - 0.5)

    result = average_run(tmp_path / "warm", tmp_path / "avg", [0.0, 0.5, 1.0], score=score, target=target)
    assert result["alpha"] == 0.5 and set(result["scores"]) == {"0.0", "0.5", "1.0"}
    assert seen == pytest.approx([0.0, 0.5, 1.0], abs=1e-5)
    avg = load_run_model(tmp_path / "avg").state_dict()
    trainable = [n for n in read_weights(init) if n in avg]
    assert trainable
    for n in trainable:
        assert torch.allclose(avg[n], (start[n] + end[n]) / 2, atol=1e-6), n
    # an end point: calibrated and exported like any run, never resumed
    export_run(tmp_path / "avg", tmp_path / "avg_export", dtype=torch.float32)
    assert (tmp_path / "avg_export" / WEIGHTS_NAME).is_file()
    with pytest.raises(FailedPrecondition, match="averaged"):
        Trainer(target, cache_dir, tmp_path / "avg", options(steps=3, init_from=str(init)), progress=False)
    with pytest.raises(FailedPrecondition, match="warm-started"):
        average_run(tmp_path / "run", tmp_path / "avg2", [0.5])
    with pytest.raises(InvalidRequest):
        average_run(tmp_path / "warm", tmp_path / "avg3", [0.5, 0.7])  # several alphas, nothing to choose by
    with pytest.raises(FailedPrecondition, match="not a fit run"):
        average_run(tmp_path / "init", tmp_path / "avg4", [0.5])


# ------------------------------------------------------------------ draft vocabulary


def test_losses_over_a_draft_vocabulary_equal_full_losses_of_the_served_draft():
    """Training over V' ids must score exactly the drafter that is served with that vocabulary:
    the full-V draft with no mass outside V' (its logits -inf there)."""
    g = torch.Generator().manual_seed(3)
    n, block, v, k = 5, 4, 40, 6
    ids = torch.randperm(v, generator=g)[:24].sort().values
    logits = torch.randn(n, block, v, generator=g)
    conf = torch.randn(n, block, generator=g)
    labels = torch.randint(0, v, (n, block), generator=g)
    labels[0, 0] = ids[3]
    weights = torch.rand(n, block, generator=g)
    weights[1, 2:] = 0.0
    topk = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n * block)]).view(n, block, k)
    probs = torch.softmax(torch.randn(n, block, k, generator=g), -1) * 0.9

    sub = dspark_loss_sums(logits[..., ids], conf, labels, weights, topk, probs, vocab_index(ids, v))
    served = logits.clone()
    outside = torch.ones(v, dtype=torch.bool)
    outside[ids] = False
    served[..., outside] = float("-inf")
    full = dspark_loss_sums(served, conf, labels, weights, topk, probs)
    assert torch.allclose(sub.tv, full.tv, atol=1e-5) and torch.allclose(sub.conf, full.conf, atol=1e-5)
    # CE counts only labels the draft can write (the full-V CE of the others is infinite)
    inside = ~outside[labels] & (weights > 0)
    assert 0 < int(inside.sum()) < int((weights > 0).sum())
    logp = torch.log_softmax(logits[..., ids], -1)
    col = vocab_index(ids, v)[labels].clamp(min=0)
    expected = -(weights * logp.gather(-1, col[..., None])[..., 0] * inside).sum()
    assert torch.allclose(sub.ce, expected, atol=1e-5)


def test_forward_over_a_draft_vocabulary_is_the_full_forward_restricted(target, cache_dir):
    reader = CacheReader(cache_dir)
    seq = reader.get(reader.keys[0])
    drafter = build_model(draft_config(target.config, reader.manifest["target_layer_ids"], options()), target, 0)
    anchors, keep = sample_anchors(seq.loss_mask, 5, torch.Generator().manual_seed(0), pad=False)
    ids = torch.arange(0, VOCAB, 3)
    args = (seq.features[None].float(), seq.input_ids[None], anchors[None], keep[None])
    with torch.no_grad():
        full, sub = drafter.forward_train(*args), drafter.forward_train(*args, ids)
    assert torch.allclose(sub.logits, full.logits[..., ids], atol=1e-5)


def test_fit_over_a_draft_vocabulary_trains_and_ships_it(target, cache_dir, tmp_path):
    # every token the answers use (so the loss can fall as far as over all V) + the even ids
    reader = CacheReader(cache_dir)
    used = torch.cat([reader.get(k).input_ids.long() for k in reader.keys])
    ids = torch.unique(torch.cat([used, torch.arange(0, VOCAB, 2)]))
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert 0 < int(outside.sum())
    vocab_dir = tmp_path / "vocab"
    vocab_dir.mkdir()
    draft_vocab.save(vocab_dir, ids, {"size": ids.numel()})
    trainer = Trainer(target, cache_dir, tmp_path / "run", options(steps=12, draft_vocab=str(vocab_dir)),
                      progress=False)
    recs = trainer.fit()
    first, last = sum(r["loss"] for r in recs[:2]) / 2, sum(r["loss"] for r in recs[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    (vocab_dir / draft_vocab.VOCAB_FILE).unlink()  # the run kept its own copy
    assert torch.equal(load_run_model(tmp_path / "run", target).draft_vocab, ids)
    out = export_run(tmp_path / "run", tmp_path / "export", dtype=torch.float32)
    assert torch.equal(draft_vocab.load(out, VOCAB), ids)
    # rows of W2 outside the vocabulary are never used, so they are never trained
    w2 = trainer.model.markov_head.markov_w2.weight
    init = Trainer(target, cache_dir, tmp_path / "init", options(steps=12), progress=False).model
    assert torch.equal(w2[outside], init.markov_head.markov_w2.weight[outside])
    assert not torch.equal(w2[ids], init.markov_head.markov_w2.weight[ids])
    with pytest.raises(Exception, match="no draft_vocab"):
        Trainer(target, cache_dir, tmp_path / "bad", options(draft_vocab=str(tmp_path)), progress=False)


def test_validate_scores_the_same_blocks_for_every_drafter(target, cache_dir, tmp_path):
    from drafter_svc.train.validate import heldout_figures

    reader = CacheReader(cache_dir, None)  # the toy cache is too small for a held-out split
    Trainer(target, cache_dir, tmp_path / "run", options(steps=12), progress=False).fit()
    trained = load_run_model(tmp_path / "run", target)
    fresh = build_model(trained.config, target, 0).eval()
    a, b = heldout_figures(trained, reader), heldout_figures(trained, reader)
    assert a == b and a["blocks"] > 0 and 1.0 <= a["tau_prob"] <= 1.0 + trained.config.block_size
    f = heldout_figures(fresh, reader)
    assert f["blocks"] == a["blocks"]  # same anchors
    assert a["ce"] < f["ce"] and a["tau_prob"] > f["tau_prob"]  # these sequences were trained on
    assert len(a["accept_by_slot"]) == trained.config.block_size


def test_validate_figures_do_not_depend_on_the_order_caches_are_named_in(target, cache_dir, tmp_path):
    """Anchors are seeded per sequence, so naming the same caches in another order scores the same blocks."""
    from drafter_svc.train.validate import heldout_figures

    other = tmp_path / "other"
    toy_cache(target, other, n=5, seed=3)
    model = build_model(draft_config(target.config, [0, 1], options()), target, 0).eval()
    # few anchors per sequence, so which ones are drawn matters
    a = heldout_figures(model, CacheReader([cache_dir, other], None), num_anchors=3)
    b = heldout_figures(model, CacheReader([other, cache_dir], None), num_anchors=3)
    assert a == b and a["blocks"] > 0


# ------------------------------------------------------------------ calibration


def test_calibration_lowers_ece_of_an_over_confident_head(target, cache_dir, tmp_path):
    # Heldout split of the toy keys may be empty: calibrate on all cached sequences.
    Trainer(target, cache_dir, tmp_path / "run", options(steps=4), progress=False).fit()
    model = load_run_model(tmp_path / "run", target)
    with torch.no_grad():  # a head that claims every slot is accepted
        model.confidence_head.proj.bias.fill_(6.0)
    reader = CacheReader(cache_dir, None)
    conf, acc, valid = greedy_rounds(model, reader.get(reader.keys[0]))
    assert conf.shape == acc.shape == valid.shape and conf.shape[1] == 4
    # validity is prefix-closed, like DeepSpec's cumulative eval mask
    assert torch.equal(valid, valid.to(torch.int64).cumprod(1).bool())
    result = calibrate(model, reader, max_anchors=32, plot=tmp_path / "rel.png")
    s = result["report"]["summary"]
    assert s["ece_after"] < s["ece_before"] and s["ece_before"] > 0.3
    assert len(result["temperatures"]) == 4 and max(result["temperatures"]) > 1.0
    assert (tmp_path / "rel.png").stat().st_size > 0


# ------------------------------------------------------------------ eval arithmetic


def test_summarize_by_hand():
    rounds = [RoundOutcome(3, 3, 4), RoundOutcome(3, 1, 2), RoundOutcome(3, 0, 1), RoundOutcome(2, 2, 3),
              RoundOutcome(3, 2, 2, stopped_on_draft=True)]
    s = summarize(rounds, 3)
    assert s["rounds"] == 5
    assert s["tau"] == pytest.approx((4 + 2 + 1 + 3 + 2) / 5)
    assert s["tau_uncapped"] == pytest.approx((4 + 2 + 1 + 3 + 2) / 5)
    # position 1: 4 of 5 accepted; position 2: m>=2 in 3 of the 4 that reached it;
    # position 3: of rounds with m>=2 that verified 3 drafts (the n=2 round did not), 1 of 2.
    assert s["conditional_acceptance"] == pytest.approx([4 / 5, 3 / 4, 1 / 2])
    assert s["prefix_survival"] == pytest.approx([4 / 5, 3 / 5, 1 / 4])


@dataclass
class _Stack:
    loop: DecodeLoop
    stop_ids: frozenset = frozenset()

    def encode(self, ids):
        return ids

    def generate(self, prompt_ids, *, max_new_tokens, sampling, draft_length):
        return self.loop.generate(GenerationRequest(list(prompt_ids), max_new_tokens, sampling, draft_length,
                                                    self.stop_ids))


@pytest.mark.parametrize("bad_at", [None, 2])
def test_eval_on_a_tiny_model(target, bad_at):
    engine = TargetEngine(target, feature_layer_ids=[0])
    oracle = OracleProposer(target, engine, block_size=5)
    oracle.force_bad_at = bad_at
    stack = _Stack(DecodeLoop(engine, oracle))
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31]]
    res = evaluate(stack, prompts, block_size=5, max_new_tokens=25, temperature=0.0, progress=False)
    # Cross-check against the loop's own counters.
    results = [stack.generate(p, max_new_tokens=25, sampling=__import__("dspark_common.types").types.SamplingParams(),
                              draft_length=5) for p in prompts]
    rounds = sum(r.stats.rounds for r in results)
    assert res["rounds"] == rounds and res["prompts"] == 2
    assert res["tau"] == pytest.approx(sum(r.stats.generated_tokens for r in results) / rounds)
    cond = res["conditional_acceptance"]
    if bad_at is None:  # the oracle is always right: every round accepts its whole block
        assert all(c == 1.0 for c in cond)
        assert res["tau"] > 4.0
    else:  # slot 3 (1-based) is always wrong: accept 1, 1, then 0, never reached after
        assert cond[:3] == [1.0, 1.0, 0.0] and cond[3] is None and cond[4] is None
        assert res["tau_uncapped"] == pytest.approx(3.0)


@pytest.mark.parametrize("stop,lookup,vocab", [(False, False, False), (True, False, False), (False, True, False),
                                               (True, True, False), (True, False, True), (False, True, True)])
def test_greedy_replay_matches_the_decode_loop_round_for_round(target, stop, lookup, vocab):
    """`dspark eval --replay` must count exactly the rounds DecodeLoop runs (same block, greedy),
    with copies from the sequence (`--ngram-lookup`) as well, and with a draft vocabulary (the
    replay then projects onto it as the engine does)."""
    from drafter_svc.loading import draft_engine
    from verifier_svc.ngram_lookup import LookupConfig
    from verifier_svc.scheduler import SpsTable
    from drafter_svc.train.replay import greedy_paths, replay_path
    from tests.tiny_models import tiny_drafter

    drafter = tiny_drafter(target, block_size=6)
    engine = TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids)
    prompts = [[5, 9, 13, 2], [7, 7, 1, 30, 31], [3, 4]]
    plain = [DecodeLoop(engine, None).generate(GenerationRequest(p, 30, draft_length=0)).token_ids for p in prompts]
    # Make the drafter propose the path's most frequent token after every token, so rounds accept
    # 0..5 drafts (a random drafter would accept nothing and test nothing).
    flat = [t for row in plain for t in row]
    favourite = max(set(flat), key=flat.count)
    stop_ids = frozenset({plain[0][12]}) if stop else frozenset()
    with torch.no_grad():
        drafter.markov_head.markov_w1.weight.fill_(1.0)
        drafter.markov_head.markov_w2.weight.zero_()
        drafter.markov_head.markov_w2.weight[favourite] = 50.0
    if vocab:  # every third id and the favourite: the drafter can propose neither of the others
        drafter.draft_vocab = torch.tensor(sorted(set(range(0, target.config.vocab_size, 3)) | {favourite}))
    cfg = LookupConfig(min_n=1, max_n=2) if lookup else None
    # flat costs: the scheduler keeps whole copies, which is what the replay assumes
    loop = DecodeLoop(engine, draft_engine(drafter), lookup=cfg, sps=SpsTable({1: 100.0, 16: 95.0}))
    paths = greedy_paths(target, prompts, max_new_tokens=30, stop_ids=stop_ids,
                         layer_ids=drafter.config.target_layer_ids, batch_size=2)
    accepted = copies = 0
    for prompt, path in zip(prompts, paths):
        real = loop.generate(GenerationRequest(prompt, 30, draft_length=5, stop_ids=stop_ids))
        assert path.tokens == real.token_ids and path.path_mismatches == 0
        want = [outcome_of_round(r, stop_ids) for r in real.rounds]
        got = replay_path(drafter, path, block_size=5, max_new_tokens=30, stop_ids=stop_ids, lookup=cfg)
        assert got == want
        accepted += sum(o.accepted for o in got)
        copies += real.stats.lookup_rounds
    assert accepted > 0 and (copies > 0) == lookup


def test_datagen_writes_the_same_cache_as_a_second_pass(tmp_path):
    """`datagen --cache` takes features and top-k from the generation's own forwards; they must match
    what `train cache` computes with one full forward over prompt + answer."""
    import argparse

    from drafter_svc.train import datagen
    from drafter_svc.train.cache import CacheReader, build_cache
    from verifier_svc.target_loading import load_target

    prompts = tmp_path / "train" / "toy.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in
                               ["What is 2+2?", "Name a colour.", "Write a haiku about rain in Paris."]))
    args = argparse.Namespace(model="smollm2", prompts=[str(prompts)], out=str(tmp_path / "data"), max_new_tokens=20,
                              max_prompt_tokens=384, batch_size=2, limit=0, skip=0, seed=0, threads=1, sampling="greedy",
                              shard="0/1", cache=str(tmp_path / "fused"), cache_max_length=560)
    datagen.generate(args)
    target = load_target("smollm2").model
    fused = CacheReader(tmp_path / "fused", None)
    build_cache(target, tmp_path / "data", tmp_path / "two_pass", fused.manifest["target_layer_ids"],
                max_length=560, progress=False)
    ref = CacheReader(tmp_path / "two_pass", None)
    assert fused.keys == ref.keys and len(fused.keys) >= 2  # answers under 14 tokens are dropped by both
    for key in fused.keys:
        a, b = fused.get(key), ref.get(key)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
        n = a.input_ids.shape[0] - 1  # the last position's features are not produced by generation
        assert torch.allclose(a.features[:n].float(), b.features[:n].float(), rtol=2e-2, atol=2e-2)
        need = b.loss_mask[1:].nonzero().squeeze(-1)
        assert torch.equal(a.topk_ids[need, 0], b.topk_ids[need, 0])
        assert torch.allclose(a.topk_probs[need], b.topk_probs[need], atol=2e-3)


def test_greedy_drafts_of_many_anchors_equal_each_anchor_alone(target):
    """Batching the replay's blocks must not mix blocks (the Markov bias is per block)."""
    from drafter_svc.train.replay import greedy_drafts
    from tests.tiny_models import tiny_drafter

    drafter = tiny_drafter(target, block_size=5)
    with torch.no_grad():  # make the sequential head matter
        drafter.markov_head.markov_w2.weight.normal_(0, 2.0)
    ids = torch.randint(0, target.config.vocab_size, (40,))
    feats = torch.randn(40, drafter.config.context_feature_size)
    anchors = torch.arange(5, 35)
    keep = torch.ones_like(anchors, dtype=torch.bool)
    out = drafter.forward_train(feats[None], ids[None], anchors[None], keep[None])
    together, conf = greedy_drafts(drafter, out, ids[anchors])
    for j, a in enumerate(anchors.tolist()):
        one = drafter.forward_train(feats[None], ids[None], torch.tensor([[a]]), torch.ones(1, 1, dtype=torch.bool))
        alone, conf1 = greedy_drafts(drafter, one, ids[a : a + 1])
        assert together[j].tolist() == alone[0].tolist()
        assert torch.allclose(conf[j], conf1[0], atol=1e-5)
