"""``manlearn bench memory | speed | accuracy | report``: the benchmark driver of the CLI."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from ..runtime import resolve_device
from .common import ALL_METHODS, parse_method

RESULTS = Path("benchmarks/results")


def _positive(name: str, values) -> None:
    for v in values:
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")


def _check_results(path: str, flag: str = "--results") -> None:
    """A results file goes into a folder that can be written (checked before any measuring)."""
    from ..errors import OutputError
    from ..train.outputs import check_writable_dir

    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{flag} {p} is a folder; give the path of a .jsonl file")
    check_writable_dir(p.parent, f"the folder of {flag} {p}:")


def cmd_accuracy(args: argparse.Namespace) -> int:
    from .accuracy import run_accuracy

    _check_results(args.results)
    from ..train.outputs import check_writable_dir

    check_writable_dir(args.runs_dir, "--runs-dir")
    _positive("--K", args.K)
    _positive("--epochs", [args.epochs])
    _positive("--workers", [args.workers])
    if args.threads is not None:
        _positive("--threads", [args.threads])
    if args.workers > 1:
        from .accuracy import run_workers

        argv = ["--methods", *args.methods, "--K", *map(str, args.K), "--epochs", str(args.epochs),
                "--seeds", *map(str, args.seeds), "--results", args.results, "--runs-dir", args.runs_dir,
                *(["--rerun"] if args.rerun else []), *args.overrides]
        for spec in args.methods:
            parse_method(spec)  # refuse bad specs here, not once per worker
        return run_workers(argv, args.workers, args.threads)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_accuracy(args.methods, args.K, args.epochs, args.seeds, args.results, args.runs_dir,
                     extra=args.overrides, rerun=args.rerun)
    except KeyboardInterrupt as e:  # the trainer's TrainingInterrupted says what was saved and at which step
        what = getattr(e, "what", "") or str(e)  # without "continue with --resume": a sweep resumes its runs itself
        print(f"{what}; the same command continues the sweep from there" if what else "interrupted",
              file=sys.stderr, flush=True)
        return int(getattr(e, "exit_code", 130))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from .memory import run_memory

    _positive("--K", args.K)
    _positive("--batch", args.batch)
    resolve_device(args.device)  # an unknown or absent device: one line, before any measuring
    _check_results(args.results)
    if args.image_size is not None:
        _positive("--image-size", [args.image_size])
    if args.num_classes is not None:
        _positive("--num-classes", [args.num_classes])
    run_memory(args.model, args.methods, args.K, args.batch, args.results, device=args.device,
               rss=not args.no_rss, checkpointing=not args.no_checkpointing, split=args.split,
               fixed_malloc=not args.rss_default_malloc, stem_module=not args.no_stem_module,
               image_size=args.image_size, num_classes=args.num_classes, imports=getattr(args, "imports", []),
               plan=args.plan)
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from .speed import run_speed

    _positive("--K", [args.K])
    _positive("--batch", [args.batch])
    _positive("--iters", [args.iters])
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if len(set(args.amp)) != len(args.amp):
        raise ConfigError(f"--amp lists a mode twice: {' '.join(args.amp)}")
    resolve_device(args.device)
    _check_results(args.results)
    run_speed(args.model, args.methods, args.K, args.batch, args.iters, args.warmup, args.results,
              device=args.device, channels_last=not args.no_channels_last, breakdown=not args.no_breakdown,
              compile=args.compile, amps=args.amp)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import check_results_dir, write_report

    from ..train.outputs import check_writable_dir

    results_dir = check_results_dir(args.results_dir)  # before the plots folder is made
    write_report(results_dir, check_writable_dir(args.plots_dir, "--plots-dir"))
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its parts on the main parser's subcommands."""
    p = sub.add_parser("bench", help="memory, speed and accuracy of every rule side by side",
                       description="Benchmarks that append JSON rows (machine, versions, date, commit "
                                   "included) to benchmarks/results/, and a report that turns them into "
                                   "the tables and plots of BENCHMARKS.md.")
    bsub = p.add_subparsers(dest="part", metavar="PART", required=True)

    a = bsub.add_parser("accuracy", help="FM-R32 (SPEC §8) test accuracy per rule, K and seed")
    a.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    a.add_argument("--K", nargs="+", type=int, default=[16])
    a.add_argument("--epochs", type=int, default=1)
    a.add_argument("--seeds", nargs="+", type=int, default=[0])
    a.add_argument("--results", default=str(RESULTS / "accuracy.jsonl"))
    a.add_argument("--runs-dir", default="runs/bench-accuracy")
    a.add_argument("--rerun", action="store_true", help="run again even if the results file has the run")
    a.add_argument("--workers", type=int, default=1,
                   help="run the sweep in this many processes that share the results file (each claims a run)")
    a.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per process (default: torch's, or the CPU count / --workers)")
    a.add_argument("overrides", nargs="*", help="extra key=value config overrides for every run")
    a.set_defaults(func=cmd_accuracy)

    m = bsub.add_parser("memory", help="activation / total / process-peak memory per rule and K")
    m.add_argument("--model", default="resnet32", help="a registered model, or one registered by --import FILE")
    m.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    m.add_argument("--K", nargs="+", type=int, default=[16])
    m.add_argument("--batch", nargs="+", type=int, default=[128, 1024])
    m.add_argument("--split", default="auto")
    m.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: the learner's default, 32; ImageNet models: give 224)")
    m.add_argument("--num-classes", type=int, default=None, help="classes of the classifier (default 10)")
    m.add_argument("--plan", action="store_true", help="also record the memory plan's figures beside each row")
    m.add_argument("--no-stem-module", action="store_true", help="the stem joins the first block (MAN/InfoPro tables)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-RSS measurement")
    m.add_argument("--no-checkpointing", action="store_true", help="skip E2E + gradient checkpointing")
    m.add_argument("--rss-default-malloc", action="store_true",
                   help="measure RSS with glibc's dynamic mmap threshold (freed memory is kept, RSS overstates)")
    m.add_argument("--results", default=str(RESULTS / "memory.jsonl"))
    m.set_defaults(func=cmd_memory)

    s = bsub.add_parser("speed", help="s/it and images/s of every rule vs E2E, interleaved, with breakdown")
    s.add_argument("--model", default="resnet32")
    s.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    s.add_argument("--K", type=int, default=16)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--iters", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-channels-last", action="store_true")
    s.add_argument("--no-breakdown", action="store_true", help="skip the backbone/aux/EMA breakdown")
    s.add_argument("--compile", action="store_true", help="torch.compile blocks, auxes and head (no breakdown)")
    s.add_argument("--amp", nargs="+", default=["off"], choices=["off", "bf16", "fp16"],
                   help="autocast modes, each timed interleaved with the others (bf16 also on a CPU)")
    s.add_argument("--results", default=str(RESULTS / "speed.jsonl"))
    s.set_defaults(func=cmd_speed)

    r = bsub.add_parser("report", help="markdown tables and PNG plots from the results files")
    r.add_argument("--results-dir", default=str(RESULTS))
    r.add_argument("--plots-dir", default="benchmarks/plots")
    r.set_defaults(func=cmd_report)
