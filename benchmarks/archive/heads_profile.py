"""Issue #17, item 2: where the auxiliary heads' time goes, op by op and shape by shape.

Runs the heads of every local block of a ResNet-32 K=16 learner (the part after MAN/MAN++'s
ema/lb units, on the fused features of one batch) forward and backward under ``torch.profiler``
with shapes recorded, and prints the convolution and batch-norm calls that take the most time with
their shapes, call counts and, for convolutions, the rate (FLOPs from the shapes).

    .venv/bin/python benchmarks/heads_profile.py --method infopro+manpp
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.profiler import ProfilerActivity, profile

from manlearn.bench.speed import build
from manlearn.rules import LocalBatch, MomentumAux, heads_of


def conv_flops(name: str, shapes: list, out_hw: dict) -> float | None:
    """FLOPs of one conv call from its recorded shapes. Backward (grad_out, input, weight): the input and
    the weight gradient, 2x the forward. Forward (input, weight, ...): the output size is not recorded,
    so it is read from the backward call with the same input and weight (``out_hw``)."""
    if name == "aten::convolution_backward" and len(shapes) >= 3 and len(shapes[0]) == 4 and len(shapes[2]) == 4:
        g, w = shapes[0], shapes[2]
        return 2 * 2.0 * g[0] * g[2] * g[3] * math.prod(w)
    if name == "aten::mkldnn_convolution" and len(shapes) >= 2 and len(shapes[1]) == 4:
        hw = out_hw.get((tuple(shapes[0]), tuple(shapes[1])))
        return None if hw is None else 2.0 * shapes[0][0] * math.prod(shapes[1]) * hw
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="infopro+manpp")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    learner, _ = build("resnet32", args.method, args.K, "cpu", channels_last=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    x = learner.prepare_input(x)
    batch = LocalBatch(x, y, learner.norm_mean, learner.norm_std)
    inputs, h = [], x
    with torch.no_grad():
        for k in range(learner.K - 1):
            h = learner.run_block(k, h)
            aux = learner.auxes[k]
            inputs.append(aux.fuse(h) if isinstance(aux, MomentumAux) else h)

    def run() -> None:
        for k, f in enumerate(inputs):
            heads_of(learner.auxes[k])(f.detach().requires_grad_(True), batch).backward()

    run()
    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if "convolution" in e.key or "batch_norm" in e.key]
    out_hw = {(tuple(e.input_shapes[1]), tuple(e.input_shapes[2])): e.input_shapes[0][2] * e.input_shapes[0][3]
              for e in events if e.key == "aten::convolution_backward" and len(e.input_shapes[0]) == 4}
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    events.sort(key=lambda e: -e.self_cpu_time_total)
    print(f"# {args.method}, K={args.K}, batch {args.batch}, threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}: the heads of all {len(inputs)} local blocks, one forward + backward, "
          f"{total / 1e3:.0f} ms self time in all")
    print("| op | input shapes | calls | ms per call | share of the heads' time | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for e in events[:args.top]:
        shapes = [s for s in e.input_shapes if s]
        flops = conv_flops(e.key, e.input_shapes, out_hw)
        per_call = e.self_cpu_time_total / e.count / 1e3
        rate = f"{flops / (per_call / 1e3) / 1e9:.0f}" if flops else ""
        print(f"| {e.key.replace('aten::', '')} | {shapes[:3]} | {e.count} | {per_call:.2f} | "
              f"{e.self_cpu_time_total / total:.1%} | {rate} |")


if __name__ == "__main__":
    main()
