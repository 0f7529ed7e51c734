"""Block pipeline vs one process: training images/s on this machine (issue #4).

Runs, one after the other, with the same rule, K, batch and data (FM-R32 by default: Fashion-MNIST,
ResNet-32, InfoPro+MAN++, K=16, batch 128):

1. one process, ``--single-threads`` intra-op threads (default 2), the plain sequential step loop;
2. the pipeline, ``--workers`` processes (default 2) with ``--threads-per-worker`` threads each (default 1);
3. per-block step times in one process with one thread (the inputs of the on-paper P-device model):
   predicted pipeline throughput = B / (slowest worker's summed block time), and the activation
   bytes that cross each worker boundary per step.

Run it on a quiet machine (nothing else using the cores):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py --steps 60 --json benchmarks/pipeline.json

``--tiny`` checks the script in seconds (ResNet-20 on digits); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch


def base_cfg(args, out_dir: str):
    from manlearn.config import TrainConfig

    kw = dict(dataset=args.dataset, model=args.model, method=args.method, base=args.base, K=args.K,
              batch_size=args.batch, epochs=1, train_limit=args.batch * args.steps, eval_limit=args.test_limit,
              eval_batch_size=500, lr=0.1, device="cpu", out_dir=out_dir, log_every=0, progress=False,
              seed=0)
    return TrainConfig(**kw)


def run_single(args, tmp: str) -> dict:
    """The sequential step of SPEC §1 in one process: the same learner, data and optimiser as a pipeline
    worker uses, timed over every step (first included, as the pipeline's fill is), without the
    Trainer's per-tensor memory tracking."""
    from manlearn.train.build import build_learner, load_split, make_loader, seed_everything
    from manlearn.train.optim import build_optimizer
    from manlearn.train.schedule import lr_at

    torch.set_num_threads(args.single_threads)
    cfg = base_cfg(args, os.path.join(tmp, "single"))
    data = load_split(cfg, "train", cfg.train_limit)
    loader = make_loader(cfg, data, train=True, device="cpu")
    seed_everything(cfg.seed)
    L = build_learner(cfg, data.info, "cpu")
    opt = build_optimizer(cfg, L)
    total = 0.0
    n = 0
    for i, (x, y) in enumerate(loader.epoch(0)):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, i, len(loader))
        t0 = time.perf_counter()
        L.train_step(x, y)
        opt.step()
        total += time.perf_counter() - t0
        n += 1
    return {"images_per_s": args.batch * n / total, "seconds_per_iter": total / n, "steps": n,
            "threads": args.single_threads}


def run_pipe(args, tmp: str) -> dict:
    from manlearn.train.pipeline import run_pipeline

    cfg = base_cfg(args, os.path.join(tmp, "pipe")).model_copy(
        update={"pipeline_workers": args.workers, "pipeline_queue_depth": args.queue_depth})
    s = run_pipeline(cfg, threads=args.threads_per_worker)
    return {"images_per_s": s["images_per_s"], "seconds_per_iter": s["seconds_per_iter"], "steps": s["steps"],
            "test_acc": s["test_acc"], "workers": args.workers, "threads_per_worker": args.threads_per_worker,
            "ranges": s["ranges"], "worker_busy_s": s["worker_busy_s"], "worker_compute_s": s["worker_compute_s"],
            "block_flops": s["block_flops"]}


def per_block(args) -> dict:
    """Median time of each block's local step (+ its share of the optimiser step) on one thread."""
    from manlearn.data import load_dataset
    from manlearn.rules import LocalBatch
    from manlearn.train.build import build_learner

    torch.set_num_threads(1)
    cfg = base_cfg(args, "unused")
    info = load_dataset(cfg.dataset, split="test", data_dir=cfg.data_dir, limit=8, image_size=cfg.image_size).info
    torch.manual_seed(0)
    L = build_learner(cfg, info, "cpu")
    x = L.prepare_input(torch.randn(args.batch, info.in_channels, info.image_size, info.image_size))
    y = torch.randint(0, info.num_classes, (args.batch,))
    b = LocalBatch(x, y, L.norm_mean, L.norm_std)
    opts = []
    for k in range(L.K):
        mods = [L.blocks[k]] + ([L.auxes[k]] if k < L.K - 1 else [L.head])
        ps = [p for m in mods for p in m.parameters() if p.requires_grad]
        opts.append(torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True))
    times: list[list[float]] = [[] for _ in range(L.K)]
    out_bytes: list[int] = []
    for it in range(args.block_iters + 1):
        h = x
        for k in range(L.K):
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            h, _ = L.local_step(k, h, b)
            opts[k].step()
            dt = time.perf_counter() - t0
            if it > 0:
                times[k].append(dt)
            if it == 0:
                out_bytes.append(h.numel() * h.element_size())
    med = [statistics.median(t) for t in times]
    return {"block_s": med, "block_out_bytes": out_bytes, "image_bytes": x.numel() * x.element_size(),
            "label_bytes": y.numel() * y.element_size()}


def model(blocks: dict, ranges, batch: int) -> dict:
    stage = [sum(blocks["block_s"][a:b]) for a, b in ranges]
    seq = sum(blocks["block_s"])
    return {"stage_s": stage, "sequential_s": seq, "predicted_speedup": seq / max(stage),
            "predicted_pipeline_images_per_s": batch / max(stage), "predicted_single_images_per_s": batch / seq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--method", default="manpp")
    ap.add_argument("--base", default="infopro")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60, help="training steps of each run (one epoch of that many)")
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--single-threads", type=int, default=2)
    ap.add_argument("--queue-depth", type=int, default=2)
    ap.add_argument("--block-iters", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--tiny", action="store_true", help="smoke test: resnet20 on digits, few steps")
    args = ap.parse_args()
    if args.tiny:
        args.dataset, args.model, args.K, args.batch, args.steps, args.test_limit = "digits", "resnet20", 4, 32, 6, 100
        args.block_iters = 2
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        single = run_single(args, tmp)
        pipe = run_pipe(args, tmp)
    blocks = per_block(args)
    pred = model(blocks, pipe["ranges"], args.batch)
    cut = [b for a, b in pipe["ranges"][:-1]]
    comm = [blocks["block_out_bytes"][c - 1] + blocks["image_bytes"] * (args.base.startswith("infopro")
            or args.method.startswith("infopro")) + blocks["label_bytes"] for c in cut]
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0]},
        "setting": {k: getattr(args, k) for k in ("dataset", "model", "method", "base", "K", "batch", "steps",
                                                  "workers", "threads_per_worker", "single_threads", "queue_depth")},
        "single": single, "pipeline": pipe, "per_block": blocks, "model": pred,
        "speedup": pipe["images_per_s"] / single["images_per_s"],
        "bytes_per_step_per_boundary": comm,
    }
    print(f"\n{args.model} {args.method}/{args.base} K={args.K} batch {args.batch}, {args.steps} steps each")
    print("| run | images/s | s/iter |\n|---|---|---|")
    print(f"| 1 process x {args.single_threads} threads | {single['images_per_s']:.1f} | {single['seconds_per_iter']:.3f} |")
    print(f"| pipeline {args.workers} workers x {args.threads_per_worker} thread | {pipe['images_per_s']:.1f} | "
          f"{pipe['seconds_per_iter']:.3f} |")
    print(f"speed-up: {res['speedup']:.2f}x; blocks per worker {pipe['ranges']}; worker busy/compute s "
          f"{[round(v, 1) for v in pipe['worker_busy_s']]}/{[round(v, 1) for v in pipe['worker_compute_s']]}")
    print(f"per-block step s (1 thread): {[round(v, 4) for v in blocks['block_s']]}")
    print(f"model: stage s {[round(v, 3) for v in pred['stage_s']]}, predicted speed-up over 1 thread "
          f"{pred['predicted_speedup']:.2f}x, {pred['predicted_pipeline_images_per_s']:.1f} images/s; "
          f"bytes crossing each boundary per step {comm}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
