"""Seconds per training step of the mosaic networks, E2E vs MAN++ K=4 (issue #6), measured interleaved.

All learners are built first and stepped in turn (one step each, round after round), so machine-speed
drift hits all alike; median after warm-up. One step = ``train_step`` + SGD step on a fixed batch of
16 mosaic images (128x128) with their real boxes / masks. Rows are appended to
``benchmarks/results/dense_speed.jsonl``.

    .venv/bin/python benchmarks/dense_speed.py [--rounds 8 --warmup 2] [--data data/mosaic]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from manlearn.bench.common import append_rows, environment, interleaved
from manlearn import LocalLearner
from manlearn.detection import CocoDetection, RetinaNetTask
from manlearn.segmentation import DeepLabV3Task, load_mask_folder

WIDTHS = dict(widths=[16, 32, 64, 128], stem_width=16)  # the mosaic recipes' network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/mosaic")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results", "dense_speed.jsonl"))
    args = ap.parse_args()
    det = CocoDetection.from_root(args.data, "val", min_size=128, max_size=128).get_batch(list(range(16)))
    seg = load_mask_folder(args.data, "val", limit=16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    inputs = {"retinanet": ((det.images.float() / 255 - mean) / std, det.targets),
              "deeplab": ((seg.images.float() / 255 - mean) / std, seg.masks.long())}
    runs = {}
    for task in ("retinanet", "deeplab"):
        for method, K in (("e2e", 1), ("manpp", 4)):
            torch.manual_seed(0)
            head = (RetinaNetTask(10, fpn_channels=64, head_convs=2, norm=True) if task == "retinanet"
                    else DeepLabV3Task(11, aspp_channels=64))
            learner = LocalLearner("resnet50", task=head, method=method, base="greedy" if method == "manpp" else None,
                                   K=K, stem_module=False, image_size=64, model_kwargs=WIDTHS)
            opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            runs[(task, method)] = (learner, opt)

    def step(task: str, learner, opt):
        x, y = inputs[task]
        return lambda: (learner.train_step(x, y), opt.step())

    times = interleaved({key: step(key[0], *run) for key, run in runs.items()}, args.rounds, args.warmup)
    env = environment()
    print("| task | method | K | s/it (median) | vs E2E |\n|---|---|---|---|---|")
    for (task, method), (learner, _) in runs.items():
        med = statistics.median(times[(task, method)])
        base = statistics.median(times[(task, "e2e")])
        row = dict(task=task, method=method, K=learner.K, batch=16, size=128, s_per_it=med, ratio_to_e2e=med / base,
                   **env)
        append_rows(args.results, [row])
        print(f"| {task} | {method} | {learner.K} | {med:.3f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
