"""Speed of two versions of manlearn side by side: the same `manlearn bench speed` run on each source
tree, alternating between the trees round after round (so a slower minute of a shared machine hits both).

    git worktree add /tmp/manlearn-before <commit>
    .venv/bin/python benchmarks/compare_versions.py --before /tmp/manlearn-before --after . --rounds 3

Each round runs `python -m manlearn bench speed` once per tree (a fresh process with that tree's `src`
first on PYTHONPATH; warm-up steps excluded) and keeps each method's median s/iter; the table gives, per
method, the median over rounds for each tree and their ratio. Rows go to
`benchmarks/results/speed_versions.jsonl` with the commits of both trees.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from manlearn.bench.common import append_rows, environment  # noqa: E402


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def one_run(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """Median s/iter per method of one `bench speed` run of ``tree``."""
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "speed.jsonl"
        cmd = [sys.executable, "-m", "manlearn", "bench", "speed", "--model", args.model, "--methods", *args.methods,
               "--K", str(args.K), "--batch", str(args.batch), "--iters", str(args.iters), "--warmup",
               str(args.warmup), "--no-breakdown", "--results", str(results)]
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"bench speed failed in {tree}:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {r["method"]: r["median_s_per_it"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="source tree of the earlier version")
    ap.add_argument("--after", type=Path, default=ROOT, help="source tree of the later version (default: this one)")
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--methods", nargs="+", default=["dgl+manpp", "infopro+manpp"])
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "speed_versions.jsonl")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: commit_of(t) for k, t in trees.items()}
    per: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate which tree goes first
        for name in order:
            for method, s in one_run(trees[name], args).items():
                per[name].setdefault(method, []).append(s)
            print(f"round {r + 1}/{args.rounds} {name:6s} " + "  ".join(
                f"{m} {v[-1]:.3f}" for m, v in per[name].items()), flush=True)
    env = environment("cpu")
    rows = []
    print(f"\n{'method':>16}  before ({commits['before']})  after ({commits['after']})  after/before")
    for method in per["before"]:
        b, a = statistics.median(per["before"][method]), statistics.median(per["after"][method])
        print(f"{method:>16}  {b:>12.3f} s/it  {a:>12.3f} s/it  {a / b:>10.3f}")
        rows.append(dict(model=args.model, method=method, K=args.K, batch=args.batch, rounds=args.rounds,
                         iters=args.iters, warmup=args.warmup, before_commit=commits["before"],
                         after_commit=commits["after"], before_s_per_it=b, after_s_per_it=a, ratio=a / b,
                         before_all=per["before"][method], after_all=per["after"][method], **env))
    append_rows(args.results, rows)


if __name__ == "__main__":
    main()
