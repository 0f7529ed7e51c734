"""Mosaic detection and segmentation, E2E vs MAN++ K=4 (issue #6): run the four mosaic recipes and
append one row per run (final val AP / mIoU, s/iter, peak RSS) to
``benchmarks/results/dense_accuracy.jsonl``. The counted memory ratios of the same networks come from
``benchmarks/dense_memory.py``.

    manlearn data make-mosaic --out data/mosaic        # once
    OMP_NUM_THREADS=1 python benchmarks/mosaic_dense.py [--recipes ...] [key=value ...]
"""
from __future__ import annotations

import argparse
import os

from manlearn.bench.common import append_rows, environment
from manlearn.recipes import resolve_recipe
from manlearn.config import apply_overrides, load_config
from manlearn.train import Trainer

RECIPES = ["mosaic-retinanet-r50-e2e", "mosaic-retinanet-r50-k4-manpp", "mosaic-deeplab-r50-e2e",
           "mosaic-deeplab-r50-k4-manpp"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=RECIPES)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results", "dense_accuracy.jsonl"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    env = environment()
    for name in args.recipes:
        cfg = apply_overrides(load_config(resolve_recipe(name)), args.overrides)
        summary = Trainer.from_config(cfg, overwrite=True).fit()
        row = dict(recipe=name, task=cfg.task.name, model=cfg.model, widths=cfg.task.model_widths, method=cfg.method,
                   K=1 if cfg.method == "e2e" else cfg.K, iterations=summary["steps"], batch=cfg.batch_size,
                   metrics=summary["metrics"], seconds_per_iter=summary["seconds_per_iter"],
                   peak_rss_MiB=(summary["peak_mem_bytes"] or 0) / 2**20, overrides=list(args.overrides), **env)
        append_rows(args.results, [row])
        head, value = summary["headline"]
        print(f"{name}: {head} {value:.4f}  s/iter {summary['seconds_per_iter']:.3f}", flush=True)


if __name__ == "__main__":
    main()
