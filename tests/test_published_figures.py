"""The 10-epoch figures the README and BENCHMARKS show are the results file's (#25: "its numbers are the
table's"): a row added to benchmarks/results/accuracy.jsonl without the documents following fails here."""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pytest

from manlearn.bench.common import read_rows, run_key, sweep_overrides
from manlearn.bench.report import accuracy_table

ROOT = Path(__file__).resolve().parents[1]
RULES = {"E2E": "e2e", "DGL": "dgl", "DGL+MAN++": "dgl+manpp", "InfoPro": "infopro",
         "InfoPro+MAN++": "infopro+manpp", "AugLocal (d=2)": "auglocal"}
BUDGET = (10, ("amp=bf16",))  # the sweep of #25: 10 epochs, bf16 autocast


def _runs() -> dict[str, list[dict]]:
    latest = {run_key(r): r for r in read_rows(ROOT / "benchmarks/results/accuracy.jsonl")}
    out: dict[str, list[dict]] = {}
    for r in latest.values():
        if (r["epochs"], sweep_overrides(r.get("overrides", ()))) == BUDGET and not r.get("train_limit"):
            out.setdefault(r["method"], []).append(r)
    return out


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{2,3} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def _pct(accs: list[float]) -> str:
    mean = f"{100 * statistics.mean(accs):.2f}"
    return f"{mean} ± {100 * statistics.stdev(accs):.2f} %" if len(accs) > 1 else f"{mean} %"


def test_the_readme_what_to_expect_table_is_the_results_file():
    runs = _runs()
    assert set(runs) == set(RULES.values()), "a rule of the 10-epoch sweep has no row in the results file"
    section = _section((ROOT / "README.md").read_text(), "## What to expect")
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| rule"))}
    assert set(rows) == set(RULES), rows
    mean = {m: statistics.mean(r["test_acc"] for r in rs) for m, rs in runs.items()}
    for name, method in RULES.items():
        acc, vs_base, vs_e2e, act = rows[name]
        rs = sorted(runs[method], key=lambda r: r["seed"])
        assert acc == _pct([r["test_acc"] for r in rs]), name
        assert act == f"{statistics.mean(r['peak_activation_MiB'] for r in rs):.1f} MiB", name
        if method == "e2e":
            assert vs_e2e == vs_base == "", name
            continue
        assert vs_e2e.replace("−", "-") == f"{100 * (mean[method] - mean['e2e']):+.2f} pt", name
        base = method.split("+")[0] if "+" in method else None
        if base:
            assert vs_base.replace("−", "-").startswith(f"{100 * (mean[method] - mean[base]):+.2f} pt"), name
        else:
            assert vs_base == "", name
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    counts = {m: len(rs) for m, rs in runs.items()}
    if len(set(counts.values())) == 1:  # every rule has every seed: no "coming in" left in the heading
        assert "coming in" not in section.splitlines()[0] and f"{len(seeds)} seeds" in section, section[:400]


def test_the_benchmarks_ten_epoch_table_is_the_reports():
    table = [line for line in accuracy_table(read_rows(ROOT / "benchmarks/results/accuracy.jsonl")).splitlines()
             if line.startswith("| 10 | ") and "[amp=bf16]" in line]
    assert table, "no 10-epoch bf16 rows in the results file"
    section = _section((ROOT / "BENCHMARKS.md").read_text(), "### 10 epochs")
    shown = [line for line in section.splitlines() if line.startswith("| 10 | ")]
    assert shown == table, "BENCHMARKS.md '### 10 epochs' is not `manlearn bench report`'s table: paste it again"


@pytest.mark.parametrize("method", sorted(RULES.values()))
def test_each_ten_epoch_row_records_its_curve_commit_and_command(method):
    for r in _runs()[method]:
        assert len(r["test_acc_per_epoch"]) == 10 and r["test_acc_per_epoch"][-1] == pytest.approx(r["test_acc"])
        assert re.fullmatch(r"[0-9a-f]{7,40}", r["commit"]) and r["command"].startswith("manlearn bench accuracy")
