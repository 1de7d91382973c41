"""`dspark train online` on tiny models: its batched, cache-free step computes the same loss as the
cached per-sequence fit over the same blocks, trains, and leaves a run that export and average take."""

from __future__ import annotations

import json

import pytest
import torch

from drafter_svc.loading import default_layer_ids
from drafter_svc.train.average import average_run
from drafter_svc.train.cache import CacheReader, build_cache
from drafter_svc.train.data import read_answers
from drafter_svc.train.export import export_run
from drafter_svc.train.fit import build_model, draft_config, load_run_model, sequence_sums
from drafter_svc.train.objective import block_targets, sample_anchors
from drafter_svc.train.online import OnlineOptions, OnlineTrainer, batch_sums, load_sequences, target_batch
from tests.test_training import write_answers
from tests.tiny_models import tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=0)


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    path = tmp_path_factory.mktemp("online") / "answers.jsonl"
    write_answers(path, n=40, seed=3)
    return path


def options(**kw) -> OnlineOptions:
    base = dict(batch_seqs=4, num_anchors=64, layers=1, markov_rank=8, block_size=4, lr=3e-3, seed=0, top_k=8,
                seconds=4.0, save_every=1000.0, alphas="0.5 1.0")
    base.update(kw)
    return OnlineOptions(**base)


def test_batched_online_sums_equal_the_cached_per_sequence_sums(target, answers, tmp_path):
    layers = default_layer_ids(int(target.config.num_hidden_layers))
    build_cache(target, answers, tmp_path / "cache", layers, top_k=8, batch_size=3, shard_size=8, progress=False)
    reader = CacheReader(tmp_path / "cache", None)
    opts = options()
    model = build_model(draft_config(target.config, layers, opts), target, seed=1)
    seqs = read_answers(answers)[:5]  # different lengths: the batch is right-padded
    assert len({len(s.input_ids) for s in seqs}) > 1
    gens = [torch.Generator().manual_seed(i) for i in range(len(seqs))]
    online = batch_sums(model, target_batch(target, layers, seqs, 8), [len(s.input_ids) for s in seqs], gens,
                        opts.num_anchors, None, None)
    ce = tv = conf = tau = 0.0
    for i, s in enumerate(seqs):
        cached = reader.get(s.key)
        anchors, keep = sample_anchors(cached.loss_mask, opts.num_anchors, torch.Generator().manual_seed(i), pad=True)
        labels, _, weights = block_targets(cached.input_ids, cached.loss_mask, anchors, keep, opts.block_size)
        ref = sequence_sums(model, cached, anchors, keep, labels, weights)
        ce, tv, conf = ce + float(ref.ce.detach()), tv + float(ref.tv.detach()), conf + float(ref.conf.detach())
        tau += ref.tau_prob
    assert online.blocks > 0
    for got, want in ((online.ce, ce), (online.tv, tv), (online.conf, conf), (online.tau_prob, tau)):
        assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_online_fit_trains_and_leaves_a_run_that_export_and_average_take(target, answers, tmp_path):
    train, held = load_sequences([str(answers)], max_length=0)
    assert train and held and not {s.key for s in held} & {s.key for s in train}
    layers = default_layer_ids(int(target.config.num_hidden_layers))
    # warm start from an export: the init the α scores interpolate with
    first = OnlineTrainer(target, train, held, tmp_path / "first", options(seconds=1.0, alphas=""), layers)
    first.fit()
    export_run(tmp_path / "first", tmp_path / "init", dtype=torch.float32)

    trainer = OnlineTrainer(target, train, held, tmp_path / "run", options(init_from=str(tmp_path / "init")), layers)
    assert trainer.score_heldout()[0] == pytest.approx(first.score_heldout()[0], abs=1e-4)
    summary = trainer.fit()
    recs = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(recs) == summary["steps"] >= 10
    early, late = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert late < early, (early, late)
    assert summary["heldout_tau_by_alpha"]["1.0"] == pytest.approx(trainer.score_heldout()[0], abs=1e-4)

    model = load_run_model(tmp_path / "run", target)
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(model.state_dict()[name], p.detach()), name
    averaged = average_run(tmp_path / "run", tmp_path / "avg", [0.5])
    assert averaged["init"] == str(tmp_path / "init")
    export_run(tmp_path / "avg", tmp_path / "export", dtype=torch.float32)
    assert (tmp_path / "export" / "config.json").is_file()


def test_a_heldout_cache_holds_the_heldout_split_alone(target, answers, tmp_path):
    """What calibrates a drafter trained online: the held-out slice cached without the rest."""
    layers = default_layer_ids(int(target.config.num_hidden_layers))
    added = build_cache(target, answers, tmp_path / "held", layers, top_k=8, batch_size=4, shard_size=8,
                        progress=False, split="heldout")
    held = [s.key for s in read_answers(answers) if s.split == "heldout"]
    assert added == len(held) > 0
    assert sorted(CacheReader(tmp_path / "held", None).keys) == sorted(held)
