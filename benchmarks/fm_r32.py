"""FM-R32 (SPEC §8) accuracy / speed / memory table for several methods, one run after another.

Each method runs its recipe from configs/ with ``epochs`` overridden (the per-iteration cosine spans
whatever length is chosen), on the full Fashion-MNIST train and test sets, and the script prints a
markdown table of final test accuracy, seconds per iteration and peak activation memory.

    python benchmarks/fm_r32.py --epochs 1 [--recipes fm-r32-e2e fm-r32-infopro-manpp ...]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from manlearn.cli import resolve_recipe
from manlearn.config import apply_overrides, load_config, validate
from manlearn.train import Trainer

RECIPES = ["fm-r32-e2e", "fm-r32-dgl", "fm-r32-infopro", "fm-r32-dgl-manpp", "fm-r32-infopro-manpp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--out", default="runs/bench-fm-r32")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    rows = []
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, epochs {args.epochs}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for name in args.recipes:
        cfg = load_config(resolve_recipe(name), check=False)
        cfg = validate(apply_overrides(cfg, [f"epochs={args.epochs}", f"out_dir={Path(args.out) / name}",
                                             "progress=false", *args.overrides], check=False))
        summary = Trainer(cfg, overwrite=True).fit()
        row = dict(recipe=name, K=cfg.K if cfg.method != "e2e" else 1, steps=summary["steps"],
                   test_acc=summary["test_acc"], s_per_it=summary["seconds_per_iter"],
                   peak_act_MiB=(summary["peak_mem_bytes"] or 0) / 2**20)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| recipe | K | steps | test acc | s/it | peak activations (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['K']} | {r['steps']} | {r['test_acc']:.4f} | {r['s_per_it']:.3f} | "
              f"{r['peak_act_MiB']:.1f} |")


if __name__ == "__main__":
    main()
