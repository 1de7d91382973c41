"""The wire formats: tensor codec round trips and validation, proposal validation, the error ->
gRPC status mapping, stub generation, and the feature bytes per accepted token."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_common import protogen
from dspark_common.errors import FailedPrecondition, InvalidRequest, NotFound, ResourceExhausted, Unavailable
from dspark_common.grpc_status import details_of, error_from_status, session_error, status_of
from dspark_common.proto import common_pb2, drafter_pb2
from dspark_common.tensor_codec import DTYPES, decode_tensor, encode_tensor
from dspark_common.types import Proposal
from dspark_common.wire import proposal_from_proto, proposal_to_proto


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(sorted(DTYPES)), shape=st.lists(st.integers(0, 5), min_size=0, max_size=3))
def test_tensor_round_trip(dtype, shape):
    t = (torch.randn(shape) * 100).to(DTYPES[dtype])
    msg = encode_tensor(t)
    assert msg.dtype == dtype and list(msg.shape) == shape
    back = decode_tensor(drafter_pb2.Proposal.FromString(drafter_pb2.Proposal(tokens=msg).SerializeToString()).tokens,
                         "t")
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_tensor_validation():
    good = encode_tensor(torch.randn(3, 4))
    bad_cases = [
        (dict(dtype="complex64"), {}, "unknown dtype"),
        (dict(), dict(dtypes=("int64",)), "must have dtype int64"),
        (dict(shape=[3, 5]), {}, "bytes"),
        (dict(data=good.data[:-1]), {}, "bytes"),
        (dict(shape=[-3, -4]), {}, "negative"),
        (dict(), dict(shape=(None, 5)), "shape [n, 5]"),
        (dict(), dict(shape=(3,)), "shape"),
        (dict(), dict(max_elements=11), "at most 11"),
        (dict(data=encode_tensor(torch.tensor([[1.0, float("inf"), 0, 0]] * 3)).data), {}, "non-finite"),
        (dict(dtype=""), {}, "missing"),
    ]
    for change, kwargs, words in bad_cases:
        msg = type(good)()
        msg.CopyFrom(good)
        for k, v in change.items():
            if k == "shape":
                del msg.shape[:]
                msg.shape.extend(v)
            else:
                setattr(msg, k, v)
        with pytest.raises(InvalidRequest) as e:
            decode_tensor(msg, "features", **kwargs)
        assert words in str(e.value) and e.value.field == "features", (change, str(e.value))
    assert decode_tensor(good, "f", shape=(None, 4), finite=True).shape == (3, 4)


def _proposal(n=3, k=2, vocab=10) -> Proposal:
    tokens = torch.arange(n)
    q_ids = torch.stack([tokens, (tokens + 1) % vocab], 1)[:, :k]
    q_probs = torch.tensor([[0.75, 0.25][:k]] * n)
    q_probs = q_probs / q_probs.sum(-1, keepdim=True)
    return Proposal(tokens, q_ids, q_probs, torch.full((n,), 0.5))


def test_proposal_validation():
    p = _proposal()
    back = proposal_from_proto(proposal_to_proto(p), block_size=3, vocab_size=10)
    assert torch.equal(back.tokens, p.tokens) and torch.equal(back.q_probs, p.q_probs)
    breakages = {
        "tokens has ids outside the vocabulary": lambda q: q.tokens.__setitem__(0, 10),
        "q_ids has ids outside": lambda q: q.q_ids.__setitem__((1, 1), -1),
        "sum to 1": lambda q: q.q_probs.mul_(0.9),
        "negative": lambda q: q.q_probs.__setitem__((0, 1), -0.25) or q.q_probs.__setitem__((0, 0), 1.25),
        "zero probability under its own q": lambda q: q.q_ids.__setitem__((2, 0), 7),
        "confidences": lambda q: q.confidences.__setitem__(1, 1.5),
    }
    for words, breaking in breakages.items():
        q = _proposal()
        breaking(q)
        with pytest.raises(InvalidRequest) as e:
            proposal_from_proto(proposal_to_proto(q), block_size=3, vocab_size=10)
        assert words in str(e.value), (words, str(e.value))
    with pytest.raises(InvalidRequest, match=r"shape \[4\]"):
        proposal_from_proto(proposal_to_proto(p), block_size=4, vocab_size=10)
    nan = _proposal()
    nan.confidences[0] = float("nan")
    with pytest.raises(InvalidRequest, match="non-finite"):
        proposal_from_proto(proposal_to_proto(nan), block_size=3, vocab_size=10)


def test_status_mapping_both_ways():
    cases = [(InvalidRequest("bad", "top_p"), grpc.StatusCode.INVALID_ARGUMENT),
             (NotFound("who"), grpc.StatusCode.NOT_FOUND),
             (FailedPrecondition("stale"), grpc.StatusCode.FAILED_PRECONDITION),
             (ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
             (Unavailable("gone"), grpc.StatusCode.UNAVAILABLE)]
    for err, code in cases:
        assert status_of(err) == code
        back = error_from_status(code, details_of(err))
        assert type(back) is type(err)
        assert session_error(err).code == code.value[0]
    assert details_of(InvalidRequest("bad value", "top_p")) == "bad value (field: top_p)"
    assert status_of(RuntimeError("x")) == grpc.StatusCode.INTERNAL


def test_stubs_regenerate_when_stale(tmp_path):
    out = tmp_path / "_proto"
    protogen.generate(out)
    assert protogen.is_fresh(out)
    (out / protogen.STAMP).write_text("old\n")
    assert not protogen.is_fresh(out)
    protogen.ensure(out)
    assert protogen.is_fresh(out)
    text = (out / "dspark" / "v1" / "drafter_pb2_grpc.py").read_text()
    assert "from dspark_common._proto.dspark.v1 import drafter_pb2" in text


def _context_bytes(n: int, width: int, kind: str, dtype: torch.dtype) -> int:
    m = drafter_pb2.DraftMessage(request_id=1, handle=common_pb2.KvHandle(session_id="s", length=100),
                                 draft=drafter_pb2.DraftSpec(anchor_token=1, anchor_pos=100 + n, block_size=7))
    m.context.start_pos = 100
    getattr(m.context, kind).CopyFrom(encode_tensor(torch.randn(n, width), dtype))
    return m.ByteSize()


def test_projected_fp16_features_cost_a_2T_th_of_raw_fp32():
    """Per accepted token at SmolLM2's shape (d = 576, T = 4 target layers): raw fp32 T*d*4 bytes,
    projected fp16 d*2 bytes (docs/SERVICES.md has the table)."""
    d, t = 576, 4
    per_token = {(kind, dt): (_context_bytes(5, d * (t if kind == "raw" else 1), kind, dt)
                              - _context_bytes(1, d * (t if kind == "raw" else 1), kind, dt)) / 4
                 for kind in ("raw", "projected") for dt in (torch.float32, torch.float16)}
    # (length prefixes grow by a byte or so between 1 and 5 tokens)
    assert per_token["raw", torch.float32] == pytest.approx(t * d * 4, abs=2)
    assert per_token["raw", torch.float16] == pytest.approx(t * d * 2, abs=2)
    assert per_token["projected", torch.float32] == pytest.approx(d * 4, abs=2)
    assert per_token["projected", torch.float16] == pytest.approx(d * 2, abs=2)
