"""DGL+MAN++ across seeds, manlearn beside the authors' code (issue #14): accuracy and the trajectory of
every block's learnable scale ``s``.

Reads the rows of

- ``benchmarks/results/manpp_spread.jsonl``: manlearn's runs,
  ``manlearn bench accuracy --methods dgl+manpp --K 16 --epochs 1 --seeds 0 1 2 --results <that file>``
  (each row carries ``aux_trajectory``: s, lb-vs-ema and ema-vs-next of every block every 50 steps);
- ``benchmarks/results/manpp_spread_authors.jsonl``: the authors' published DGL+MAN++ CIFAR model
  (JunhaoSu0/MAN_PlusPlus, ``networks/resnetDGL_MANPP.py``, fetched and run from a scratch folder outside
  this repository) trained on the same FM-R32 batches and schedule, one row per seed with its s trajectory;
- ``benchmarks/results/accuracy.jsonl``: DGL, MAN without s (dgl+man) and the fidelity=authors rows at the same budget,

prints one table (test accuracy per seed and code, mean ± std, the spread of s) and draws
``benchmarks/plots/manpp_s_trajectory.png`` (s of every block against the step, one panel per code and seed).

    .venv/bin/python benchmarks/manpp_spread.py
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from manlearn.bench.common import read_rows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def s_series(row: dict) -> dict[int, list[tuple[int, float]]]:
    """block -> [(step, s)] from a row's trajectory."""
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for point in row.get("aux_trajectory") or []:
        for key, value in point.items():
            if key.startswith("s/"):
                out[int(key.split("/")[1])].append((int(point["step"]), float(value)))
    return out


def s_summary(row: dict) -> str:
    series = s_series(row)
    if not series:
        return "–"
    final = [pts[-1][1] for pts in series.values()]
    extreme = max((abs(v - 1) for pts in series.values() for _, v in pts), default=0.0)
    return f"{min(final):.2f}–{max(final):.2f} (max abs(s−1) {extreme:.2f})"


def groups() -> dict[str, list[dict]]:
    """Rows by code/configuration, full-budget K=16 one-epoch runs only, latest per seed."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in read_rows(RESULTS / "manpp_spread.jsonl"):
        found["manlearn dgl+manpp (default)"][int(r["seed"])] = r
    for r in read_rows(RESULTS / "manpp_spread_authors.jsonl"):
        if r.get("steps") == 468:
            found["authors' code, DGL+MAN++"][int(r["seed"])] = r
    for r in read_rows(RESULTS / "accuracy.jsonl"):
        if int(r["K"]) == 16 and int(r["epochs"]) == 1 and not r.get("train_limit"):
            if r["method"] in ("dgl", "dgl+man", "dgl+manpp", "dgl+manpp:fidelity=authors"):
                found[f"manlearn {r['method']} (accuracy sweep)"][int(r["seed"])] = r
    return {k: [v[s] for s in sorted(v)] for k, v in found.items()}


def table(g: dict[str, list[dict]]) -> str:
    lines = ["| code / configuration | seed | test accuracy | final s over the 15 blocks (max abs(s−1) in the run) |",
             "|---|---|---|---|"]
    for name, rows in g.items():
        for r in rows:
            lines.append(f"| {name} | {r['seed']} | {r['test_acc']:.4f} | {s_summary(r)} |")
        accs = [r["test_acc"] for r in rows]
        if len(accs) > 1:
            lines.append(f"| {name} | mean ± std over {len(accs)} | {statistics.mean(accs):.4f} ± "
                         f"{statistics.stdev(accs):.4f} (range {max(accs) - min(accs):.4f}) | |")
    return "\n".join(lines)


def plot(g: dict[str, list[dict]], path: Path) -> bool:
    panels = [(name, r) for name, rows in g.items() for r in rows if s_series(r)]
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(sum(1 for n, _ in panels if n == name) for name in {n for n, _ in panels})
    names = list(dict.fromkeys(n for n, _ in panels))
    fig, axes = plt.subplots(len(names), cols, figsize=(4 * cols, 3 * len(names)), squeeze=False, sharey=True)
    for i, name in enumerate(names):
        for j, (_, r) in enumerate([p for p in panels if p[0] == name]):
            ax = axes[i][j]
            for block, pts in sorted(s_series(r).items()):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=plt.cm.viridis(block / 15), lw=1)
            ax.axhline(1.0, color="0.6", lw=0.6, ls="--")
            ax.set_title(f"{name}\nseed {r['seed']}: test acc {r['test_acc']:.4f}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
        axes[i][0].set_ylabel("s (colour: block, dark = first)", fontsize=8)
    for ax in axes.flat:
        if not ax.lines:
            ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    g = groups()
    print(table(g))
    path = ROOT / "benchmarks" / "plots" / "manpp_s_trajectory.png"
    if plot(g, path):
        print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
