"""The report's PNG figures from a results.json (matplotlib, Agg backend):

- throughput_vs_concurrency.png: aggregate and per-user decode tokens/s against concurrency, one
  line per draft length (HTTP runs, all datasets pooled), one column per temperature;
- acceptance_by_position.png: conditional acceptance by draft position, one line per dataset
  (HTTP runs at the lowest concurrency, the draft length that verified the most positions);
- speedup_by_dataset.png: speedup over each method's reference per dataset at concurrency 1
  (HTTP draft lengths, the in-process loop, prompt lookup), one panel per temperature.

    python -m bench.plots runs/bench/results.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.metrics import conditional_acceptance, median


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _dl_order(label: str) -> tuple:
    v = label.removeprefix("dl=")
    return (0, int(v)) if v.isdigit() else (1, 0)


def _temps(runs: list[dict]) -> list[float]:
    return sorted({r["temperature"] for r in runs})


def throughput_vs_concurrency(runs: list[dict], path: Path) -> Path | None:
    http = [r for r in runs if r["source"] == "http"]
    if not http:
        return None
    plt = _plt()
    temps = _temps(http)
    fig, axes = plt.subplots(2, len(temps), figsize=(5.5 * len(temps), 7), squeeze=False)
    for j, t in enumerate(temps):
        for label in sorted({r["label"] for r in http}, key=_dl_order):
            xs, agg, user = [], [], []
            for c in sorted({r["concurrency"] for r in http}):
                group = [r for r in http if r["temperature"] == t and r["label"] == label and r["concurrency"] == c]
                if not group:
                    continue
                tokens = sum(r["metrics"]["completion_tokens"] for r in group)
                wall = sum(r["metrics"]["wall_s"] for r in group)
                rates = [q["decode_tokens_per_s"] for r in group for q in r["requests"]
                         if q.get("ok") and q.get("decode_tokens_per_s") is not None]
                xs.append(c)
                agg.append(tokens / wall if wall else 0.0)
                user.append(median(rates) or 0.0)
            axes[0][j].plot(xs, agg, marker="o", label=label)
            axes[1][j].plot(xs, user, marker="o", label=label)
        axes[0][j].set_title(f"temperature {t:g}")
        axes[0][j].set_ylabel("aggregate tokens/s")
        axes[1][j].set_ylabel("per-user decode tokens/s (median)")
        axes[1][j].set_xlabel("concurrent users")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(sorted({r["concurrency"] for r in http}))
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Throughput against concurrency (all datasets pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def acceptance_by_position(runs: list[dict], path: Path) -> Path | None:
    spec = [r for r in runs if r["source"] in ("http", "inprocess") and r["metrics"]["proposed_by_position"]]
    if not spec:
        return None
    source = "http" if any(r["source"] == "http" for r in spec) else "inprocess"
    spec = [r for r in spec if r["source"] == source]
    c = min(r["concurrency"] for r in spec)
    spec = [r for r in spec if r["concurrency"] == c]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {t: s for t, s in zip(_temps(spec), ["-", "--", ":", "-."])}
    for (d, t) in sorted({(r["dataset"], r["temperature"]) for r in spec}):
        group = [r for r in spec if r["dataset"] == d and r["temperature"] == t]
        best = max(group, key=lambda r: (len(r["metrics"]["proposed_by_position"]), r["label"] == "dl=auto"))
        m = best["metrics"]
        acc = conditional_acceptance(m["accepted_by_position"], m["proposed_by_position"])
        xs = [i + 1 for i, v in enumerate(acc) if v is not None]
        ax.plot(xs, [v for v in acc if v is not None], styles[t], marker="o",
                label=f"{d} T={t:g} ({best['label']}, τ={m['tau']:.2f})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(k accepted | 1..k-1 accepted)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Conditional acceptance by position ({source}, concurrency {c})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_by_dataset(runs: list[dict], path: Path) -> Path | None:
    c1 = [r for r in runs if r["concurrency"] == 1 and not r.get("reference") and r["metrics"].get("speedup")]
    if not c1:
        return None
    plt = _plt()
    temps = _temps(c1)
    fig, axes = plt.subplots(1, len(temps), figsize=(max(6.0, 2.2 * len({r["dataset"] for r in c1}) + 3) * len(temps),
                                                      4.5), squeeze=False)
    for j, t in enumerate(temps):
        ax = axes[0][j]
        group = [r for r in c1 if r["temperature"] == t]
        datasets = sorted({r["dataset"] for r in group})
        methods = sorted({(r["source"], r["label"]) for r in group},
                         key=lambda m: ({"http": 0, "inprocess": 1}.get(m[0], 2), _dl_order(m[1])))
        width = 0.8 / max(len(methods), 1)
        for k, (source, label) in enumerate(methods):
            ys = []
            for d in datasets:
                r = next((r for r in group if r["dataset"] == d and r["source"] == source and r["label"] == label), None)
                ys.append(r["metrics"]["speedup"] if r else 0.0)
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(datasets))]
            bars = ax.bar(xs, ys, width, label=f"{source} {label}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel("per-user decode speedup vs own reference")
        ax.set_title(f"temperature {t:g}, concurrency 1")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    made = [throughput_vs_concurrency(runs, out / "throughput_vs_concurrency.png"),
            acceptance_by_position(runs, out / "acceptance_by_position.png"),
            speedup_by_dataset(runs, out / "speedup_by_dataset.png")]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    for path in write_plots(json.loads(Path(a.results).read_text()), Path(a.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
