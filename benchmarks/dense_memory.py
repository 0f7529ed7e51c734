"""Training-step memory of dense local learning (issue #6): RetinaNet and DeepLabV3+, E2E vs MAN++ K=4.

Counted, not sampled (``manlearn.memory.SavedTensorTracker``): for each block's local step, the peak of
the bytes autograd keeps alive for backward, plus the detached stage outputs of earlier blocks that
are held for the final head (C2..C4: the FPN / decoder inputs). Those held tensors are excluded from
the tracker and added once, so nothing is counted twice. The step's peak is the largest block value;
for E2E it is the one backward graph. Deterministic and device-independent; on CUDA the allocator's
peak is reported as well.

    OMP_NUM_THREADS=1 python benchmarks/dense_memory.py [--cases mosaic r50] [--device cpu]

Cases: ``mosaic`` = the mosaic recipes' network (ResNet-50 topology at widths 16/32/64/128, stem 16,
FPN/ASPP 64) at 128x128, batch 16; ``r50`` = full-width ResNet-50, FPN/ASPP 256, 512x512, batch 2.
Rows are appended to ``benchmarks/results/dense_memory.jsonl``.
"""
from __future__ import annotations

import argparse
import os

import torch

from manlearn.bench.common import append_rows, environment
from manlearn import LocalLearner
from manlearn.detection import RetinaNetTask
from manlearn.memory import PeakMemory
from manlearn.rules import LocalBatch
from manlearn.segmentation import DeepLabV3Task

CASES = {
    "mosaic": dict(model_kwargs=dict(widths=[16, 32, 64, 128], stem_width=16), head=64, size=128, batch=16),
    "r50": dict(model_kwargs={}, head=256, size=512, batch=2),
}
METHODS = [("e2e", 1), ("local", 4), ("manpp", 4)]


def _task(name: str, head: int):
    if name == "retinanet":
        return RetinaNetTask(10, fpn_channels=head, local_channels=head)
    return DeepLabV3Task(11, aspp_channels=head)


def _targets(name: str, batch: int, size: int, device):
    g = torch.Generator().manual_seed(0)
    if name == "retinanet":
        out = []
        for _ in range(batch):
            xy = torch.rand(3, 2, generator=g) * size * 0.6
            wh = size * (0.15 + 0.25 * torch.rand(3, 2, generator=g))
            out.append(dict(boxes=torch.cat([xy, xy + wh], 1).to(device), labels=torch.randint(0, 10, (3,), generator=g).to(device)))
        return out
    return torch.randint(0, 11, (batch, size, size), generator=g).to(device)


def _bytes(ts) -> int:
    seen, n = set(), 0
    for t in ts:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def measure(case: str, task_name: str, method: str, K: int, device: str) -> dict:
    spec = CASES[case]
    torch.manual_seed(0)
    learner = LocalLearner("resnet50", task=_task(task_name, spec["head"]), method=method,
                           base="greedy" if method in ("man", "manpp") else None, K=K, stem_module=False,
                           image_size=64, model_kwargs=spec["model_kwargs"]).to(device)
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device)
    y = _targets(task_name, spec["batch"], spec["size"], device)
    learner.train_step(x, y)  # warm-up (BN statistics, allocator, anchor caches)
    learner.zero_grad(set_to_none=True)
    batch = LocalBatch(x, y, learner.norm_mean, learner.norm_std)
    feats: list[torch.Tensor] = []
    per_block, h = [], x
    with PeakMemory(device, track_activations=False) as whole:
        for k in range(learner.K):
            held = list(feats)
            with PeakMemory("cpu", exclude=[*learner.parameters(), *held]) as pb:
                feats, _ = learner.local_step(k, h, feats, batch)
            per_block.append((pb.peak_activation_bytes + _bytes(held)) / 2**20)
            h = feats[-1]
    params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    return dict(case=case, task=task_name, model="resnet50", method=method, K=learner.K, batch=spec["batch"],
                size=spec["size"], peak_MiB=max(per_block), per_block_MiB=[round(v, 1) for v in per_block],
                trainable_params_M=params / 1e6,
                cuda_peak_MiB=(whole.cuda_peak / 2**20) if whole.cuda_peak is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["mosaic", "r50"], choices=sorted(CASES))
    ap.add_argument("--tasks", nargs="+", default=["retinanet", "deeplab"], choices=["retinanet", "deeplab"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results", "dense_memory.jsonl"))
    args = ap.parse_args()
    env = environment(args.device)
    print("| case | task | method | K | batch | size | peak activations + held features (MiB) | vs E2E | per block (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for task_name in args.tasks:
            base = None
            for method, K in METHODS:
                r = measure(case, task_name, method, K, args.device)
                r.update(env)
                base = r["peak_MiB"] if method == "e2e" else base
                r["ratio_to_e2e"] = r["peak_MiB"] / base
                append_rows(args.results, [r])
                print(f"| {case} | {task_name} | {method} | {r['K']} | {r['batch']} | {r['size']} | {r['peak_MiB']:.1f} "
                      f"| {100 * r['ratio_to_e2e']:.1f}% | {', '.join(f'{v:.1f}' for v in r['per_block_MiB'])} |",
                      flush=True)


if __name__ == "__main__":
    main()
