"""The memory plan against the measurement, and the memory targets of issue #24.

Two parts, each appending rows (machine, versions, date, commit) to ``benchmarks/results/memory_plan.jsonl``:

``--part accuracy``: for every registered model at its native input size (32 px for the CIFAR models and
VGGs, 224 px for the ImageNet ResNets and ViTs), batch 8, K=4, DGL+MAN++ and InfoPro+MAN++ with the default
split: the plan's activation peak and total (``manlearn.memory_plan``, real steps at batches 2 and 4 extended
linearly) beside what ``manlearn bench memory`` counts on a real step at batch 8 (``PeakMemory`` after a
warm-up step). The plan must be within 5 %.

``--part targets``: ResNet-50 and ResNet-101 at 224 px, batch 32, K=4, InfoPro+MAN++ and DGL+MAN++ with the
default split, with and without ``grad_checkpoint=unit``, beside E2E and E2E with checkpointing per stage,
unit and sqrt(n): counted on real steps (and planned).

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --part accuracy
    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --part targets --models resnet50 resnet101 --batch 32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import manlearn
from manlearn.bench.common import append_rows, environment, read_rows
from manlearn.bench.memory import counted
from manlearn.errors import ConfigError
from manlearn.models import model_tags

RESULTS = Path(__file__).resolve().parent / "results" / "memory_plan.jsonl"
METHODS = ("dgl+manpp", "infopro+manpp")


def native_size(model: str) -> int:
    tags = model_tags(model)
    return 224 if ("imagenet" in tags or ("vit" in tags and "cifar" not in tags)) else 32


def done(results: Path, part: str) -> set[tuple]:
    return {(r["part"], r["model"], r["method"], r["batch"], r["image_size"]) for r in read_rows(results)
            if r.get("part") == part}


def run(part: str, model: str, spec: str, batch: int, size: int, results: Path, skip: set[tuple]) -> None:
    key = (part, model, spec, batch, size)
    if key in skip:
        print(f"skip {key}: already in {results}", flush=True)
        return
    t0 = time.perf_counter()
    try:
        row = counted(model, spec, 4, batch, image_size=size, num_classes=1000 if size == 224 else 10, plan=True)
    except ConfigError as e:  # e.g. InfoPro's decoder on ViT tokens: refused with a reason
        print(f"{model} {spec}: refused: {e}", flush=True)
        return
    row.update(part=part, seconds=time.perf_counter() - t0, **environment())
    if "plan_activation_MiB" in row:
        row["plan_error"] = row["plan_activation_MiB"] / row["activation_peak_MiB"] - 1
        row["plan_total_error"] = row["plan_total_MiB"] / row["total_counted_MiB"] - 1
    append_rows(results, [row])
    print(f"{model:>18} {size}px {spec:>32} batch {batch}: counted {row['activation_peak_MiB']:9.1f} MiB "
          f"/ {row['total_counted_MiB']:9.1f} MiB, plan {row.get('plan_activation_MiB', float('nan')):9.1f} / "
          f"{row.get('plan_total_MiB', float('nan')):9.1f} ({100 * row.get('plan_error', 0):+.2f} %)  "
          f"{row['seconds']:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["accuracy", "targets"], required=True)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    skip = done(args.results, args.part)
    if args.part == "accuracy":
        batch = args.batch or 8
        for model in args.models or manlearn.list_models():
            for spec in METHODS:
                run("accuracy", model, spec, batch, native_size(model), args.results, skip)
    else:
        batch = args.batch or 32
        specs = ["e2e", "e2e:grad_checkpoint=stage", "e2e:grad_checkpoint=unit", "e2e:grad_checkpoint=sqrt",
                 *METHODS, *(f"{m}:grad_checkpoint=unit" for m in METHODS)]
        for model in args.models or ["resnet50", "resnet101"]:
            for spec in specs:
                run("targets", model, spec, batch, 224, args.results, skip)


if __name__ == "__main__":
    main()
