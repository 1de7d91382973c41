"""Drafts copied from the sequence (verifier_svc/ngram_lookup.py): the index by hand, and greedy
identity through the decode loop with copies in play (sampling: test_sampling_lossless.py)."""

from __future__ import annotations

import pytest
import torch

from dspark_common.errors import InvalidRequest
from dspark_common.settings import GenerateSettings, VerifierSettings
from drafter_svc.loading import draft_engine
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.ngram_lookup import LookupConfig, NgramIndex
from verifier_svc.scheduler import SpsTable
from verifier_svc.target_engine import TargetEngine

CFG = LookupConfig(min_n=2, max_n=3)


def test_copies_what_followed_the_latest_occurrence():
    assert NgramIndex(CFG, [1, 2, 3, 9, 1, 2]).lookup(3) == ([3, 9, 1], 2)
    # the latest earlier occurrence of (1, 2) wins; the suffix never matches itself
    assert NgramIndex(CFG, [1, 2, 5, 1, 2, 7, 1, 2]).lookup(4) == ([7, 1, 2], 2)
    assert NgramIndex(CFG, [1, 2]).lookup(4) == ([], 0)
    # the longest suffix wins over a later shorter match
    assert NgramIndex(CFG, [4, 1, 2, 8, 0, 1, 2, 6, 4, 1, 2]).lookup(2) == ([8, 0], 3)
    # a 1-gram is not a match unless min_n allows it
    assert NgramIndex(CFG, [5, 6, 7, 5]).lookup(3) == ([], 0)
    assert NgramIndex(LookupConfig(1, 3), [5, 6, 7, 5]).lookup(3) == ([6, 7, 5], 1)
    assert NgramIndex(CFG, [1, 2, 3, 1, 2]).lookup(0) == ([], 0)


def test_incremental_index_equals_a_fresh_one():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 6, (300,), generator=g).tolist()
    grown = NgramIndex(CFG, seq[:5])
    for end in range(5, len(seq)):
        grown.extend(seq[len(grown.tokens) : end])
        if end % 3 == 0:  # look up at irregular points: catching up must not skip any end
            assert grown.lookup(5) == NgramIndex(CFG, seq[:end]).lookup(5), end


def test_proposal_is_a_point_mass():
    p = NgramIndex(CFG, [1, 2, 3, 9, 1, 2]).proposal(2)
    assert p.tokens.tolist() == [3, 9] and p.q_ids.tolist() == [[3], [9]] and p.q_probs.tolist() == [[1.0], [1.0]]
    assert p.source == "lookup" and p.truncate(1).source == "lookup"
    assert p.confidences.tolist() == pytest.approx(list(CFG.confidence[:2]))
    assert CFG.confidences(9).tolist() == pytest.approx(list(CFG.confidence) + [CFG.confidence[-1]] * 3)
    assert NgramIndex(CFG, [1, 2, 3]).proposal(4) is None


def test_bad_configuration():
    with pytest.raises(ValueError):
        LookupConfig(min_n=3, max_n=2)
    with pytest.raises(ValueError):
        LookupConfig(confidence=(0.5, 1.0))
    with pytest.raises(ValueError):
        LookupConfig(confidence=())
    assert GenerateSettings.from_sources(env={}).lookup_config() == LookupConfig(2, 3)
    assert VerifierSettings.from_sources(env={"DSPARK_NGRAM_LOOKUP": "false"}).lookup_config() is None
    with pytest.raises(InvalidRequest, match="lookup_min_ngram"):
        GenerateSettings.from_sources(env={"DSPARK_LOOKUP_MIN_NGRAM": "4"}).lookup_config()
    with pytest.raises(InvalidRequest, match="lookup_max_ngram"):
        GenerateSettings.from_sources(env={"DSPARK_LOOKUP_MAX_NGRAM": "0"})


def repetitive_prompts() -> list[list[int]]:
    # periodic prompts: tiny random targets fall into loops too, so copies are proposed and accepted
    return [[5, 6, 7, 8] * 3, [9, 3, 9, 3, 4, 9, 3], [11, 12, 13, 14, 15, 11, 12, 13]]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "deepseek_v4"])
@pytest.mark.parametrize("with_drafter", [True, False])
def test_greedy_identity_with_copies(kind, with_drafter):
    target = tiny_target(kind)
    drafter = tiny_drafter(target) if with_drafter else None
    layers = drafter.config.target_layer_ids if drafter is not None else [0]
    plain = DecodeLoop(TargetEngine(target, feature_layer_ids=layers))
    loop = DecodeLoop(TargetEngine(target, feature_layer_ids=layers),
                      draft_engine(drafter) if drafter is not None else None,
                      sps=SpsTable({1: 100.0, 16: 95.0}), lookup=CFG)
    copies = accepted = 0
    for prompt in repetitive_prompts():
        want = plain.generate(GenerationRequest(prompt, 40, draft_length=0)).token_ids
        for dl in [2, 5, "auto"]:
            got = loop.generate(GenerationRequest(prompt, 40, draft_length=dl))
            assert got.token_ids == want, (kind, dl)
            sources = {r.source for r in got.rounds}
            assert sources <= {"lookup", "drafter", ""}
            if not with_drafter:
                assert "drafter" not in sources
            copies += got.stats.lookup_rounds
            accepted += sum(r.accepted for r in got.rounds if r.source == "lookup")
            if dl != "auto":  # k sizes the drafter's blocks; copies are sized by the scheduler
                assert all(r.scheduled <= dl for r in got.rounds if r.source == "drafter")
        # draft length 0 stays target-only: no copies either
        assert loop.generate(GenerationRequest(prompt, 10, draft_length=0)).stats.lookup_rounds == 0
    assert copies > 0 and accepted > 0


def test_draft_length_sizes_the_drafter_not_copies():
    """A session's draft length k caps the drafter's blocks; a copy is offered up to the full
    block and cut by the scheduler (here: verification is nearly free, so it keeps all of it).
    Draft length 0 means no speculation at all."""
    from verifier_svc.decode_loop import DecodeSession

    target = tiny_target("llama")
    loop = DecodeLoop(TargetEngine(target, feature_layer_ids=[0]), None, sps=SpsTable({1: 100.0, 16: 95.0}),
                      lookup=CFG)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]

    def session(dl):
        s = DecodeSession("s", GenerationRequest(prompt, 40, draft_length=dl), torch.Generator(), torch.Generator(),
                          draft_length=dl, ngram=NgramIndex(CFG, prompt))
        s.output, s.anchor_pos = [2], len(prompt)
        return s

    for dl in (2, "auto"):
        s = session(dl)
        copy = loop.lookup_proposal(s)  # suffix (1, 2) recurs at the start: 3, 4, ... follow
        assert copy.tokens.tolist() == [3, 4, 5, 6, 7, 8, 9][: DecodeLoop.LOOKUP_BLOCK]
        assert loop.schedule(s, copy) == len(copy) > 2
    assert loop.lookup_proposal(session(0)) is None  # opened target-only: no speculation at all
    later_off = session(3)
    later_off.draft_length = 0  # the router's controller turned the drafter off mid-generation
    assert loop.draft_request(later_off) is None and loop.lookup_proposal(later_off) is not None
