"""The memory plan against the measurement, and the memory targets of issue #24.

Two parts, each appending rows (machine, versions, date, commit) to ``benchmarks/results/memory_plan.jsonl``:

``--part accuracy``: for every registered model at its native input size (32 px for the CIFAR models and
VGGs, 224 px for the ImageNet ResNets and ViTs), batch 8, K=4, DGL+MAN++ and InfoPro+MAN++ with the ``memory``
split: the plan's activation peak and total (``manlearn.memory_plan``, real steps at batches 2 and 4 extended
linearly) beside what ``manlearn bench memory`` counts on a real step at batch 8 (``PeakMemory`` after a
warm-up step). The plan must be within 5 %.

``--part targets``: ResNet-50 and ResNet-101 at 224 px, batch 32, K=4, InfoPro+MAN++ and DGL+MAN++ with the
``memory`` split (``auto``'s cut when these were measured; ``auto`` now follows the stages), with and
without ``grad_checkpoint=unit``, beside E2E and E2E with checkpointing per stage, unit and sqrt(n): counted
on real steps (and planned). For ResNet-50 also what would move InfoPro+MAN++'s peak (its first block, the
stem's auxiliary network): the stem in the first group (``stem_module=False``), the ema unit recomputed in
backward (``+recompute``), both.

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --part accuracy
    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --part targets --models resnet50 resnet101 --batch 32
    python benchmarks/memory_plan.py --part report      # markdown tables + benchmarks/plots/memory_plan.png
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
PLOT = Path(__file__).resolve().parent / "plots" / "memory_plan.png"
METHODS = ("dgl+manpp", "infopro+manpp")


def native_size(model: str) -> int:
    tags = model_tags(model)
    return 224 if ("imagenet" in tags or ("vit" in tags and "cifar" not in tags)) else 32


def done(results: Path, part: str) -> set[tuple]:
    return {(r["part"], r["model"], r["method"], r["batch"], r["image_size"], r.get("device", "cpu"))
            for r in read_rows(results) if r.get("part") == part}


def run(part: str, model: str, spec: str, batch: int, size: int, results: Path, skip: set[tuple],
        device: str = "cpu") -> None:
    key = (part, model, spec, batch, size, device)
    if key in skip:
        print(f"skip {key}: already in {results}", flush=True)
        return
    t0 = time.perf_counter()
    try:
        # split="memory": the cut these targets were measured with (auto's before it followed the stages, #27)
        row = counted(model, spec, 4, batch, split="memory", device=device, image_size=size,
                      num_classes=1000 if size == 224 else 10, plan=True)
    except ConfigError as e:  # e.g. InfoPro's decoder on ViT tokens: refused with a reason
        print(f"{model} {spec}: refused: {e}", flush=True)
        return
    row.update(part=part, seconds=time.perf_counter() - t0, **environment(device))
    if row.get("cuda_peak_MiB") is not None and "plan_total_MiB" in row:
        row["plan_vs_cuda_peak"] = row["plan_total_MiB"] / row["cuda_peak_MiB"] - 1
    if "plan_activation_MiB" in row:
        row["plan_error"] = row["plan_activation_MiB"] / row["activation_peak_MiB"] - 1
        row["plan_total_error"] = row["plan_total_MiB"] / row["total_counted_MiB"] - 1
    append_rows(results, [row])
    print(f"{model:>18} {size}px {spec:>32} batch {batch}: counted {row['activation_peak_MiB']:9.1f} MiB "
          f"/ {row['total_counted_MiB']:9.1f} MiB, plan {row.get('plan_activation_MiB', float('nan')):9.1f} / "
          f"{row.get('plan_total_MiB', float('nan')):9.1f} ({100 * row.get('plan_error', 0):+.2f} %)  "
          f"{row['seconds']:.0f} s", flush=True)


def report(results: Path, plot: Path) -> None:
    """The BENCHMARKS.md tables (the latest row of each configuration) and the targets plot."""
    rows: dict[tuple, dict] = {}
    for r in read_rows(results):
        if r.get("device", "cpu") == "cpu":  # CUDA rows: the allocator peak beside the plan (gpu_check.sh)
            rows[(r["part"], r["model"], r["method"], r["batch"], r["image_size"])] = r
    acc = [r for k, r in rows.items() if k[0] == "accuracy"]
    if acc:
        print("| model | size | method | split (ends) | counted act. / total MiB | plan act. / total MiB | error |")
        print("|---|---|---|---|---|---|---|")
        for r in acc:
            print(f"| {r['model']} | {r['image_size']} | {r['method']} | {r['split']} {r['split_ends']} | "
                  f"{r['activation_peak_MiB']:.1f} / {r['total_counted_MiB']:.1f} | {r['plan_activation_MiB']:.1f} / "
                  f"{r['plan_total_MiB']:.1f} | {100 * r['plan_error']:+.2f} % / {100 * r['plan_total_error']:+.2f} % |")
        worst = max(acc, key=lambda r: max(abs(r["plan_error"]), abs(r["plan_total_error"])))
        print(f"\nlargest plan error: {worst['model']} {worst['method']} "
              f"{100 * max(abs(worst['plan_error']), abs(worst['plan_total_error'])):.2f} %\n")
    tgt = [r for k, r in rows.items() if k[0] == "targets"]
    models = sorted({r["model"] for r in tgt})
    bars: dict[str, list[tuple[str, float, float]]] = {}
    for model in models:
        mine = [r for r in tgt if r["model"] == model]
        e2e = next((r for r in mine if r["method"] == "e2e"), None)
        if e2e is None:
            continue
        b, size = mine[0]["batch"], mine[0]["image_size"]
        print(f"{model}, {size}², batch {b}, K=4 (counted; plan error in brackets)\n")
        print("| configuration | split (ends) | activations MiB | × E2E | total MiB | × E2E |")
        print("|---|---|---|---|---|---|")
        for r in mine:
            act, tot = r["activation_peak_MiB"], r["total_counted_MiB"]
            split = f"{r['split']} {r['split_ends']}" + ("" if r.get("stem_module", True) else ", stem in block 1")
            print(f"| {r['method']} | {split if r.get('K', 1) > 1 else '-'} | {act:.0f} ({100 * r.get('plan_error', 0):+.1f} %) | "
                  f"{act / e2e['activation_peak_MiB']:.2f} | {tot:.0f} | {tot / e2e['total_counted_MiB']:.2f} |")
            bars.setdefault(model, []).append((r["method"], act / e2e["activation_peak_MiB"],
                                               tot / e2e["total_counted_MiB"]))
        print()
    if bars:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(bars), figsize=(7 * len(bars), 5), squeeze=False)
        for ax, (model, items) in zip(axes[0], bars.items()):
            names = [n.replace(":grad_checkpoint=", " ckpt:") for n, _, _ in items]
            ys = range(len(items))
            ax.barh([y + 0.2 for y in ys], [a for _, a, _ in items], 0.4, label="activations")
            ax.barh([y - 0.2 for y in ys], [t for _, _, t in items], 0.4, label="total (static included)")
            ax.set_yticks(list(ys), names, fontsize=8)
            ax.invert_yaxis()
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xlabel("× E2E (counted, one step)")
            ax.set_title(f"{model}, 224², batch {tgt[0]['batch']}, K=4")
            ax.legend(fontsize=8)
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["accuracy", "targets", "report"], required=True)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    ap.add_argument("--device", default="cpu", help="cuda: rows also hold torch.cuda.max_memory_allocated")
    args = ap.parse_args()
    if args.part == "report":
        report(args.results, args.plot)
        return
    skip = done(args.results, args.part)
    if args.part == "accuracy":
        batch = args.batch or 8
        for model in args.models or manlearn.list_models():
            for spec in METHODS:
                run("accuracy", model, spec, batch, native_size(model), args.results, skip, args.device)
    else:
        batch = args.batch or 32
        specs = ["e2e", "e2e:grad_checkpoint=stage", "e2e:grad_checkpoint=unit", "e2e:grad_checkpoint=sqrt",
                 *METHODS, *(f"{m}:grad_checkpoint=unit" for m in METHODS)]
        for model in args.models or ["resnet50", "resnet101"]:
            extra = ["infopro+manpp:stem_module=false", "infopro+manpp+recompute",
                     "infopro+manpp+recompute:stem_module=false"] if model == "resnet50" else []
            for spec in [*specs, *extra]:
                run("targets", model, spec, batch, 224, args.results, skip, args.device)


if __name__ == "__main__":
    main()
