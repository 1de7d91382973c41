"""Sequential Temperature Scaling and calibration diagnostics (drafter_svc/calibration.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter_svc.calibration import (
    DEFAULT_GRID,
    apply_temperatures,
    auroc,
    calibration_report,
    ece,
    fit_sts,
    plot_reliability,
)

PROPERTY = settings(max_examples=100, deadline=None)
TRUE_TAU = 3.0


def overconfident_rounds(n: int, slots: int, seed: int, ragged: bool = False):
    """Recorded rounds whose head reports σ(z) while slot k is really accepted (given the earlier
    ones) with probability σ(z / 3): over-confident by a temperature of 3 at every slot."""
    g = torch.Generator().manual_seed(seed)
    # Mostly-accepted drafts (σ(4.5/3) ≈ 0.82 at the median), so later slots keep enough surviving
    # prefixes to be identifiable.
    z = 4.5 + 4.0 * torch.randn(n, slots, generator=g)
    accepted = (torch.rand(n, slots, generator=g) < torch.sigmoid(z / TRUE_TAU)).to(torch.int64)
    if ragged:  # rounds verified different numbers of slots
        lengths = torch.randint(0, slots + 1, (n, 1), generator=g)
        valid = torch.arange(slots)[None, :] < lengths
    else:
        valid = torch.ones(n, slots, dtype=torch.bool)
    return z, accepted, valid


# ------------------------------------------------------------------------------------------------
# ece and auroc


def test_ece_hand_example():
    # Bin 2 (0.10..0.15): preds 0.1, 0.1, targets 0, 1 → |0.1 − 0.5| = 0.4, weight 2/4.
    # Bin 19 (0.95..1]: preds 1.0, 0.95, targets 1, 1 → |0.975 − 1| = 0.025, weight 2/4.
    pred = torch.tensor([0.1, 0.1, 1.0, 0.95])
    target = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert ece(pred, target) == pytest.approx(0.5 * 0.4 + 0.5 * 0.025)
    assert ece(torch.zeros(0), torch.zeros(0)) == 0.0


@PROPERTY
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), min_size=1, max_size=50))
def test_ece_bounds_and_single_bin_identity(rows):
    pred = torch.tensor([p for p, _ in rows], dtype=torch.float64)
    target = torch.tensor([float(t) for _, t in rows], dtype=torch.float64)
    value = ece(pred, target)
    assert 0.0 <= value <= 1.0 + 1e-12
    # With one bin, ECE is |mean pred − mean target|.
    assert ece(pred, target, n_bins=1) == pytest.approx(abs(float(pred.mean() - target.mean())), abs=1e-12)


def test_auroc_examples():
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == 0.5  # ties count half
    assert auroc(torch.tensor([0.3, 0.7, 0.5]), torch.tensor([0, 1, 0])) == 1.0
    assert auroc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])) is None


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_auroc_matches_pairwise_definition(rows):
    scores = torch.tensor([float(s) for s, _ in rows])
    labels = torch.tensor([y for _, y in rows])
    pos = [s for s, y in rows if y]
    neg = [s for s, y in rows if not y]
    value = auroc(scores, labels)
    if not pos or not neg:
        assert value is None
        return
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert value == pytest.approx(pairs / (len(pos) * len(neg)))


# ------------------------------------------------------------------------------------------------
# fit_sts


def test_default_grid():
    assert len(DEFAULT_GRID) == 101
    assert DEFAULT_GRID[0] == 0.25 and DEFAULT_GRID[-1] == 8.0 and 1.0 in DEFAULT_GRID


@pytest.mark.parametrize("ragged", [False, True])
def test_sts_recovers_the_temperature_and_removes_the_miscalibration(ragged):
    z, accepted, valid = overconfident_rounds(20_000, 4, seed=3, ragged=ragged)
    temps = fit_sts(z, accepted, valid)
    assert len(temps) == 4
    # The ECE surface is flat near its minimum and later slots see fewer surviving prefixes (and
    # ragged rounds fewer verified slots), so the first slots are pinned tighter than the last.
    assert all(2.65 < tau < 3.4 for tau in temps[:2]), temps
    assert all(2.2 < tau < 4.0 for tau in temps), temps
    report = calibration_report(z, accepted, valid, temps)
    for slot in report["slots"]:
        assert slot["ece_before"] > 0.05, slot  # σ(z) is far from σ(z/3)
        assert slot["ece_after"] < 0.3 * slot["ece_before"], slot
        assert slot["ece_after"] < 0.025, slot
        assert slot["brier_after"] < slot["brier_before"], slot
    assert report["summary"]["ece_after"] < 0.25 * report["summary"]["ece_before"]


def test_sts_keeps_a_calibrated_head_near_one():
    g = torch.Generator().manual_seed(5)
    z = 3.0 * torch.randn(20_000, 2, generator=g)
    accepted = (torch.rand(20_000, 2, generator=g) < torch.sigmoid(z)).to(torch.int64)
    temps = fit_sts(z, accepted, torch.ones_like(accepted, dtype=torch.bool))
    assert all(0.85 < t < 1.18 for t in temps), temps


def test_sts_is_order_preserving():
    z, accepted, valid = overconfident_rounds(5_000, 3, seed=11)
    temps = fit_sts(z, accepted, valid)
    report = calibration_report(z, accepted, valid, temps)
    for slot in report["slots"]:
        # Each slot's own ranking is untouched, so its conditional AUROC is identical ...
        assert slot["auroc_conditional_after"] == pytest.approx(slot["auroc_conditional_before"], abs=1e-12)
        assert slot["auroc_conditional_before"] > 0.7  # ... and informative
    # ... and at the first slot the cumulative product is that confidence, so its AUROC too.
    first = report["slots"][0]
    assert first["auroc_after"] == pytest.approx(first["auroc_before"], abs=1e-12)
    calibrated = apply_temperatures(z, temps)
    for k in range(3):
        assert torch.equal(calibrated[:, k].argsort(), torch.sigmoid(z[:, k].double()).argsort())


def test_sts_ignores_what_it_must_not_see():
    # Only the accepted-prefix indicator and prefix-closed validity matter: acceptance values after
    # a rejection, anything at unverified slots, and "valid" flags after an unverified slot can be
    # anything without changing the fit.
    z, accepted, valid = overconfident_rounds(5_000, 4, seed=21, ragged=True)
    g = torch.Generator().manual_seed(22)
    noise = lambda: torch.rand(z.shape, generator=g) < 0.5  # noqa: E731
    after_rejection = accepted.cumprod(1).roll(1, 1).index_fill(1, torch.tensor([0]), 1) == 0
    scrambled_accepted = torch.where(after_rejection | ~valid, noise().to(torch.int64), accepted)
    scrambled_z = torch.where(valid, z, 50.0 * torch.randn(z.shape, generator=g))
    after_invalid = valid.cumprod(1).roll(1, 1).index_fill(1, torch.tensor([0]), 1) == 0
    scrambled_valid = torch.where(after_invalid, noise(), valid)
    assert fit_sts(scrambled_z, scrambled_accepted, scrambled_valid) == fit_sts(z, accepted, valid)


def test_slot_without_valid_rows_keeps_temperature_one():
    z = torch.randn(10, 2)
    valid = torch.zeros(10, 2, dtype=torch.bool)
    valid[:, 0] = True
    assert fit_sts(z, torch.ones(10, 2), valid, grid=[0.5, 2.0, 4.0])[1] == 1.0


def test_custom_grid_is_used():
    z, accepted, valid = overconfident_rounds(2_000, 1, seed=2)
    assert fit_sts(z, accepted, valid, grid=[0.5, 1.0, 3.0, 6.0]) == [3.0]


@pytest.mark.parametrize(
    "bad",
    [
        dict(accepted=torch.ones(4, 3)),  # shape mismatch
        dict(grid=[1.0, -2.0]),
        dict(grid=[]),
        dict(conf_logits=torch.tensor([[float("nan"), 0.0]] * 4)),
    ],
)
def test_bad_inputs_are_rejected(bad):
    args = dict(conf_logits=torch.zeros(4, 2), accepted=torch.ones(4, 2), valid=torch.ones(4, 2, dtype=torch.bool))
    args.update(bad)
    with pytest.raises(ValueError):
        fit_sts(**args)


# ------------------------------------------------------------------------------------------------
# Report and diagram


def test_report_is_json_serialisable_and_complete():
    z, accepted, valid = overconfident_rounds(1_000, 3, seed=8, ragged=True)
    report = calibration_report(z, accepted, valid, [3.0, 3.0, 3.0])
    json.dumps(report, allow_nan=False)
    assert [s["slot"] for s in report["slots"]] == [0, 1, 2]
    assert report["summary"]["n"] == sum(s["n"] for s in report["slots"]) == int(valid.sum())
    assert set(report["summary"]) >= {"ece_before", "ece_after", "brier_before", "brier_after", "auroc_before", "auroc_after"}


def test_plot_reliability_writes_a_png(tmp_path):
    z, accepted, valid = overconfident_rounds(2_000, 5, seed=4)
    temps = fit_sts(z, accepted, valid)
    out = plot_reliability(z, accepted, valid, temps, tmp_path / "reliability.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
