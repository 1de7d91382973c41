"""The small-batch CPU linear kernel: agrees with F.linear, is batch-invariant (a row's output does
not depend on the rows beside it), routes only what it should, and keeps decoding lossless."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspark_common import small_batch_linear as sbl
from drafter_svc.loading import draft_engine
from tests.tiny_models import tiny_drafter, tiny_target
from verifier_svc.decode_loop import DecodeLoop, GenerationRequest
from verifier_svc.scheduler import SpsTable
from verifier_svc.target_engine import TargetEngine

pytestmark = pytest.mark.skipif(not sbl.available(), reason="kernel not buildable here (no compiler or AVX2)")


@pytest.mark.parametrize("k", [576, 67])  # a multiple of 8 and one with a scalar tail
def test_matches_f_linear_for_every_row_count(k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, k, generator=g)
    b = torch.randn(300, generator=g)
    for rows in range(1, 20):
        x = torch.randn(rows, k, generator=g)
        torch.testing.assert_close(sbl.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sbl.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    x3 = torch.randn(2, 3, k, generator=g)  # leading dims are flattened and restored
    assert sbl.linear(x3, w).shape == (2, 3, 300)
    torch.testing.assert_close(sbl.linear(x3, w), F.linear(x3, w), rtol=1e-5, atol=1e-4)


def test_batch_invariant_bitwise():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=g)
    x = torch.randn(16, 576, generator=g)
    alone = torch.cat([sbl.linear(x[i : i + 1], w) for i in range(16)])
    for rows in (2, 5, 8, 9, 16):
        assert torch.equal(sbl.linear(x[:rows], w), alone[:rows]), rows
    # and F.linear is not (why the kernel exists): the same rows differ between 1-row and 8-row calls
    # on most BLAS builds; not asserted, it is BLAS's business.


def test_bad_inputs_raise():
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="features"):
        sbl.linear(torch.randn(2, 15), w)
    with pytest.raises(RuntimeError, match="float32"):
        sbl.linear(torch.randn(2, 16, dtype=torch.float64), w.double())


def test_install_routes_inference_only_and_keeps_training_exact():
    layer = torch.nn.Linear(32, 40)
    model = torch.nn.Sequential(layer)
    assert sbl.install(model) == 1
    x = torch.randn(3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # with autograd the layer takes F.linear: gradients flow as before
    out = model(x.requires_grad_())
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    # many rows (a prefill) take F.linear: bitwise what BLAS gives
    big = torch.randn(sbl.MAX_ROWS + 1, 32)
    with torch.inference_mode():
        assert torch.equal(model(big), F.linear(big, layer.weight, layer.bias))
    sbl.uninstall(model)
    assert "forward" not in layer.__dict__


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_identity_with_kernel(kind):
    """Target and drafter both on the kernel: every draft length gives the target-only tokens."""
    target = tiny_target(kind)
    drafter = tiny_drafter(target)
    assert sbl.install(target) > 0 and sbl.install(drafter) > 0
    engine = TargetEngine(target, feature_layer_ids=drafter.config.target_layer_ids)
    loop = DecodeLoop(engine, draft_engine(drafter), sps=SpsTable({1: 100.0, 16: 95.0}))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        prompt = torch.randint(0, 254, (7,), generator=g).tolist()
        want = loop.generate(GenerationRequest(prompt, 20, draft_length=0)).token_ids
        for dl in [1, 3, 7, "auto"]:
            assert loop.generate(GenerationRequest(prompt, 20, draft_length=dl)).token_ids == want, dl
