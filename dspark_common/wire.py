"""Conversions between the domain types (`dspark_common.types`) and the shared `dspark.v1`
messages, in one place for every service: sampling parameters, proposals (validated on receipt)
and speculative statistics."""

from __future__ import annotations

import torch

from dspark_common.errors import InvalidRequest
from dspark_common.proto import common_pb2, drafter_pb2
from dspark_common.tensor_codec import FLOAT_DTYPES, INT_DTYPES, decode_tensor, encode_tensor
from dspark_common.types import Proposal, SamplingParams, SpeculativeStats

# q rows travel as float32; a row that sums further than this from 1 was not a distribution.
PROB_SUM_TOLERANCE = 1e-3


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
    if s.seed is not None:
        out.seed = s.seed
    return out


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Validated; an unset top_p (0) means 1.0."""
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
    ).validate()


def proposal_to_proto(p: Proposal, *, draft_ms: float = 0.0, batch_size: int = 1) -> drafter_pb2.Proposal:
    return drafter_pb2.Proposal(
        tokens=encode_tensor(p.tokens, torch.int64),
        q_ids=encode_tensor(p.q_ids, torch.int64),
        q_probs=encode_tensor(p.q_probs, torch.float32),
        confidences=encode_tensor(p.confidences, torch.float32),
        draft_ms=draft_ms,
        batch_size=batch_size,
    )


def proposal_from_proto(msg: drafter_pb2.Proposal, *, block_size: int, vocab_size: int) -> Proposal:
    """Decode and validate a proposal for a block of `block_size` slots: shapes and dtypes, ids in
    the vocabulary, q rows non-negative and summing to 1, each drafted token carried by its own q
    with positive probability (acceptance divides by it), confidences in [0, 1]."""
    n = block_size
    tokens = decode_tensor(msg.tokens, "proposal.tokens", dtypes=INT_DTYPES, shape=(n,)).long()
    q_ids = decode_tensor(msg.q_ids, "proposal.q_ids", dtypes=INT_DTYPES, shape=(n, None)).long()
    k = int(q_ids.shape[1])
    if k < 1:
        raise InvalidRequest("proposal.q_ids has no entries per slot (K = 0)", "proposal.q_ids")
    q_probs = decode_tensor(msg.q_probs, "proposal.q_probs", dtypes=FLOAT_DTYPES, shape=(n, k)).float()
    conf = decode_tensor(msg.confidences, "proposal.confidences", dtypes=FLOAT_DTYPES, shape=(n,)).float()
    for name, ids in (("tokens", tokens), ("q_ids", q_ids)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise InvalidRequest(
                f"proposal.{name} has ids outside the vocabulary 0..{vocab_size - 1}", f"proposal.{name}"
            )
    if q_probs.numel() and float(q_probs.min()) < 0:
        raise InvalidRequest("proposal.q_probs has negative probabilities", "proposal.q_probs")
    sums = q_probs.sum(-1)
    if n and float((sums - 1).abs().max()) > PROB_SUM_TOLERANCE:
        raise InvalidRequest(f"proposal.q_probs rows must sum to 1, got {sums.tolist()}", "proposal.q_probs")
    if not bool(((q_ids == tokens[:, None]) & (q_probs > 0)).any(-1).all()):
        raise InvalidRequest("a drafted token has zero probability under its own q", "proposal.q_probs")
    if conf.numel() and (float(conf.min()) < 0 or float(conf.max()) > 1):
        raise InvalidRequest("proposal.confidences must lie in [0, 1]", "proposal.confidences")
    return Proposal(tokens, q_ids, q_probs, conf)


def stats_to_proto(s: SpeculativeStats) -> common_pb2.SpeculativeStats:
    d = s.to_dict()
    return common_pb2.SpeculativeStats(
        rounds=s.rounds,
        draft_tokens=s.draft_tokens,
        accepted_draft_tokens=s.accepted_draft_tokens,
        generated_tokens=s.generated_tokens,
        mean_accepted_length=s.mean_accepted_length,
        accepted_by_position=d["accepted_by_position"],
        proposed_by_position=d["proposed_by_position"],
        fallback_rounds=s.fallback_rounds,
        lookup_rounds=s.lookup_rounds,
    )
