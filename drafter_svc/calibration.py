"""Calibration of the confidence head: Sequential Temperature Scaling (DSpark paper §3.2.1).

Owns the post-hoc step between training and serving. The confidence head's c_k estimates
P(slot k accepted | slots < k accepted), and the scheduler multiplies them into prefix survival
probabilities a_k = Π_{i≤k} c_i, so their absolute values matter, not only their order. STS fits one
temperature per slot, left to right on held-out rounds: τ_k minimises the ECE of
Π_{i≤k} σ(z_i / τ_i) against the accepted-prefix indicator, with τ_1..τ_{k-1} already fixed.
Temperatures are positive, so each slot's ranking (and its conditional AUROC) is unchanged.

Also here: the diagnostics DeepSpec prints (per-slot ECE with 20 bins, AUROC, Brier on the
cumulative product) and a reliability diagram. Inputs are tensors of recorded rounds; no I/O except
the PNG that `plot_reliability` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

# Geometric grid 2^-2..2^3 = 0.25..8, 101 points ~3.5% apart, with 1.0 exactly (index 40). The
# paper leaves the grid unspecified; raw heads are usually over-confident (τ > 1), rarely by > 8×.
DEFAULT_GRID: tuple[float, ...] = tuple(2.0 ** (-2 + i / 20) for i in range(101))


def ece(pred: torch.Tensor, target: torch.Tensor, n_bins: int = 20) -> float:
    """Expected calibration error with equal-width bins (bin = floor(p·n_bins), clipped):
    Σ_bins (n_bin / n)·|mean pred − mean target|. 0.0 for no samples."""
    return float(_ece_columns(pred.double().reshape(-1, 1), target.double().reshape(-1), n_bins)[0])


def apply_temperatures(conf_logits: torch.Tensor, temps: Sequence[float]) -> torch.Tensor:
    """[..., B] confidence logits -> [..., B] calibrated per-slot confidences σ(z_k / τ_k)."""
    tau = torch.as_tensor(list(temps), dtype=torch.float64)
    if tau.shape != conf_logits.shape[-1:]:
        raise ValueError(f"need one temperature per slot ({conf_logits.shape[-1]}), got {len(tau)}")
    if not bool((tau > 0).all()):
        raise ValueError("temperatures must be > 0")
    return torch.sigmoid(conf_logits.double() / tau)


def fit_sts(
    conf_logits: torch.Tensor,
    accepted: torch.Tensor,
    valid: torch.Tensor,
    grid: Sequence[float] | torch.Tensor | None = None,
) -> list[float]:
    """Fit one temperature per slot, left to right (Sequential Temperature Scaling).

    conf_logits [N, B]: the head's logit z_k per recorded round and slot.
    accepted [N, B]: 1 if slot k was accepted given all earlier slots were (later values after a
        rejection are ignored: the target is the accepted-prefix indicator Π_{i≤k} accepted_i).
    valid [N, B]: slot k was verified in that round. A slot only counts if every earlier slot did
        too (validity is made prefix-closed), as with DeepSpec's cumulative eval mask.
    Returns τ_1..τ_B; a slot without valid rows keeps τ = 1. Among grid values tied for the lowest
    ECE the one closest to 1 (in log scale) wins, so uninformative slots are left alone."""
    logits, prefix_hit, mask = _check_rounds(conf_logits, accepted, valid)
    grid_t = torch.as_tensor(DEFAULT_GRID if grid is None else grid, dtype=torch.float64).reshape(-1)
    if grid_t.numel() == 0 or not bool((grid_t > 0).all()):
        raise ValueError("the temperature grid must be non-empty and positive")

    temps: list[float] = []
    survival = torch.ones(logits.shape[0], dtype=torch.float64)  # Π_{i<k} σ(z_i/τ_i), fitted so far
    for k in range(logits.shape[1]):
        rows = mask[:, k]
        if bool(rows.any()):
            # All candidate τ at once: [n_rows, G] predictions of the prefix survival at slot k.
            pred = survival[rows, None] * torch.sigmoid(logits[rows, k, None] / grid_t[None, :])
            errors = _ece_columns(pred, prefix_hit[rows, k])
            tied = errors <= errors.min() + 1e-12
            closeness = torch.where(tied, grid_t.log().abs(), torch.inf)
            temps.append(float(grid_t[int(closeness.argmin())]))
        else:
            temps.append(1.0)
        survival = survival * torch.sigmoid(logits[:, k] / temps[-1])
    return temps


def calibration_report(
    conf_logits: torch.Tensor, accepted: torch.Tensor, valid: torch.Tensor, temps: Sequence[float]
) -> dict:
    """Per-slot diagnostics before (raw σ) and after (temperatures) calibration, and their
    count-weighted means across slots in "summary".

    ece/brier/auroc score the cumulative product against the accepted-prefix indicator (what the
    scheduler consumes; DeepSpec's diagnostics). auroc_conditional scores the slot's own confidence
    against its acceptance among rounds whose earlier slots were all accepted (what the head
    predicts; temperature scaling cannot change it). AUROC is None where only one class occurs."""
    logits, prefix_hit, mask = _check_rounds(conf_logits, accepted, valid)
    num_slots = logits.shape[1]
    before = torch.sigmoid(logits)
    after = apply_temperatures(logits, temps)
    survival_before, survival_after = before.cumprod(1), after.cumprod(1)
    # Rounds that reached slot k with every earlier slot accepted.
    reached = torch.cat([torch.ones_like(prefix_hit[:, :1]), prefix_hit[:, :-1]], 1).bool() & mask

    slots = []
    for k in range(num_slots):
        rows, cond = mask[:, k], reached[:, k]
        y = prefix_hit[rows, k]
        slots.append(
            {
                "slot": k,
                "n": int(rows.sum()),
                "temperature": float(temps[k]),
                "ece_before": ece(survival_before[rows, k], y),
                "ece_after": ece(survival_after[rows, k], y),
                "brier_before": _brier(survival_before[rows, k], y),
                "brier_after": _brier(survival_after[rows, k], y),
                "auroc_before": auroc(survival_before[rows, k], y),
                "auroc_after": auroc(survival_after[rows, k], y),
                "auroc_conditional_before": auroc(before[cond, k], prefix_hit[cond, k]),
                "auroc_conditional_after": auroc(after[cond, k], prefix_hit[cond, k]),
            }
        )
    summary: dict[str, float | int | None] = {"n": sum(s["n"] for s in slots)}
    for key in ("ece", "brier", "auroc"):
        for when in ("before", "after"):
            name = f"{key}_{when}"
            scored = [(s["n"], s[name]) for s in slots if s["n"] and s[name] is not None]
            total = sum(n for n, _ in scored)
            summary[name] = sum(n * v for n, v in scored) / total if total else None
    return {"slots": slots, "summary": summary}


def plot_reliability(
    conf_logits: torch.Tensor,
    accepted: torch.Tensor,
    valid: torch.Tensor,
    temps: Sequence[float],
    path: str | Path,
    n_bins: int = 20,
) -> Path:
    """Write a PNG reliability diagram (one panel per slot, raw vs calibrated prefix survival)."""
    # The object API, not pyplot: no global backend switch or figure registry from a library call.
    from matplotlib.figure import Figure

    logits, prefix_hit, mask = _check_rounds(conf_logits, accepted, valid)
    survival_before = torch.sigmoid(logits).cumprod(1)
    survival_after = apply_temperatures(logits, temps).cumprod(1)
    num_slots = logits.shape[1]
    cols = min(num_slots, 4)
    rows_n = max(1, math.ceil(num_slots / cols))
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows_n), layout="constrained")
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for k in range(rows_n * cols):
        ax = axes[k // cols][k % cols]
        if k >= num_slots:
            ax.set_visible(False)
            continue
        rows = mask[:, k]
        y = prefix_hit[rows, k]
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for pred, label, style in (
            (survival_before[rows, k], "raw", "o--"),
            (survival_after[rows, k], "STS", "s-"),
        ):
            x_mean, y_mean = _bin_means(pred, y, n_bins)
            ax.plot(x_mean, y_mean, style, markersize=3, label=f"{label} (ECE {100 * ece(pred, y, n_bins):.1f}%)")
        ax.set_title(f"slot {k} (τ = {temps[k]:.2f}, n = {int(rows.sum())})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted prefix survival", fontsize=8)
        ax.set_ylabel("accepted-prefix rate", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann–Whitney U with tied scores counted half); None if the labels
    are all one class."""
    scores, labels = scores.double().reshape(-1), labels.reshape(-1).bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Average rank (1-based) of each distinct score, ties sharing the mean of their ranks.
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    rank_sum_pos = float(mean_rank[inverse][labels].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ------------------------------------------------------------------------------------------------


def _check_rounds(
    conf_logits: torch.Tensor, accepted: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logits float64, accepted-prefix indicator float64, prefix-closed validity bool)."""
    if conf_logits.dim() != 2 or accepted.shape != conf_logits.shape or valid.shape != conf_logits.shape:
        raise ValueError(
            "conf_logits, accepted and valid must all be [N, B], got "
            f"{tuple(conf_logits.shape)}, {tuple(accepted.shape)}, {tuple(valid.shape)}"
        )
    if not bool(torch.isfinite(conf_logits).all()):
        raise ValueError("confidence logits must be finite")
    prefix_hit = (accepted != 0).to(torch.float64).cumprod(1)
    mask = valid.bool().to(torch.int64).cumprod(1).bool()
    return conf_logits.double(), prefix_hit, mask


def _ece_columns(pred: torch.Tensor, target: torch.Tensor, n_bins: int = 20) -> torch.Tensor:
    """ECE of each column of pred [n, G] against target [n] -> [G]. With equal counts in the
    weights, Σ_b (n_b/n)|mean_pred_b − mean_tgt_b| = Σ_b |Σ pred_b − Σ target_b| / n."""
    n, num_cols = pred.shape
    if n == 0:
        return torch.zeros(num_cols, dtype=torch.float64)
    bins = (pred * n_bins).floor().clamp(0, n_bins - 1).long()
    flat = (bins + n_bins * torch.arange(num_cols)[None, :]).reshape(-1)
    size = num_cols * n_bins
    pred_sum = torch.zeros(size, dtype=torch.float64).scatter_add_(0, flat, pred.reshape(-1))
    target_sum = torch.zeros(size, dtype=torch.float64).scatter_add_(0, flat, target[:, None].expand(n, num_cols).reshape(-1))
    return (pred_sum - target_sum).abs().reshape(num_cols, n_bins).sum(1) / n


def _brier(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target) ** 2).mean()) if pred.numel() else 0.0


def _bin_means(pred: torch.Tensor, target: torch.Tensor, n_bins: int) -> tuple[list[float], list[float]]:
    """Mean prediction and mean target of each non-empty bin (the points of a reliability curve)."""
    bins = (pred * n_bins).floor().clamp(0, n_bins - 1).long()
    count = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, bins, torch.ones_like(pred))
    pred_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, bins, pred)
    target_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, bins, target)
    keep = count > 0
    return (pred_sum[keep] / count[keep]).tolist(), (target_sum[keep] / count[keep]).tolist()
