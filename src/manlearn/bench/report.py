"""Tables (markdown) and plots (PNG) from the benchmark results files.

Reads ``accuracy.jsonl``, ``memory.jsonl`` and ``speed.jsonl`` from the results folder; the latest
row wins when a measurement was repeated. Writes ``tables.md`` beside them and the plots
``accuracy_vs_memory.png``, ``accuracy_vs_epochs.png`` and ``learning_curves.png`` (per-epoch test
accuracy of runs of 5 epochs or more) into the plots folder.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError, optional_import
from ..files import save_figure, write_text_atomic
from ..recompute import checkpoint_granularity
from .common import ALL_METHODS, parse_method, read_rows, run_key, sweep_overrides

def base_of(spec: str) -> str | None:
    """The base rule a modifier row is compared with: ``dgl+manpp`` and ``dgl+manpp:fidelity=authors``
    -> ``dgl``, ``infopro+hpff`` -> ``infopro``; None for a rule without a base."""
    try:
        return parse_method(spec).get("base")
    except Exception:  # a spec of a rule this installation does not have
        return None


def _order(method: str) -> tuple:
    return (ALL_METHODS.index(method) if method in ALL_METHODS else len(ALL_METHODS), method)


def _latest(rows: list[dict[str, Any]], key) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        out[key(r)] = r
    return out


def memory_table(rows: list[dict[str, Any]]) -> str:
    rows = list(_latest(rows, lambda r: (r["model"], r["method"], r["K"], r["batch"], r.get("device"),
                                         r.get("split"))).values())
    lines = ["| model | method | K | batch | activations (MiB) | vs E2E | total counted (MiB) | vs E2E | "
             "RSS growth during steps (MiB) | vs E2E | CUDA peak (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    e2e = {(r["model"], r["batch"], r.get("device")): r for r in rows if r["method"] == "e2e"}
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], r["K"] if r["method"] != "e2e" else 0,
                                         _order(r["method"].replace("+ckpt", "")), r["method"])):
        ref = e2e.get((r["model"], r["batch"], r.get("device")))
        act_ratio = f"{100 * r['activation_peak_MiB'] / ref['activation_peak_MiB']:.0f}%" if ref else ""
        tot_ratio = f"{100 * r['total_counted_MiB'] / ref['total_counted_MiB']:.0f}%" if ref else ""
        rss = f"{r['rss_step_increase_MiB']:.0f}" if r.get("rss_step_increase_MiB") is not None else ""
        rss_ratio = (f"{100 * r['rss_step_increase_MiB'] / ref['rss_step_increase_MiB']:.0f}%"
                     if rss and ref and ref.get("rss_step_increase_MiB") else "")
        cuda = f"{r['cuda_peak_MiB']:.0f}" if r.get("cuda_peak_MiB") else ""
        split = f" ({r['split']})" if r.get("split") not in (None, "single", "paper table", "uniform") else ""
        lines.append(f"| {r['model']} | {r['method']}{split} | {r['K']} | {r['batch']} | {r['activation_peak_MiB']:.1f} | "
                     f"{act_ratio} | {r['total_counted_MiB']:.1f} | {tot_ratio} | {rss} | {rss_ratio} | {cuda} |")
    return "\n".join(lines)


def speed_table(rows: list[dict[str, Any]]) -> str:
    """The latest row of each (method, layout, precision, ...): rows may come from different runs and
    machines, so each says which; its ratio to E2E is from its own run."""
    rows = list(_latest(rows, lambda r: (r["model"], r["method"], r["K"], r["batch"], r.get("device"),
                                         r.get("channels_last"), r.get("compile", False),
                                         r.get("amp", "off"))).values())
    lines = ["| model | method | K | batch | s/it (median) | images/s | vs E2E | GFLOP/step | vs E2E | backbone | "
             "aux ema/lb units | aux heads | EMA | optimiser | run (compare within one) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    e2e_flops = {(r["model"], r["batch"]): sum(r["gflops"].values()) for r in rows
                 if r["method"] == "e2e" and r.get("gflops")}
    for r in sorted(rows, key=lambda r: (r["model"], r.get("device", ""), bool(r.get("compile")),
                                         r.get("amp", "off") != "off", not r.get("channels_last", True),
                                         r["batch"], _order(r["method"]))):
        b = r.get("breakdown_s") or {}
        parts = " | ".join(f"{b[k]:.3f}" if k in b else "" for k in
                           ("backbone", "aux_units", "aux_heads", "ema", "optimizer"))
        tags = [t for t, on in (("NCHW", r.get("channels_last") is False), ("compiled", r.get("compile")),
                                (r.get("amp", "off"), r.get("amp", "off") != "off"),
                                (r.get("device", "cpu"), r.get("device", "cpu") != "cpu")) if on]
        name = r["method"] + (f" ({', '.join(tags)})" if tags else "")
        gf = sum(r["gflops"].values()) if r.get("gflops") else None
        ref = e2e_flops.get((r["model"], r["batch"]))
        flops = f"{gf:.1f} | {gf / ref:.2f}x" if gf and ref else " | "
        lines.append(f"| {r['model']} | {name} | {r['K']} | {r['batch']} | {r['median_s_per_it']:.3f} | "
                     f"{r['images_per_s']:.0f} | {r['ratio_to_e2e']:.2f}x | {flops} | {parts} | "
                     f"{r.get('date', '')} {r.get('cpu', '')} {r.get('commit', '')} |")
    return "\n".join(lines)


def _by_seed(rs: list[dict[str, Any]]) -> dict[int, float]:
    return {int(x["seed"]): x["test_acc"] for x in rs}


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """One line per (budget, K, method): mean ± std over seeds, the difference of the means to the base
    rule and to E2E, and in how many of the seeds both ran the rule beat its base *on the same seed*
    (a paired count: the seed fixes the initialisation and the data order)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in _latest(rows, run_key).values():
        groups[(r["epochs"], r.get("train_limit"), r["K"] if r["method"] != "e2e" else 0, r["method"],
                sweep_overrides(r.get("overrides", ())))].append(r)
    lines = ["| epochs | method | K | seeds | test accuracy | vs base rule | above base (paired seeds) | vs E2E | "
             "s/it (during the run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    mean = {key: statistics.mean(x["test_acc"] for x in rs) for key, rs in groups.items()}
    for key in sorted(groups, key=lambda k: (k[0], k[1] or 0, k[4], k[2], _order(k[3]))):
        epochs, limit, K, method, others = key
        rs = sorted(groups[key], key=lambda x: int(x["seed"]))
        accs = [x["test_acc"] for x in rs]
        acc = f"{statistics.mean(accs):.4f}" + (f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else "")
        base = base_of(method)
        base_key = (epochs, limit, K, base, others)
        vs_base = paired = ""
        if base and base_key in mean:
            vs_base = f"{100 * (mean[key] - mean[base_key]):+.2f} pt"
            mine, theirs = _by_seed(rs), _by_seed(groups[base_key])
            both = sorted(set(mine) & set(theirs))
            if both:
                paired = f"{sum(mine[s] > theirs[s] for s in both)}/{len(both)}"
        e2e_key = (epochs, limit, 0, "e2e", others)
        vs_e2e = f"{100 * (mean[key] - mean[e2e_key]):+.2f} pt" if e2e_key in mean and method != "e2e" else ""
        spi = statistics.mean(x["seconds_per_iter"] for x in rs)
        label = method + (f" [{' '.join(others)}]" if others else "")
        lines.append(f"| {epochs}{' (' + str(limit) + ' imgs)' if limit else ''} | {label} | {rs[0]['K']} | "
                     f"{','.join(str(x['seed']) for x in rs)} | {acc} | {vs_base} | {paired} | {vs_e2e} | {spi:.3f} |")
    return "\n".join(lines)


def _pyplot():
    matplotlib = optional_import("matplotlib", "plots", "the report's plots")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, title: str, path: Path) -> bool:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    _pyplot().close(fig)
    return True


def _mean_std_pct(accs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one run) of accuracies, in percent."""
    return 100 * statistics.mean(accs), 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0


def _final_accuracy(acc_rows) -> dict[tuple, list[float]]:
    """Final test accuracies of the full-data runs without other overrides, keyed by (epochs, method, K); the
    latest row wins."""
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in _latest(acc_rows, run_key).values():
        if not r.get("train_limit") and not sweep_overrides(r.get("overrides", ())):  # the protocol's runs only
            out[(r["epochs"], r["method"], r["K"])].append(r["test_acc"])
    return out


def plot_accuracy_vs_memory(acc_rows, mem_rows, path: Path, batch: int = 128) -> bool:
    """One marker per training budget (epochs), one colour per K: accuracy (mean over seeds, bar = std)
    against the counted activation peak as a share of E2E's."""
    plt = _pyplot()
    mem = _latest([r for r in mem_rows if r["batch"] == batch and r["model"] == "resnet32"],
                  lambda r: (r["method"], r["K"]))
    e2e = next((r for (m, _), r in mem.items() if m == "e2e"), None)
    final = _final_accuracy(acc_rows)
    if e2e is None or not final:
        return False
    # one series per (budget, K); E2E joins the series of the largest K, so it is drawn once per budget
    top_K = max((K for _, _, K in final if K > 1), default=1)
    series: dict[tuple, list[tuple[float, float, float, str]]] = defaultdict(list)
    for (epochs, method, K), accs in sorted(final.items(), key=lambda kv: _order(kv[0][1])):
        m = mem.get((method, K))
        if m is not None:
            x = 100 * m["activation_peak_MiB"] / e2e["activation_peak_MiB"]
            name = f"{method} K={K}" if method != "e2e" else "e2e"
            series[(epochs, top_K if method == "e2e" else K)].append((x, *_mean_std_pct(accs), name))
    budgets = sorted({e for e, _ in series})
    colours = {K: f"C{i}" for i, K in enumerate(sorted({K for _, K in series}, reverse=True))}
    fig, ax = plt.subplots(figsize=(7, 5))
    for (epochs, K), pts in sorted(series.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        xs, ys, errs, names = zip(*pts)
        ax.errorbar(xs, ys, yerr=errs, fmt="os^Dv"[budgets.index(epochs) % 5], color=colours[K], ms=5, capsize=2,
                    linestyle="none", label=f"K={K}, {epochs} epoch{'s' if epochs > 1 else ''}")
        for x, y, name in zip(xs, ys, names):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    _checkpointed_points(ax, mem, e2e, final)
    ax.set_xlabel(f"peak activation memory, % of E2E (ResNet-32, batch {batch})")
    ax.set_ylabel("FM-R32 test accuracy, % (mean over seeds, bar = std)")
    ax.legend(fontsize=8)
    return _save(fig, ax, "Accuracy vs training memory", path)


def _checkpoint_granularity(method: str) -> str | None:
    """The granularity of an E2E-with-checkpointing spec (``e2e+ckpt``, ``e2e:grad_checkpoint=unit``), else None."""
    try:
        m = parse_method(method)
        return checkpoint_granularity(m.get("grad_checkpoint")) if m["method"] == "e2e" else None
    except ConfigError:  # a spec of a rule this installation does not have, or a bad granularity
        return None


def _checkpointed_points(ax, mem: dict[tuple, dict[str, Any]], e2e: dict[str, Any], final) -> None:
    """E2E with gradient checkpointing: the same gradients as E2E, so it sits at E2E's accuracy (of every
    budget measured) and at its own activation memory: what a user would pick instead of local learning."""
    accs = {epochs: accs for (epochs, method, _), accs in final.items() if method == "e2e"}
    pts = sorted((100 * r["activation_peak_MiB"] / e2e["activation_peak_MiB"], g)
                 for (method, _), r in mem.items() if (g := _checkpoint_granularity(method)))
    for i, (epochs, a) in enumerate(sorted(accs.items())):
        y, err = _mean_std_pct(a)
        for j, (x, g) in enumerate(pts):
            ax.errorbar([x], [y], yerr=[err], fmt="x", color="0.35", ms=6, capsize=2,
                        label="e2e + checkpointing (same accuracy as e2e)" if i == j == 0 else None)
            ax.annotate(f"e2e+ckpt/{g}", (x, y), textcoords="offset points", xytext=(4, -9), fontsize=7, color="0.35")


def plot_accuracy_vs_epochs(acc_rows, path: Path) -> bool:
    """Final test accuracy against the training budget, one line per rule and K. Each point is its own
    run (the cosine schedule spans that run), mean over seeds with the std as a bar; drawn once the
    results hold at least two budgets."""
    plt = _pyplot()
    final = _final_accuracy(acc_rows)
    if len({e for e, _, _ in final}) < 2:
        return False
    lines: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    for (epochs, method, K), accs in final.items():
        lines[(method, K)].append((epochs, *_mean_std_pct(accs)))
    fig, ax = plt.subplots(figsize=(7, 5))
    for (method, K), pts in sorted(lines.items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
        if len(pts) < 2 and method != "e2e":
            continue  # a rule measured at one budget has no curve
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                    capsize=2, label=f"{method} K={K}" if method != "e2e" else "e2e")
    ax.set_xlabel("training budget, epochs (each point a separate run with its own cosine schedule)")
    ax.set_ylabel("FM-R32 final test accuracy, % (mean over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return _save(fig, ax, "Accuracy vs training budget", path)


def plot_learning_curves(acc_rows, path: Path, min_epochs: int = 5) -> bool:
    """Test accuracy after every epoch of the runs of at least ``min_epochs`` epochs (their records'
    ``test_acc_per_epoch``), one line per rule, budget, K and overrides, mean over the seeds; drawn once such
    runs exist."""
    curves: dict[tuple, list[list[float]]] = defaultdict(list)
    for r in _latest(acc_rows, run_key).values():
        per_epoch = r.get("test_acc_per_epoch") or []
        if r["epochs"] >= min_epochs and len(per_epoch) == r["epochs"] and not r.get("train_limit"):
            extra = " ".join(sweep_overrides(r.get("overrides", ())))
            curves[(r["epochs"], r["method"], r["K"], extra)].append(per_epoch)
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for (epochs, method, K, extra), runs in sorted(curves.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        mean = [100 * statistics.mean(v) for v in zip(*runs)]
        label = (method if method == "e2e" else f"{method} K={K}") + f", {epochs} ep" + (f" [{extra}]" if extra else "")
        ax.plot(range(1, epochs + 1), mean, marker="o", ms=3, label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.set_xlabel("epoch (one run; its cosine schedule spans all its epochs)")
    ax.set_ylabel("FM-R32 test accuracy after the epoch, % (mean over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return _save(fig, ax, "Learning curves", path)


RESULT_FILES = ("accuracy.jsonl", "memory.jsonl", "speed.jsonl")


def check_results_dir(results_dir: str | Path) -> Path:
    """``results_dir`` as a Path; ConfigError when it holds no results file (a typo would get an empty report)."""
    results_dir = Path(results_dir)
    if not any((results_dir / n).is_file() for n in RESULT_FILES):
        where = "is a file, not a folder" if results_dir.is_file() else (
            "holds none of " + ", ".join(RESULT_FILES) if results_dir.is_dir() else "does not exist")
        raise ConfigError(f"no benchmark results to report: {results_dir} {where} (--results-dir names the folder "
                          "that `manlearn bench accuracy | memory | speed` write their rows to)")
    return results_dir


def write_report(results_dir: str | Path = "benchmarks/results", plots_dir: str | Path = "benchmarks/plots",
                 say=print) -> str:
    results_dir, plots_dir = check_results_dir(results_dir), Path(plots_dir)
    acc = read_rows(results_dir / "accuracy.jsonl")
    mem = read_rows(results_dir / "memory.jsonl")
    spd = read_rows(results_dir / "speed.jsonl")
    parts = []
    if acc:
        parts += ["## Accuracy (FM-R32)", "", accuracy_table(acc), ""]
    if mem:
        parts += ["## Memory", "", memory_table(mem), ""]
    if spd:
        parts += ["## Speed", "", speed_table(spd), ""]
    text = "\n".join(parts)
    write_text_atomic(results_dir / "tables.md", text)
    made = []
    if plot_accuracy_vs_memory(acc, mem, plots_dir / "accuracy_vs_memory.png"):
        made.append(plots_dir / "accuracy_vs_memory.png")
    if plot_accuracy_vs_epochs(acc, plots_dir / "accuracy_vs_epochs.png"):
        made.append(plots_dir / "accuracy_vs_epochs.png")
    if plot_learning_curves(acc, plots_dir / "learning_curves.png"):
        made.append(plots_dir / "learning_curves.png")
    say(text)
    say(f"wrote {results_dir / 'tables.md'}" + "".join(f", {p}" for p in made))
    return text
