"""Command-line front end: ``manlearn train | eval | plan | list | data | bench``.

Every refusal that manlearn can explain (a :class:`~manlearn.errors.ManlearnError`: bad config
key or value, missing dataset, foreign checkpoint...) is printed as ``error: <message>`` on
stderr with exit status 2 (3 for a run that diverged: :class:`~manlearn.errors.DivergenceError`) — a user should never have to read a traceback to learn that a key
was misspelt.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from manlearn.errors import ConfigError, DivergenceError, ManlearnError, one_line_warning
from manlearn.plugins import file_digests, import_user_code
# Recipe lookup lives in manlearn.recipes; re-exported here for callers of the former cli functions.
from manlearn.recipes import list_recipes, resolve_recipe

__all__ = ["main", "build_parser", "list_recipes", "resolve_recipe"]


def _fmt_bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _fit(trainer: Any) -> dict[str, Any] | int:
    """``trainer.fit()``; after Ctrl-C or SIGTERM the exit status (130 / 143), having said where the last
    checkpoint is."""
    try:
        return trainer.fit()
    except KeyboardInterrupt as e:  # the trainer's TrainingInterrupted says what was saved and at which step
        print(f"\n{e}" if str(e) else f"\ninterrupted at step {trainer.step}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


def _print_seconds_per_iter(summary: dict[str, Any]) -> None:
    spi = summary["seconds_per_iter"]
    print(f"seconds/iter: {spi:.4f}" if spi is not None else "seconds/iter: n/a")


def _print_steps(summary: dict[str, Any]) -> None:
    """The last line of every run summary: steps, elapsed time, checkpoint."""
    print(f"steps: {summary['steps']}  elapsed: {summary['elapsed_s']:.1f} s  checkpoint: {summary['checkpoint']}"
          + ("  (stopped at max_steps)" if summary["stopped_early"] else ""))


def _print_test_acc(summary: dict[str, Any]) -> None:
    acc = summary["test_acc"]
    print(f"test accuracy: {acc:.4f}" if acc is not None else "test accuracy: n/a")


# ---------------------------------------------------------------------------------- commands


def _resumed_imports(cfg: Any, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``--resume``: the code the run imported (and its recorded digests), imported again now. Read from the
    run's config.yaml (written with its checkpoints), so that the checkpoint is loaded once, by the trainer;
    from the checkpoint without it."""
    from manlearn.config import read_config_file
    from manlearn.train import CKPT_NAME, load_checkpoint

    run = Path(cfg.out_dir)
    if not args.resume or not (run / CKPT_NAME).is_file():
        return [], {}
    recorded = read_config_file(run / "config.yaml") if (run / "config.yaml").is_file() else \
        load_checkpoint(run / CKPT_NAME).get("config") or {}
    saved, digests = list(recorded.get("imports") or []), dict(recorded.get("import_digests") or {})
    import_user_code(saved, digests)
    return saved, digests


def recorded_imports(specs: Sequence[str]) -> list[str]:
    """The imports a run records: a ``.py`` file by its absolute path, so that ``eval`` and ``--resume`` import
    it again from any directory (module names as given); each once, in order."""
    out = [str(Path(s).resolve()) if str(s).endswith(".py") else str(s) for s in specs]
    return list(dict.fromkeys(out))


def cmd_train(args: argparse.Namespace) -> int:
    """``manlearn train [CONFIG] [key=value ...]``: every task through one :class:`~manlearn.train.Trainer`."""
    from manlearn.config import TrainConfig, apply_overrides, load_config, validate
    from manlearn.train import Trainer

    items = list(args.items)
    config_path = None
    if items and "=" not in items[0]:
        config_path = resolve_recipe(items.pop(0))
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {', '.join(bad)}")
    cfg = load_config(config_path, check=False) if config_path else TrainConfig()
    cfg = apply_overrides(cfg, items, check=False)
    # --import'ed code is recorded in the run's config, so `manlearn eval` and --resume import it again
    resumed, digests = _resumed_imports(cfg, args)
    cfg.imports = recorded_imports([*getattr(args, "imports", []), *cfg.imports, *resumed])
    cfg.import_digests = {**file_digests(cfg.imports), **digests}  # a resumed run keeps what it started with
    cfg = validate(cfg)
    if cfg.pipeline_workers:
        return _train_pipeline(cfg, args)
    trainer = Trainer.from_config(cfg, resume=args.resume, overwrite=args.overwrite)
    summary: dict[str, Any] | int | None = None
    try:
        summary = _fit(trainer)
    finally:
        if trainer.dist.enabled:  # data parallel under torchrun: leave the group cleanly (every rank stopped
            from manlearn.distributed import cleanup  # at the same step after a SIGTERM)

            cleanup(sync=isinstance(summary, dict) or summary == 143)
    if not isinstance(summary, dict):
        return summary if summary is not None else 130
    if not trainer.dist.is_main:
        return 0
    print(trainer.run.metrics_text(summary["metrics"]))
    _print_seconds_per_iter(summary)
    kind = summary["peak_mem_kind"]
    rss = ""
    if kind != "process peak RSS":
        from manlearn.memory import peak_rss_bytes

        rss = f"; process peak RSS {_fmt_bytes(peak_rss_bytes())}"
    print(f"peak memory: {_fmt_bytes(summary['peak_mem_bytes'])} ({kind}){rss}")
    _print_steps(summary)
    return 0


def _train_pipeline(cfg: Any, args: argparse.Namespace) -> int:
    """``pipeline_workers=N``: the K blocks over N worker processes on this host (docs/scaling.md)."""
    from manlearn.distributed import env_world_size
    from manlearn.train.interrupt import TrainingInterrupted
    from manlearn.train.pipeline import run_pipeline

    if env_world_size() > 1:
        raise ConfigError("pipeline_workers is not combined with torchrun (data parallel) yet: start the "
                          "pipeline with a plain `manlearn train ... pipeline_workers=N`, which spawns its workers")
    try:
        summary = run_pipeline(cfg, overwrite=args.overwrite, resume=args.resume)
    except TrainingInterrupted as e:  # Ctrl-C or SIGTERM: it says what was saved and at which step
        print(f"\n{e}", file=sys.stderr)
        return e.exit_code
    ips = summary["images_per_s"]
    _print_test_acc(summary)
    print(f"images/s: {ips:.1f} (pipeline, {cfg.pipeline_workers} workers)" if ips else "images/s: n/a")
    _print_steps(summary)
    return 0


#: what ``manlearn eval`` may change of the run's config
EVAL_KEYS = ("eval_limit", "eval_batch_size", "data_dir", "device")


def cmd_eval(args: argparse.Namespace) -> int:
    """``manlearn eval CHECKPOINT [key=value ...]``: test accuracy, detection AP or segmentation mIoU, by the
    checkpoint's task, on the whole test set unless ``eval_limit`` says otherwise."""
    import difflib

    from manlearn.train import evaluate_checkpoint

    given: dict[str, str] = {}
    for item in args.items:
        key, eq, value = item.partition("=")
        if not eq or key not in EVAL_KEYS:
            close = difflib.get_close_matches(key, EVAL_KEYS, n=1)
            raise ConfigError(f"manlearn eval takes key=value overrides of {', '.join(EVAL_KEYS)}; got {item!r}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
        given[key] = value
    ints = {}
    for key in ("eval_limit", "eval_batch_size"):
        if key in given:
            try:
                ints[key] = int(given[key])
            except ValueError:
                raise ConfigError(f"{key} must be an integer >= 1, got {given[key]!r}") from None
            if ints[key] < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {ints[key]}")
    r = evaluate_checkpoint(args.checkpoint, device=given.get("device", "auto"), data_dir=given.get("data_dir"),
                            limit=ints.get("eval_limit"), batch_size=ints.get("eval_batch_size"))
    print(r["line"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """``manlearn plan [CONFIG] [key=value ...]``: the memory plan of a run's training step, without data."""
    import dataclasses

    from manlearn.config import TrainConfig, apply_overrides, load_config, validate
    from manlearn.data import get_dataset_info
    from manlearn.planning import plan_learner
    from manlearn.train import build_learner

    for name, v in (("--batch", args.batch), ("--image-size", args.image_size), ("--num-classes", args.num_classes)):
        if v is not None and v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    items = list(args.items)
    config_path = resolve_recipe(items.pop(0)) if items and "=" not in items[0] else None
    bad = [i for i in items if "=" not in i]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {', '.join(bad)}")
    cfg = load_config(config_path, check=False) if config_path else TrainConfig()
    cfg = apply_overrides(cfg, items, check=False)
    cfg.imports = list(dict.fromkeys([*getattr(args, "imports", []), *cfg.imports]))
    cfg = validate(cfg)
    from manlearn.train.registry import get_task

    if not get_task(cfg.task.name).plannable:
        raise ConfigError(f"memory plans cover classification runs; task {cfg.task.name!r} is not one")
    info = get_dataset_info(cfg.dataset)
    size = args.image_size or cfg.image_size
    if size:
        info = dataclasses.replace(info, image_size=size)
    if info.num_classes < 1:  # imagefolder: the classes come from the folder, which a plan does not read
        info = dataclasses.replace(info, num_classes=args.num_classes or 1000)
    elif args.num_classes:
        info = dataclasses.replace(info, num_classes=args.num_classes)
    batch = args.batch or cfg.batch_size
    from manlearn.planning import no_build_check

    with no_build_check():
        learner = build_learner(cfg, info, "cpu", load_pretrained=False)
    optimizer = cfg.optimizer if cfg.optimizer != "sgd" or cfg.sgd_momentum else "sgd-nomomentum"
    plan = plan_learner(learner, batch, optimizer=optimizer)
    print(plan.to_json() if args.json else plan.table())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``manlearn list [KIND]``: aligned tables of models, methods, datasets and recipes (manlearn.listing)."""
    from manlearn.listing import render

    print(render([args.kind] if args.kind else None))
    return 0


def cmd_make_mosaic(args: argparse.Namespace) -> int:
    """``manlearn data make-mosaic``: the Fashion-MNIST mosaic detection/segmentation set (COCO + masks)."""
    from manlearn.data.mosaic import make_mosaic

    s = make_mosaic(args.out, n_train=args.train, n_val=args.val, size=args.size, seed=args.seed,
                    data_dir=args.data_dir, overwrite=args.overwrite)
    print(f"mosaic: {s['n_train']} train / {s['n_val']} val images ({s['annotations_train']} / "
          f"{s['annotations_val']} objects, {s['size']}x{s['size']}, seed {s['seed']}) written to "
          f"{s['out_dir']} in {s['seconds']:.1f} s")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """``manlearn runs DIR``: one table comparing the runs in a folder."""
    from manlearn.train.report import runs_table

    print(runs_table(args.folder))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``manlearn plot RUN [RUN ...]``: the runs' curves in one figure."""
    from manlearn.train.report import plot_runs

    out = args.out or str(Path(args.runs[0]) / "curves.png")
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0


# ---------------------------------------------------------------------------------- parser


IMPORT_HELP = ("import your own code first (a module name or a .py file; repeatable): rules, tasks and models "
               "it registers become valid names, e.g. method=my-rule")


def _add_import(p: argparse.ArgumentParser) -> None:
    """``--import`` after the subcommand too (its own dest: a subparser's default would erase the main one's)."""
    p.add_argument("--import", dest="sub_imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help=IMPORT_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``manlearn``."""
    parser = argparse.ArgumentParser(
        prog="manlearn",
        description="Supervised local learning (DGL, InfoPro, MAN, MAN++) in PyTorch.")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help=IMPORT_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train", help="train a model",
        description="Train from a YAML config or recipe name (see `manlearn list`), with key=value "
                    "overrides. With no config: MAN++ (InfoPro) ResNet-32 K=16 on Fashion-MNIST (FM-R32).",
        epilog="examples:  manlearn train fm-r32-manpp-infopro epochs=1\n"
               "           manlearn train my-recipe.yaml data_dir=/data lr=0.4              (any YAML file)\n"
               "           manlearn train out_dir=runs/x --resume\n"
               "           torchrun --nproc_per_node 2 -m manlearn train epochs=1   (data parallel)\n"
               "           manlearn train pipeline_workers=2 epochs=1              (block pipeline)\n"
               "           manlearn train mosaic-retinanet-r50-k4-manpp max_steps=50  (detection)\n"
               "           manlearn train mosaic-deeplab-r50-e2e task.aspp_channels=32   (task keys: task.<key>=value)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML file or recipe name, then key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if <out_dir> holds a checkpoint")
    _add_import(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval", help="test accuracy (or detection AP / segmentation mIoU) of a checkpoint",
        description="Evaluate a checkpoint (or a run's folder) on its whole test / validation set, with the "
                    "run's own config; key=value overrides as for train: " + ", ".join(EVAL_KEYS) + ".",
        epilog="examples:  manlearn eval runs/x\n"
               "           manlearn eval runs/x/last.pt eval_limit=1000 device=cpu data_dir=/data/fm",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (e.g. runs/x/last.pt) or a run's folder")
    p.add_argument("items", nargs="*", metavar="[key=value ...]", help="overrides: " + ", ".join(EVAL_KEYS))
    _add_import(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plan", help="memory plan of a run's training step (per block, vs E2E and checkpointing)",
        description="What one training step of a run keeps, per block and auxiliary-network part, beside "
                    "E2E and E2E with gradient checkpointing (per stage, unit, sqrt), counted from real "
                    "steps at small batches (no data is read). Classification runs.",
        epilog="examples:  manlearn plan fm-r32-infopro-manpp\n"
               "           manlearn plan model=resnet50 K=4 base=dgl --image-size 224 --batch 32\n"
               "           manlearn --import my_net.py plan model=my-net K=4 split=memory --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]",
                   help="a YAML file or recipe name, then key=value overrides (as for train)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the config's batch_size)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the dataset's)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the dataset's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_import(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("runs", help="one table comparing the runs in a folder",
                       description="Every run folder (a folder with metrics.jsonl) under FOLDER: method, K, steps, "
                                   "test accuracy, best, s/it, peak memory, finished or not.")
    p.add_argument("folder", help="a folder of runs (e.g. runs/), or one run's folder")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("plot", help="the curves of one or more runs (losses per block, accuracy, MAN++'s s)",
                       description="One figure: every block's loss (one run) or the final block's (several runs), "
                                   "test accuracy, and MAN++'s s per block, against the step. Needs manlearn[plots].")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="the PNG to write (default: <first run>/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("list", help="models, methods, datasets and recipes",
                       description="Tables of what can be trained: models, methods (rules), datasets and "
                                   "recipes (./configs first, then the recipes shipped with manlearn).")
    p.add_argument("kind", nargs="?", choices=["models", "methods", "datasets", "recipes"],
                   help="print only this table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="dataset tools (make-mosaic)")
    dsub = p.add_subparsers(dest="data_command", metavar="TOOL", required=True)
    m = dsub.add_parser("make-mosaic", help="Fashion-MNIST mosaic detection/segmentation set (COCO + masks)")
    m.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    m.add_argument("--train", type=int, default=4000, help="training canvases (default 4000)")
    m.add_argument("--val", type=int, default=500, help="validation canvases (default 500)")
    m.add_argument("--size", type=int, default=128, help="canvas side in pixels (default 128)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: search)")
    m.add_argument("--overwrite", action="store_true", help="replace a mosaic already in --out")
    m.set_defaults(func=cmd_make_mosaic)

    from manlearn.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``manlearn`` console script and of ``python -m manlearn``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before, between or after the flags
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if overrides and hasattr(args, "items"):
        args.items = [*args.items, *overrides]
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.imports = [*args.imports, *getattr(args, "sub_imports", [])]  # --import before or after the subcommand
    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        import_user_code(args.imports)
        return int(args.func(args))
    except DivergenceError as e:  # the run itself failed (not the request): its own exit status
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ManlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `manlearn list | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
