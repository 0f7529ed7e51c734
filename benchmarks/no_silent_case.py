"""Issue #24's "no silent case": for every registered model at its native size × K in {2, 4, 8} × MAN++ on
both bases, the configuration either keeps at most 0.9× E2E's activations (by the exact plan at batch 2),
or warns when it is built (``manlearn.MemoryWarning``). Appends one row per configuration to
``benchmarks/results/no_silent_case.jsonl`` and prints any silent case.

    OMP_NUM_THREADS=1 python benchmarks/no_silent_case.py
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import manlearn
from manlearn import ConfigError, LocalLearner, MemoryWarning
from manlearn.bench.common import append_rows, environment, read_rows
from manlearn.planning import WARN_RATIO, plan_learner

from memory_plan import native_size

RESULTS = Path(__file__).resolve().parent / "results" / "no_silent_case.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    done = {(r["model"], r["K"], r["base"]) for r in read_rows(args.results)}
    silent = 0
    for model in args.models or manlearn.list_models():
        size = native_size(model)
        for K in (2, 4, 8):
            for base in ("dgl", "infopro"):
                if (model, K, base) in done:
                    continue
                t0 = time.perf_counter()
                with warnings.catch_warnings(record=True) as got:
                    warnings.simplefilter("always")
                    try:
                        torch.manual_seed(0)
                        learner = LocalLearner(model, method="manpp", base=base, K=K, image_size=size,
                                               num_classes=1000 if size == 224 else 10)
                    except ConfigError as e:
                        print(f"{model} K={K} {base}+manpp: refused: {e}", flush=True)
                        continue
                warned = any(issubclass(w.category, MemoryWarning) for w in got)
                plan = plan_learner(learner, 2, baselines=("e2e",), breakdown=False, sample_batches=(2,))
                ratio = plan.ratio("e2e")
                ok = warned == (ratio > WARN_RATIO)
                silent += not ok
                row = dict(model=model, image_size=size, K=K, base=base, method="manpp", split=learner.split.source,
                           plan_ratio_to_e2e=ratio, warned=warned, consistent=ok,
                           seconds=time.perf_counter() - t0, **environment())
                append_rows(args.results, [row])
                print(f"{model:>18} {size}px K={K} {base}+manpp: {ratio:.2f}x E2E, "
                      f"{'warns' if warned else 'quiet'}{'' if ok else '  <-- SILENT / WRONG'}", flush=True)
                del learner
    print(f"silent or wrong cases: {silent}")


if __name__ == "__main__":
    main()
