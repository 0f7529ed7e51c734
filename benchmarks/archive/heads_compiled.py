"""Issue #17, item 2: the auxiliary heads' rate, eager vs ``torch.compile`` of the heads alone.

The profile (BENCHMARKS.md) puts the heads' missing rate in per-element passes (batch norm,
ReLU, their backwards) around small convolutions, which eager PyTorch runs one kernel each; a
compiler can fuse them. This builds each method twice with the same weights: as is, and with
every auxiliary network's heads (for MAN/MAN++: ``aux.heads``, the part after the ema/lb units;
otherwise the whole aux) wrapped in ``torch.compile``. Both are stepped **interleaved** with the
speed benchmark's timed parts (``manlearn.bench.speed.breakdown_step``); the FLOPs of each part
come from the eager copy (the same work). First it checks that both copies give the same losses
and gradients on one batch (the compiled heads compute the same thing, to float tolerance).

    .venv/bin/python benchmarks/heads_compiled.py --methods dgl+manpp infopro+manpp --rounds 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from manlearn.bench.common import append_rows, environment
from manlearn.bench.speed import breakdown_step, build, flop_breakdown
from manlearn.rules import heads_of


def compile_heads(learner) -> None:
    """Compile every auxiliary network's heads in place."""
    for aux in learner.auxes:
        heads_of(aux).compile(dynamic=False)


def max_grad_diff(a, b) -> float:
    """Largest gradient difference between the two copies, relative to the largest gradient of the
    learner (per-parameter relative differences are meaningless for parameters whose true gradient is
    zero, such as a bias right before a batch norm)."""
    pairs = []
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na.replace("_orig_mod.", "") == nb.replace("_orig_mod.", ""), (na, nb)
        if pa.grad is not None or pb.grad is not None:
            pairs.append((pa.grad, pb.grad))
    scale = max(ga.abs().max().item() for ga, _ in pairs)
    return max((ga - gb).abs().max().item() for ga, gb in pairs) / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["dgl+manpp", "infopro+manpp"])
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results", default="benchmarks/results/heads_compiled.jsonl")
    ap.add_argument("--check-only", action="store_true",
                    help="compare losses and gradients on one batch and stop (no timing)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="with --check-only: float64 tells rounding from a real difference")
    args = ap.parse_args()
    if args.dtype != "float32" and not args.check_only:
        ap.error("--dtype float64 is for --check-only (the timings are of float32)")
    dtype = getattr(torch, args.dtype)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    built = {}
    for spec in args.methods:
        eager, opt_e = build("resnet32", spec, args.K, "cpu", channels_last=True)
        comp, opt_c = build("resnet32", spec, args.K, "cpu", channels_last=True)
        comp.load_state_dict(eager.state_dict())  # the same weights, whatever the build's seeding
        eager.to(dtype)
        comp.to(dtype)
        compile_heads(comp)
        # same losses and gradients on one batch, before any optimiser step (compiles the heads too)
        t0 = time.perf_counter()
        le = eager.train_step(x, y)
        lc = comp.train_step(x, y)
        compile_s = time.perf_counter() - t0
        loss_diff = max(abs(a - b) for a, b in zip(le.losses, lc.losses))
        grad_diff = max_grad_diff(eager, comp)
        print(f"{spec} ({args.dtype}): first step (compiling) {compile_s:.0f} s; max |loss diff| {loss_diff:.2e}, "
              f"max relative grad diff {grad_diff:.2e}", flush=True)
        if args.check_only:
            continue
        built[spec] = dict(eager=(eager, opt_e), compiled=(comp, opt_c), loss_diff=loss_diff, grad_diff=grad_diff,
                           gflops={k: v / 1e9 for k, v in flop_breakdown(eager, opt_e, x, y).items()})
    if args.check_only:
        return
    parts: dict[tuple[str, str], list[dict[str, float]]] = {}
    for i in range(args.warmup + args.rounds):
        for spec in args.methods:
            for kind in ("eager", "compiled"):
                learner, opt = built[spec][kind]
                t = breakdown_step(learner, opt, x, y)
                if i >= args.warmup:
                    parts.setdefault((spec, kind), []).append(t)
    env = environment("cpu")
    rows = []
    print("| method | heads | backbone s | heads s | heads GFLOP | heads GFLOP/s | backbone GFLOP/s | heads / backbone rate | step s (sum of parts) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.methods:
        gf = built[spec]["gflops"]
        for kind in ("eager", "compiled"):
            ts = parts[(spec, kind)]
            med = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
            total = statistics.median(sum(t.values()) for t in ts)
            bb_rate = gf["backbone"] / med["backbone"]
            hd_rate = gf["aux_heads"] / med["aux_heads"]
            row = dict(method=spec, heads=kind, K=args.K, batch=args.batch, rounds=args.rounds, warmup=args.warmup,
                       parts_s=med, step_s=total, gflops=gf, heads_gflop_s=hd_rate, backbone_gflop_s=bb_rate,
                       loss_diff=built[spec]["loss_diff"], grad_diff=built[spec]["grad_diff"], **env)
            rows.append(row)
            print(f"| {spec} | {kind} | {med['backbone']:.3f} | {med['aux_heads']:.3f} | {gf['aux_heads']:.1f} | "
                  f"{hd_rate:.0f} | {bb_rate:.0f} | {hd_rate / bb_rate:.0%} | {total:.3f} |", flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    append_rows(args.results, rows)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
