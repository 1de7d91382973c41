"""The draft vocabulary (drafter_svc/draft_vocab.py): choosing it, storing it with a checkpoint,
and the losslessness of decoding with it (greedy identity here; sampling in test_sampling_lossless)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from safetensors.torch import save_file

from drafter_svc import draft_vocab
from drafter_svc.checkpoint import load_checkpoint, save_checkpoint
from drafter_svc.loading import draft_engine
from dspark_common.errors import FailedPrecondition, InvalidRequest
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.target_engine import TargetEngine


def test_choose_and_coverage_by_hand():
    counts = draft_vocab.count_tokens([[3, 3, 3, 1, 1, 0], [5, 1, 3]], vocab_size=6)
    assert counts.tolist() == [1, 3, 0, 4, 0, 1]
    # Top 2 by count are 3 and 1; with 4 forced in, the most frequent other id is 3.
    assert draft_vocab.choose(counts, 2).tolist() == [1, 3]
    assert draft_vocab.choose(counts, 2, always=[4]).tolist() == [3, 4]
    # Ties (0 and 5 both once) go to the lower id.
    assert draft_vocab.choose(counts, 3).tolist() == [0, 1, 3]
    assert draft_vocab.coverage(counts, torch.tensor([1, 3])) == pytest.approx(7 / 9)
    with pytest.raises(InvalidRequest):
        draft_vocab.choose(counts, 7)
    with pytest.raises(InvalidRequest):
        draft_vocab.count_tokens([[6]], vocab_size=6)


def test_vocab_travels_with_the_checkpoint_and_bad_files_are_refused(tmp_path):
    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    save_checkpoint(drafter, drafter.config, tmp_path)
    assert load_checkpoint(tmp_path).draft_vocab is None
    ids = torch.tensor([2, 5, 9, 40])
    draft_vocab.save(tmp_path, ids, {"size": 4})
    loaded = load_checkpoint(tmp_path)
    assert torch.equal(loaded.draft_vocab, ids)
    assert "draft_vocab" not in loaded.state_dict()  # not a weight: DeepSpec's format is untouched
    for bad in (torch.tensor([5, 2]), torch.tensor([1, drafter.config.vocab_size])):
        save_file({"ids": bad}, str(tmp_path / draft_vocab.VOCAB_FILE))
        with pytest.raises(FailedPrecondition, match="strictly increasing"):
            load_checkpoint(tmp_path)
    (tmp_path / draft_vocab.VOCAB_FILE).write_text("not safetensors")
    with pytest.raises(FailedPrecondition, match="not a draft vocabulary"):
        load_checkpoint(tmp_path)


def test_vocab_cli_counts_answers_and_reports_coverage(tmp_path, capsys):
    import argparse

    from drafter_svc.train import vocab

    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    save_checkpoint(drafter, drafter.config, tmp_path / "ckpt")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"key": f"k{i:02d}", "prompt_ids": [1], "answer_ids": [7, 7, 8, i % 3]} for i in range(20)]
    (data / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(answers=[str(data)], checkpoint=str(tmp_path / "ckpt"), size=4, held_out=0.1)
    assert vocab.run(args) == 0
    ids = load_checkpoint(tmp_path / "ckpt").draft_vocab.tolist()
    # 7 and 8 are the most frequent; k09 and k19 held out leave 0, 1, 2 six each: the lowest id wins, the stop token is always in.
    assert drafter.config.eos_token_id == 254 and ids == [0, 7, 8, 254]
    assert "held-out coverage" in capsys.readouterr().out
    # The gzipped copies archived under data/answers/ count the same, split across directories.
    for half, part in enumerate((rows[:10], rows[10:])):
        (tmp_path / f"archived{half}").mkdir()
        (tmp_path / f"archived{half}" / "answers.jsonl.gz").write_bytes(
            gzip.compress("".join(json.dumps(r) + "\n" for r in part).encode()))
    args.answers = [str(tmp_path / "archived1"), str(tmp_path / "archived0")]
    assert vocab.run(args) == 0
    assert load_checkpoint(tmp_path / "ckpt").draft_vocab.tolist() == ids
    args.answers = [str(tmp_path / "nothing-here")]
    with pytest.raises(InvalidRequest, match="no answers"):
        vocab.run(args)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_identity_with_a_draft_vocab(kind):
    """Tokens outside the draft vocabulary are never proposed, so the target must produce them
    itself: output is still exactly target-only greedy."""
    target = tiny_target(kind)
    drafter = tiny_drafter(target)
    v = drafter.config.vocab_size
    drafter.draft_vocab = torch.arange(0, v, 3)
    engine = TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids)
    loop = DecodeLoop(engine, draft_engine(drafter))
    base = DecodeLoop(TargetEngine(target, feature_layer_ids=[0]))
    for prompt in ([5, 9, 13, 2], [7, 7, 1, 30, 31]):
        want = base.generate(GenerationRequest(prompt, 24, draft_length=0)).token_ids
        assert any(t % 3 for t in want)  # the path needs tokens the drafter cannot propose
        for dl in (1, 4, 7):
            got = loop.generate(GenerationRequest(prompt, 24, draft_length=dl))
            assert got.token_ids == want, (kind, dl)
