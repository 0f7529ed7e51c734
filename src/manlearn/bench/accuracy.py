"""Accuracy part of the benchmark: the FM-R32 protocol (SPEC §8) for every rule, K and seed.

Each run is a normal :class:`~manlearn.train.Trainer` run of the FM-R32 recipe with ``method``,
``base``, ``K``, ``epochs`` and ``seed`` overridden; its final test accuracy, its accuracy after every
epoch and its timing are appended as one row to a results file. Runs already in the file are
skipped, so a long sweep can be stopped and continued (or spread over several sessions) and the file
is the record the tables and plots are built from. A run stopped part-way (Ctrl-C, SIGTERM, a lost
session) resumes exactly from its checkpoint in the runs folder the next time the sweep reaches it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import apply_overrides, load_config, validate
from ..errors import ConfigError
from .common import (append_rows, environment, parse_method, read_rows, run_key, spec_overrides, spec_slug,
                     sweep_overrides)

BASE_RECIPE = "fm-r32-infopro-manpp"  # carries every FM-R32 key; method/base/K are overridden


def fm_r32_config(spec: str, K: int, epochs: int, seed: int, out_dir: Path, extra: Sequence[str] = ()):
    """The FM-R32 TrainConfig of one run."""
    from ..recipes import resolve_recipe

    items = [*spec_overrides(spec), f"K={K}", f"epochs={epochs}", f"seed={seed}",
             f"out_dir={out_dir}", "progress=false"]
    cfg = load_config(resolve_recipe(BASE_RECIPE), check=False)
    return validate(apply_overrides(cfg, [*items, *extra], check=False))


def _claim(path: Path) -> Path | None:
    """Claim a run for this process (several ``bench accuracy`` workers may share a results file):
    the claim file is created exclusively and holds the PID; a claim whose process is gone is taken
    over. None when a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
                if pid != os.getpid():
                    return None
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass
            path.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def run_accuracy(methods: Sequence[str], Ks: Sequence[int], epochs: int, seeds: Sequence[int],
                 results: str | Path, runs_dir: str | Path = "runs/bench-accuracy",
                 extra: Sequence[str] = (), rerun: bool = False, say=print) -> list[dict[str, Any]]:
    """Run every (method, K, seed) not yet in ``results``; return all matching rows."""
    from ..train import Trainer

    for spec in methods:
        parse_method(spec)  # refuse bad specs before hours of training
    owned = {"method", "base", "K", "epochs", "seed", "out_dir"}  # the sweep's own keys, recorded in each row
    taken = [k for k in (e.split("=", 1)[0].strip() for e in extra) if k in owned]
    if taken:
        flag = {"method": "--methods", "base": "--methods (e.g. dgl+manpp)", "K": "--K", "epochs": "--epochs",
                "seed": "--seeds", "out_dir": "--runs-dir"}[taken[0]]
        raise ConfigError(f"the override {taken[0]}=... would replace the sweep's own setting (its rows would say "
                          f"otherwise): give it with {flag}")
    for seed in seeds:  # every override and seed checked before a run is claimed or started
        fm_r32_config(methods[0], Ks[0], epochs, seed, Path(runs_dir) / "check", extra)
    env = environment()  # the code that runs is the code at the start: record its commit now
    command = " ".join(["manlearn", "bench", "accuracy", "--methods", *methods, "--K", *map(str, Ks),
                        "--epochs", str(epochs), "--seeds", *map(str, seeds), *extra])
    limit = next((int(e.split("=", 1)[1]) for e in extra if e.startswith("train_limit=")), None)
    # with rerun, rows already in the file are ignored, but not those this sweep (or a worker beside it)
    # appends: each run is still done once
    ignore = len(read_rows(results)) if rerun else 0
    others = sweep_overrides(extra)
    # runs with other overrides get other folders (and claims), so two sweeps can share a runs_dir
    suffix = ("-" + spec_slug("-".join(others)) if len("-".join(others)) <= 48 else
              "-o" + hashlib.sha1("\n".join(others).encode()).hexdigest()[:10]) if others else ""
    out: list[dict[str, Any]] = []
    for seed in seeds:
        for K in Ks:
            for spec in methods:
                k_eff = 1 if parse_method(spec)["method"] == "e2e" else K
                key = (spec, k_eff, epochs, seed, limit, others)
                done = {run_key(r): r for r in read_rows(results)[ignore:]}  # re-read: other workers append
                if key in done:
                    say(f"skip {spec} K={k_eff} epochs={epochs} seed={seed}: already in {results}")
                    out.append(done[key])
                    continue
                name = f"{spec_slug(spec)}-K{k_eff}-e{epochs}-s{seed}{suffix}"
                run_dir = Path(runs_dir) / name
                cfg = fm_r32_config(spec, K, epochs, seed, run_dir, extra)  # before the claim: a refusal leaves none
                claim = _claim(Path(runs_dir) / f"{name}.claim")
                if claim is None:
                    say(f"skip {spec} K={k_eff} epochs={epochs} seed={seed}: another worker is running it")
                    continue
                resume = not rerun and (run_dir / "last.pt").exists()
                say(f"{'resume' if resume else 'run'} {spec} K={k_eff} epochs={epochs} seed={seed} -> {run_dir}")
                t0 = time.perf_counter()
                try:
                    trainer = Trainer.from_config(cfg, resume=True) if resume else Trainer.from_config(cfg, overwrite=True)
                    summary = trainer.fit()
                except BaseException:
                    claim.unlink(missing_ok=True)
                    raise
                history = [r.get("test_acc") for r in trainer.records if r.get("type") == "epoch"]
                aux = [{"step": r["step"], **r["aux"]} for r in trainer.records if r.get("type") == "train" and r.get("aux")]
                row = dict(method=spec, K=getattr(trainer.learner, "K", k_eff), epochs=epochs, seed=seed,
                           train_limit=limit, steps=summary["steps"], test_acc=summary["test_acc"],
                           test_acc_per_epoch=history, seconds_per_iter=summary["seconds_per_iter"],
                           peak_activation_MiB=(summary["peak_mem_bytes"] or 0) / 2**20,
                           wall_s=time.perf_counter() - t0, resumed=resume, protocol="FM-R32",
                           recipe=BASE_RECIPE, overrides=list(extra), command=command, **({"aux_trajectory": aux} if aux else {}),
                           **{**env, "device": str(trainer.device)})
                append_rows(results, [row])
                claim.unlink(missing_ok=True)
                say(f"  test acc {row['test_acc']:.4f}  ({row['steps']} steps, {row['wall_s'] / 60:.1f} min)")
                out.append(row)
    return out


def run_workers(argv: Sequence[str], workers: int, threads: int | None = None, say=print) -> int:
    """Run ``manlearn bench accuracy <argv>`` in ``workers`` processes that share the results file.

    Each worker walks the same list of runs and claims a run before starting it (``_claim``), so every
    run is done once and the workers never wait on each other. Each gets ``threads`` intra-op threads
    (default: the CPU count divided among the workers): two torch processes with all threads each on
    a small machine oversubscribe it and run several times slower. Their output lines are prefixed
    with ``[w<i>]``. Returns the first non-zero exit status of a worker, else 0.

    Ctrl-C and SIGTERM reach this process only (the workers have their own sessions, so a terminal's
    Ctrl-C does not hit them twice): it passes the signal on once to each worker, which saves its run at
    the step in flight, and waits for them; the sweep goes on from those checkpoints when run again.
    A second signal is passed on too: the workers stop at once (their last checkpoints stay)."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs, pumps = [], []
    signals: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        signals.append(signum)
        if len(signals) == 1:
            say("stopping: each worker saves its run at the step in flight; the same command continues the "
                "sweep from there (a second Ctrl-C stops them at once)")
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for i in range(workers):
            if signals:
                break
            proc = subprocess.Popen([sys.executable, "-m", "manlearn", "bench", "accuracy", *argv], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)
            pump = threading.Thread(target=lambda p=proc, tag=f"[w{i}] ": [say(tag + line.rstrip("\n"))
                                                                              for line in p.stdout], daemon=True)
            pump.start()
            procs.append(proc)
            pumps.append(pump)
            time.sleep(0.5)  # let worker i claim its first run before worker i+1 looks
        codes = [proc.wait() for proc in procs]
    except BaseException:  # not a signal (those are passed on above): stop the workers, keep their checkpoints
        for proc in procs:
            proc.terminate()
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for pump in pumps:
        pump.join(timeout=5)
    if signals:
        from ..train.interrupt import EXIT_INTERRUPTED, EXIT_TERMINATED

        return EXIT_TERMINATED if signals[0] == signal.SIGTERM else EXIT_INTERRUPTED
    return next((c for c in codes if c), 0)
