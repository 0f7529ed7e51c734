"""Peak activation memory of one training step, per method (device-independent accounting).

Counts the bytes autograd keeps alive for backward (saved tensors, deduplicated by storage, weights
excluded) and reports their peak during one ``train_step``: the quantity that local learning saves.
On CUDA, the allocator's peak (``torch.cuda.max_memory_allocated``, weights, grads and workspace
included) is reported as well.

    python benchmarks/memory.py [--model resnet32] [--K 16] [--batch 128] [--device cpu]
"""
from __future__ import annotations

import argparse
import json

import torch

import manlearn
from manlearn.memory import PeakMemory


def measure(spec: str, args) -> dict:
    base, method = spec.split("+") if "+" in spec else ("infopro", spec)
    torch.manual_seed(0)
    learner = manlearn.LocalLearner(model=args.model, method=method, base=base, K=args.K,
                                    split=args.split, stem_module=not args.no_stem_module).to(args.device)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    learner.train_step(x, y)  # warm-up (allocator caches, lazy init)
    with PeakMemory(args.device, exclude=learner.parameters()) as pm:
        learner.train_step(x, y)
    return dict(method=spec, K=learner.K, peak_activation_MiB=pm.peak_activation_bytes / 2**20,
                cuda_peak_MiB=(pm.cuda_peak / 2**20) if pm.cuda_peak is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--split", default="auto")
    ap.add_argument("--no-stem-module", action="store_true")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["e2e", "greedy", "dgl", "infopro", "dgl+manpp", "infopro+manpp"])
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {args.model}, K={args.K}, split={args.split}, batch {args.batch}, "
          f"device {args.device}")
    rows = [measure(s, args) for s in args.methods]
    e2e = next((r["peak_activation_MiB"] for r in rows if r["method"] == "e2e"), None)
    print("| method | K | peak activations (MiB) | vs e2e |" + (" CUDA peak (MiB) |" if args.device != "cpu" else ""))
    print("|---|---|---|---|" + ("---|" if args.device != "cpu" else ""))
    for r in rows:
        rel = f"{100 * (1 - r['peak_activation_MiB'] / e2e):.0f}% less" if e2e and r["method"] != "e2e" else ""
        cuda = f" {r['cuda_peak_MiB']:.0f} |" if r["cuda_peak_MiB"] is not None else ""
        print(f"| {r['method']} | {r['K']} | {r['peak_activation_MiB']:.1f} | {rel} |{cuda}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
