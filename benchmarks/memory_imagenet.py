"""Peak activation memory of one training step at ImageNet shapes (224x224): local learning vs backprop.

Same accounting as ``benchmarks/memory.py`` (``manlearn.memory.PeakMemory``): the bytes autograd keeps
alive for backward (saved tensors, deduplicated by storage, weights excluded), peak over one
``train_step``. Deterministic, so it can be measured on a CPU; on CUDA the allocator's peak (weights,
gradients and workspace included) is reported as well.

Cases (each against its own backprop baseline):
  - ResNet-101, K=4 published split (stem in block 1), InfoPro+MAN++ with the ImageNet heads, vs E2E;
    InfoPro without MAN for reference. The MAN paper reports ~47 % less GPU memory on ImageNet
    (19.71 GB vs ~10.4 GB per GPU, whole-process figures).
  - ViT-B/16, K=4 groups of 3 blocks, MAN++ (SPEC 3.4 auxiliary network), vs BP.

    OMP_NUM_THREADS=1 python benchmarks/memory_imagenet.py [--batch 8] [--device cpu] [--cases r101 vitb]
"""
from __future__ import annotations

import argparse
import json

import torch

import manlearn
from manlearn.memory import PeakMemory
from manlearn.rules import LocalBatch

CASES = {
    "r101": [("resnet101", "e2e", None, 1), ("resnet101", "infopro", None, 4), ("resnet101", "manpp", "infopro", 4)],
    "r152": [("resnet152", "e2e", None, 1), ("resnet152", "manpp", "infopro", 4)],
    "vitb": [("vit_base", "e2e", None, 1), ("vit_base", "manpp", "dgl", 4)],
    "vitt": [("vit_tiny", "e2e", None, 1), ("vit_tiny", "manpp", "dgl", 4)],
}


def measure(model: str, method: str, base: str | None, K: int, args) -> dict:
    torch.manual_seed(0)
    options = {} if base is None else {"base": base, **({"heads": "imagenet"} if base == "infopro" else {})}
    learner = manlearn.LocalLearner(model=model, method=method, K=K, split="paper" if K > 1 else "auto",
                                    stem_module=False, num_classes=1000, image_size=224, **options).to(args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    y = torch.randint(0, 1000, (args.batch,), device=args.device)
    if args.device != "cpu":
        learner.train_step(x, y)  # warm-up (allocator caches, cuDNN autotuning)
    with PeakMemory(args.device, exclude=learner.parameters()) as pm:
        learner.train_step(x, y)
    # per block: the same step, one tracker per block (graphs are freed block by block, so the step's
    # peak is the largest of these)
    per_block = []
    h, batch = x, LocalBatch(x, y, learner.norm_mean, learner.norm_std)
    learner.zero_grad(set_to_none=True)
    for k in range(learner.K):
        with PeakMemory("cpu", exclude=learner.parameters()) as pb:
            h, _ = learner.local_step(k, h, batch)
        per_block.append(pb.peak_activation_bytes / 2**20)
    name = method if base is None or method in ("e2e", "infopro") else f"{base}+{method}"
    return dict(model=model, method=name, K=learner.K, batch=args.batch,
                blocks=[len(b) for b in learner.blocks],
                peak_activation_MiB=pm.peak_activation_bytes / 2**20, per_block_MiB=per_block,
                cuda_peak_MiB=(pm.cuda_peak / 2**20) if pm.cuda_peak is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="+", default=["r101", "vitb"], choices=sorted(CASES))
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, 224x224, batch {args.batch}, device {args.device}")
    cuda = args.device != "cpu"
    print("| model | method | K | modules per block (stem + units) | peak activations (MiB) | vs backprop "
          "| per block (MiB) |" + (" CUDA peak (MiB) |" if cuda else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    rows = []
    for case in args.cases:
        base_row = None
        for spec in CASES[case]:
            r = measure(*spec, args)
            rows.append(r)
            if r["method"] == "e2e":
                base_row = r
            rel = ""
            if base_row is not None and r is not base_row:
                rel = f"{100 * (1 - r['peak_activation_MiB'] / base_row['peak_activation_MiB']):.1f}% less"
            extra = f" {r['cuda_peak_MiB']:.0f} |" if r["cuda_peak_MiB"] is not None else ""
            print(f"| {r['model']} | {r['method']} | {r['K']} | {r['blocks']} | {r['peak_activation_MiB']:.1f} | "
                  f"{rel} | {' / '.join(f'{v:.0f}' for v in r['per_block_MiB'])} |{extra}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
