"""E2E vs MAN++ on one GPU, bf16: seconds per iteration and torch.cuda.max_memory_allocated.

Configurations (issue "Your network, your loop", item 7): ResNet-32 K=16 batch 1024 at 32x32; ResNet-101
K=4 batch 64 at 224x224 (published split, stem in the first block); ViT-B/16 K=4 batch 64 at 224x224.
Each step is train_step + the optimiser step (SGD, Nesterov), E2E and MAN++ interleaved step by step;
median over the timed steps. The memory figure is the allocator's peak during one step after warm-up
(weights, gradients and optimiser state included), reset before that step.

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--steps 10] [--warmup 3] [--results FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from manlearn import LocalLearner  # noqa: E402
from manlearn.bench.common import append_rows, environment, interleaved  # noqa: E402

CONFIGS = [
    dict(name="resnet32-k16-b1024", model="resnet32", K=16, batch=1024, size=32, num_classes=10,
         kw=dict(base="infopro")),
    dict(name="resnet101-k4-b64-224", model="resnet101", K=4, batch=64, size=224, num_classes=1000,
         kw=dict(base="infopro", stem_module=False, split="paper")),
    dict(name="vit_base-k4-b64-224", model="vit_base", K=4, batch=64, size=224, num_classes=1000,
         kw=dict(stem_module=False, split="paper")),
]


def build(c: dict, method: str) -> tuple[LocalLearner, torch.optim.Optimizer]:
    torch.manual_seed(0)
    kw = dict(c["kw"]) if method != "e2e" else {}
    cnn = not c["model"].startswith("vit")
    learner = LocalLearner(c["model"], method=method, K=c["K"], num_classes=c["num_classes"], image_size=c["size"],
                           amp_dtype=torch.bfloat16, channels_last=cnn, **kw).cuda()
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          nesterov=True, weight_decay=1e-4)
    return learner, opt


def step(learner, opt, x, y) -> None:
    learner.train_step(x, y)
    opt.step()


def run(c: dict, steps: int, warmup: int) -> list[dict]:
    built = {m: build(c, m) for m in ("e2e", "manpp")}
    x = torch.randn(c["batch"], 3, c["size"], c["size"], device="cuda")
    y = torch.randint(0, c["num_classes"], (c["batch"],), device="cuda")
    calls = {m: (lambda learner=learner, opt=opt: step(learner, opt, x, y)) for m, (learner, opt) in built.items()}
    times = interleaved(calls, steps, warmup, sync=torch.cuda.synchronize)
    rows = []
    for m, (learner, opt) in built.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(learner, opt, x, y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        med = statistics.median(times[m])
        rows.append(dict(config=c["name"], model=c["model"], method=m, K=learner.K, batch=c["batch"],
                         image_size=c["size"], amp="bf16", median_s_per_it=med, images_per_s=c["batch"] / med,
                         max_memory_allocated_MiB=peak / 2**20, steps=steps, warmup=warmup))
    e2e = rows[0]
    for r in rows:
        r["time_vs_e2e"] = r["median_s_per_it"] / e2e["median_s_per_it"]
        r["memory_vs_e2e"] = r["max_memory_allocated_MiB"] / e2e["max_memory_allocated_MiB"]
    del built
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.jsonl")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    torch.backends.cudnn.benchmark = True
    env = environment("cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 autocast", flush=True)
    print(f"{'config':>22} {'method':>6} {'s/iter':>8} {'img/s':>8} {'peak MiB':>9} {'time/E2E':>8} {'mem/E2E':>8}")
    for c in CONFIGS:
        rows = run(c, args.steps, args.warmup)
        for r in rows:
            print(f"{r['config']:>22} {r['method']:>6} {r['median_s_per_it']:>8.4f} {r['images_per_s']:>8.0f} "
                  f"{r['max_memory_allocated_MiB']:>9.0f} {r['time_vs_e2e']:>8.2f} {r['memory_vs_e2e']:>8.2f}",
                  flush=True)
            r.update(env)
        append_rows(args.results, rows)


if __name__ == "__main__":
    main()
