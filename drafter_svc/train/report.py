"""Tables and figures for docs/TRAINING.md from `dspark eval --json` outputs.

Each input file holds the JSON lines of one `dspark eval --json` run (one line per dataset) and is
named `<label>_T<temperature>.jsonl` (e.g. dspark_T0.jsonl, rank0_T1.jsonl).

    python -m drafter_svc.train.report runs/smollm2/eval/*.jsonl --plot docs/img/acceptance_by_position.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[str]) -> dict[tuple[str, str], dict[str, dict]]:
    """(label, temperature) -> dataset -> result."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for p in paths:
        label, _, temp = Path(p).stem.rpartition("_T")
        rows = [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]
        out.setdefault((label, temp), {}).update({r["dataset"]: r for r in rows})
    return out


def markdown_table(results: dict[tuple[str, str], dict[str, dict]]) -> str:
    runs = sorted(results, key=lambda k: (k[1], k[0]))
    datasets = sorted({d for r in results.values() for d in r})
    head = "| dataset | " + " | ".join(f"{label} τ (T={t})" for label, t in runs) + " |"
    sep = "|---|" + "---|" * len(runs)
    lines = [head, sep]
    for d in datasets:
        cells = []
        for run in runs:
            r = results[run].get(d)
            cells.append(f"{r['tau']:.2f} ({r['prompts']} prompts, {r['rounds']} rounds)" if r else "–")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Conditional acceptance by draft position 1..B:")
    lines.append("")
    lines.append("| run | dataset | " + " | ".join(f"k={k}" for k in range(1, 8)) + " |")
    lines.append("|---|---|" + "---|" * 7)
    for run in runs:
        for d in datasets:
            r = results[run].get(d)
            if r:
                cond = ["–" if c is None else f"{c:.2f}" for c in r["conditional_acceptance"]]
                lines.append(f"| {run[0]} T={run[1]} | {d} | " + " | ".join(cond) + " |")
    return "\n".join(lines)


def plot(results: dict[tuple[str, str], dict[str, dict]], path: str | Path) -> Path:
    """One panel per temperature: conditional acceptance by position, averaged over datasets
    (weighted by the rounds reaching each position is not recoverable; plain mean), per run."""
    from matplotlib.figure import Figure

    temps = sorted({t for _, t in results})
    datasets = sorted({d for r in results.values() for d in r})
    fig = Figure(figsize=(4.2 * len(datasets), 3.4 * len(temps)), layout="constrained")
    axes = fig.subplots(len(temps), len(datasets), squeeze=False)
    for i, t in enumerate(temps):
        for j, d in enumerate(datasets):
            ax = axes[i][j]
            for (label, tt), res in sorted(results.items()):
                if tt != t or d not in res:
                    continue
                ys = res[d]["conditional_acceptance"]
                xs = [k + 1 for k, y in enumerate(ys) if y is not None]
                ax.plot(xs, [y for y in ys if y is not None], "o-", label=f"{label} τ={res[d]['tau']:.2f}")
            ax.set_title(f"{d}, T={t}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.set_xlim(0.5, 7.5)
            ax.set_xticks(range(1, 8))
            ax.set_xlabel("draft position k", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[i][0].set_ylabel("P(accept k | < k accepted)", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=80)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--plot", default="")
    args = p.parse_args(argv)
    results = load(args.results)
    print(markdown_table(results))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
