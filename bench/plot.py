"""Plot the ratio to pg_recvlogical per workload and level (bench/ratios.png).

    .venv/bin/python bench/plot.py                       # the newest bench/results/run-*.json
    .venv/bin/python bench/plot.py results/run-A.json results/run-B.json -o ratios.png

Bars are medians over repetitions of (level rows/s / pg_recvlogical rows/s of
the same repetition); whiskers span min to max. Several files are pooled.
The y axis is logarithmic: the PyPI peers are 10-50x below the rest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def pooled_ratios(paths: list[Path]) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """{workload: {level: [ratios]}} and short notes on each file's conditions."""
    data: dict[str, dict[str, list[float]]] = {}
    notes = []
    for path in paths:
        result = json.loads(path.read_text())
        for s in result.get("summary", []):
            data.setdefault(s["workload"], {}).setdefault(s["level"], []).extend(s["ratio"])
        a = result["args"]
        notes.append(f"{path.name}: scale {a['scale']}, reps {a['reps']}")
    return data, notes


def plot(paths: list[Path], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, notes = pooled_ratios(paths)
    workloads = sorted(data)
    levels = list(dict.fromkeys(lv for w in workloads for lv in data[w]))
    width = 0.8 / max(1, len(levels))
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(workloads) + 2), 4.8))
    for i, lv in enumerate(levels):
        xs, med, lo, hi = [], [], [], []
        for j, w in enumerate(workloads):
            vals = data[w].get(lv)
            if not vals:
                continue
            m = statistics.median(vals)
            xs.append(j - 0.4 + width * (i + 0.5))
            med.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=lv)
        for x, m in zip(xs, med):
            ax.annotate(f"{m:.2f}" if m >= 0.1 else f"{m:.3f}", (x, m), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(top=1.6)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("rows/s ÷ pg_recvlogical rows/s (log)")
    ax.set_title("Throughput relative to pg_recvlogical (same WAL, same repetition)")
    ax.legend(fontsize=8, ncol=len(levels), loc="upper center", bbox_to_anchor=(0.5, -0.07),
              frameon=False)
    fig.text(0.01, 0.01, "; ".join(notes), fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return png


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="run-*.json files (default: newest)")
    ap.add_argument("-o", "--out", type=Path, default=BENCH / "ratios.png")
    args = ap.parse_args()
    paths = args.results
    if not paths:
        found = sorted((BENCH / "results").glob("run-*.json"))
        if not found:
            ap.error("no bench/results/run-*.json yet: run bench/run.py first")
        paths = [found[-1]]
    print(plot(paths, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
