"""Blocks in flight (issue #17): s/iter and peak activation memory of the sequential step vs the overlapped
step (manlearn.concurrency) with 2 and 3 blocks in flight, stepped interleaved in one run.

    .venv/bin/python benchmarks/blocks_in_flight.py [--methods dgl+manpp infopro+manpp] [--K 16]
        [--batch 128] [--iters 8] [--warmup 2] [--device cpu|cuda] [--amp off|bf16]

On the CPU the overlapped step runs the blocks' auxiliary work in worker threads; on CUDA it issues block k
on stream k mod N (manlearn.concurrency.stream_step) and the rows add torch.cuda.max_memory_allocated
of one step (weights, gradients and optimiser state included).

One iteration = train_step + SGD step (Nesterov, multi-tensor), ResNet-32, channels-last, random data;
all learners are built first and stepped round-robin, so machine-speed drift hits them alike; median of
the timed rounds. Memory: the activations kept for backward at the step's peak (the tracker of
manlearn.memory), measured in one extra step per learner. Rows: benchmarks/results/blocks_in_flight.jsonl.

On the CPU the same rounds also time the sequential step on T/S intra-op threads (T the machine's, S =
``--ceiling-streams``, default 2: one thread each on two cores) and S independent sequential steps run at
once, T/S threads each. Any split of the step into S streams of work of T/S threads can be at most
S x t(T threads) / t(T/S threads) faster than the sequential step, even with perfect overlap (which block
k+1's wait for block k's forward does not allow): printed as "ceiling". S streams also share the caches
and the memory bandwidth: S x t(T threads) / t(S at once) is the ceiling with that contention, what even
a step with no dependencies between its streams would gain. One more step of each overlapped learner
records how long each thread spends in block forwards and local losses ("busy"): what the threads idle
is what the scheduling loses.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from manlearn import LocalLearner  # noqa: E402
from manlearn.bench.common import append_rows, environment, parse_method  # noqa: E402
from manlearn.memory import PeakMemory  # noqa: E402


def build(spec: str, K: int, n: int, device: str, amp: str):
    torch.manual_seed(0)
    learner = LocalLearner("resnet32", K=K, channels_last=True, blocks_in_flight=n,
                           amp_dtype=torch.bfloat16 if amp == "bf16" else None, **parse_method(spec)).to(device)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          nesterov=True, weight_decay=1e-4, foreach=True)
    return learner, opt


def busy_shares(learner, step) -> list[float]:
    """Run ``step()`` once with the learner's per-block pieces timed; return each thread's busy share of
    it, the calling thread's first."""
    spans: dict[int, float] = {}
    names = ("forward_block", "local_loss", "local_step")

    def timed_piece(fn):
        def piece(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                tid = threading.get_ident()
                spans[tid] = spans.get(tid, 0.0) + time.perf_counter() - t0
        return piece

    for name in names:
        setattr(learner, name, timed_piece(getattr(learner, name)))
    try:
        t0 = time.perf_counter()
        step()
        total = time.perf_counter() - t0
    finally:
        for name in names:
            delattr(learner, name)  # back to the class's methods
    main_id = threading.get_ident()
    others = [v / total for k, v in spans.items() if k != main_id]
    return [spans.get(main_id, 0.0) / total, *others]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["dgl+manpp", "infopro+manpp"])
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ceiling-streams", type=int, default=2,
                    help="S for the CPU ceiling rows (S streams of T/S threads); 0 leaves them out")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "blocks_in_flight.jsonl")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("blocks_in_flight: --device cuda needs a CUDA device")
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    built = {(m, n): build(m, args.K, n, args.device, args.amp) for m in args.methods for n in args.in_flight}
    threads = torch.get_num_threads()
    streams = args.ceiling_streams if dev.type == "cpu" and threads > 1 else 0
    share = max(1, threads // streams) if streams else threads
    # the ceiling needs the sequential step at T threads (in flight 1) to compare with
    ceiling_methods = [m for m in args.methods if (m, 1) in built] if streams else []
    at_share = {m: build(m, args.K, 1, args.device, args.amp) for m in ceiling_methods}
    # S independent learners per method, stepped at once from S threads of T/S intra-op threads each
    at_once = {m: [build(m, args.K, 1, args.device, args.amp) for _ in range(streams)] for m in ceiling_methods}
    pool = ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(share,)) if at_once else None
    times = {key: [] for key in built}
    times_share = {m: [] for m in ceiling_methods}
    times_at_once = {m: [] for m in ceiling_methods}

    def timed(learner, opt) -> float:
        sync()
        t0 = time.perf_counter()
        learner.train_step(x, y)
        opt.step()
        sync()
        return time.perf_counter() - t0

    for i in range(args.warmup + args.iters):
        for key, (learner, opt) in built.items():
            t = timed(learner, opt)
            if i >= args.warmup:
                times[key].append(t)
        for m, (learner, opt) in at_share.items():
            torch.set_num_threads(share)
            try:
                t = timed(learner, opt)
            finally:
                torch.set_num_threads(threads)
            if i >= args.warmup:
                times_share[m].append(t)
            t0 = time.perf_counter()
            for fut in [pool.submit(timed, *lo) for lo in at_once[m]]:
                fut.result()
            if i >= args.warmup:
                times_at_once[m].append(time.perf_counter() - t0)
    ceilings = {}
    for m in ceiling_methods:
        seq, t_share, t_once = (statistics.median(v) for v in (times[(m, 1)], times_share[m], times_at_once[m]))
        ceilings[m] = dict(ceiling_streams=streams, ceiling_stream_threads=share,
                           sequential_at_stream_threads_s_per_it=t_share, ceiling_vs_sequential=streams * seq / t_share,
                           independent_steps_at_once=streams, independent_steps_at_once_s=t_once,
                           ceiling_with_contention_vs_sequential=streams * seq / t_once)
    env = environment(dev)
    rows = []
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, amp {args.amp}, batch {args.batch}, K={args.K}")
    for (m, n), (learner, opt) in built.items():
        with PeakMemory(dev, exclude=[*learner.parameters(), *learner.buffers()]) as pm:  # syncs, resets CUDA peak
            learner.train_step(x, y)
        allocated = pm.cuda_peak / 2**20 if pm.cuda_peak is not None else None
        med = statistics.median(times[(m, n)])
        seq = statistics.median(times[(m, 1)]) if (m, 1) in times else med
        row = dict(model="resnet32", method=m, K=learner.K, batch=args.batch, blocks_in_flight=n,
                   median_s_per_it=med, min_s=min(times[(m, n)]), speedup_vs_sequential=seq / med,
                   activation_peak_MiB=pm.peak_activation_bytes / 2**20, iters=args.iters, warmup=args.warmup,
                   amp=args.amp, **({"max_memory_allocated_MiB": allocated} if allocated is not None else {}), **env)
        if dev.type == "cpu" and n > 1:
            row["busy_share_main_then_workers"] = busy_shares(learner, lambda: timed(learner, opt))
        row.update(ceilings.get(m, {}))
        rows.append(row)
        print(f"{m:>14} in flight {n}: {med:.3f} s/it  x{row['speedup_vs_sequential']:.2f} vs sequential  "
              f"activations {row['activation_peak_MiB']:.1f} MiB"
              + (f"  allocated {allocated:.0f} MiB" if allocated is not None else "")
              + (f"  busy {', '.join(f'{100 * v:.0f}%' for v in row['busy_share_main_then_workers'])} (main, workers)"
                 if "busy_share_main_then_workers" in row else ""), flush=True)
    for m, c in ceilings.items():
        print(f"{m:>14} sequential on {share} thread(s): {c['sequential_at_stream_threads_s_per_it']:.3f} s/it; "
              f"ceiling of any split into {streams} streams of {share} thread(s): x{c['ceiling_vs_sequential']:.2f}; "
              f"{streams} independent steps at once: {c['independent_steps_at_once_s']:.3f} s, ceiling with "
              f"contention x{c['ceiling_with_contention_vs_sequential']:.2f}")
    append_rows(args.results, rows)


if __name__ == "__main__":
    main()
