"""`manlearn bench`: the parts run, their numbers mean what they say, the report is built from rows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from manlearn import LocalLearner
from manlearn.bench import parse_method, read_rows
from manlearn.bench.accuracy import run_accuracy
from manlearn.bench.common import run_key
from manlearn.bench.memory import counted
from manlearn.bench.report import write_report
from manlearn.bench.speed import breakdown_step, build, run_speed
from manlearn.cli import main
from manlearn.errors import ConfigError
from manlearn.train import load_checkpoint


def test_method_specs():
    assert parse_method("dgl+manpp") == {"method": "manpp", "base": "dgl"}
    assert parse_method("infopro") == {"method": "infopro"}
    assert parse_method("infopro+manpp+recompute")["ema_recompute"] is True
    assert parse_method("dgl:head=mlp-sr") == {"method": "dgl", "head": "mlp-sr"}
    assert parse_method("dgl+manpp:fidelity=authors") == {"method": "manpp", "base": "dgl", "fidelity": "authors"}
    assert parse_method("e2e+ckpt") == {"method": "e2e", "grad_checkpoint": "stage"}
    assert parse_method("infopro+manpp+recompute:stem_module=false,split=uniform") == {
        "method": "manpp", "base": "infopro", "ema_recompute": True, "stem_module": False, "split": "uniform"}
    assert parse_method("e2e:grad_checkpoint=unit,authors_init=true") == {
        "method": "e2e", "grad_checkpoint": "unit", "authors_init": True}
    for bad in ("dgl+foo", "nope", "e2e+man", "dgl+recompute", "dgl+manpp+x", "dgl:head", "dgl:=x"):
        with pytest.raises(ConfigError):
            parse_method(bad)


def test_spec_options_reach_the_run_config(tmp_path):
    from manlearn.bench.accuracy import fm_r32_config
    from manlearn.bench.common import spec_slug

    cfg = fm_r32_config("dgl+manpp:fidelity=authors", 16, 1, 0, tmp_path)
    assert (cfg.method, cfg.base, cfg.fidelity) == ("manpp", "dgl", "authors")
    cfg = fm_r32_config("dgl:head=mlp-sr", 16, 1, 0, tmp_path)
    assert (cfg.method, cfg.rule_options) == ("dgl", {"head": "mlp-sr"})
    assert spec_slug("dgl+manpp:fidelity=authors") == "dgl-manpp-fidelity-authors"
    with pytest.raises(ConfigError, match="no rule in use|unknown|not take|head"):
        LocalLearner("resnet20", K=4, **parse_method("greedy:head=mlp-sr"))


def test_counted_memory_static_parts_and_ordering():
    rows = {s: counted("resnet20", s, 4, 8) for s in ("e2e", "e2e+ckpt", "infopro+manpp")}
    for s, r in rows.items():
        assert r["activation_peak_MiB"] > 0
        parts = r["activation_peak_MiB"] + r["params_MiB"] + r["grads_MiB"] + r["optimizer_MiB"]
        assert r["total_counted_MiB"] == pytest.approx(parts)
    e2e = rows["e2e"]
    assert e2e["grads_MiB"] == pytest.approx(e2e["optimizer_MiB"])  # SGD momentum: one buffer per parameter
    assert rows["e2e+ckpt"]["activation_peak_MiB"] < e2e["activation_peak_MiB"]
    assert rows["infopro+manpp"]["activation_peak_MiB"] < e2e["activation_peak_MiB"]
    # MAN++'s frozen ema units are parameters without gradients.
    manpp = rows["infopro+manpp"]
    assert manpp["grads_MiB"] < manpp["params_MiB"]


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_breakdown_step_gives_the_gradients_of_train_step(amp):
    """Also under bf16 autocast: each part's forwards run under the learner's autocast, as in train_step
    (a part left in float32 would change the gradients far beyond this tolerance)."""
    a, opt_a = build("resnet20", "dgl+manpp", 4, "cpu", False, amp=amp)
    b, opt_b = build("resnet20", "dgl+manpp", 4, "cpu", False, amp=amp)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    a.train_step(x, y)
    parts = breakdown_step(b, opt_b, x, y)  # also steps opt_b: compare grads, which it leaves
    assert set(parts) == {"backbone", "aux_units", "aux_heads", "ema", "optimizer"}
    assert all(v >= 0 for v in parts.values()) and parts["aux_units"] > 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_flop_breakdown_counts_each_part():
    from manlearn.bench.speed import flop_breakdown

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    e2e = flop_breakdown(*build("resnet20", "e2e", 1, "cpu", False), x, y)
    man = flop_breakdown(*build("resnet20", "dgl+manpp", 4, "cpu", False), x, y)
    assert e2e["aux_units"] == e2e["aux_heads"] == 0 < e2e["backbone"]
    assert man["aux_units"] > 0 and man["aux_heads"] > 0 and man["ema"] == 0
    # the same backbone work (forward + input/weight gradients), apart from the input gradients at the block
    # boundaries (the memory split cuts early, where they are largest)
    assert abs(man["backbone"] - e2e["backbone"]) < 0.08 * e2e["backbone"]


def test_speed_rows_are_interleaved_medians_with_e2e_reference(tmp_path):
    out = tmp_path / "speed.jsonl"
    rows = run_speed("resnet20", ["greedy"], K=3, batch=2, iters=2, warmup=0, results=out, breakdown=False,
                     say=lambda *a, **k: None)
    assert [r["method"] for r in rows] == ["e2e", "greedy"]  # E2E is always measured alongside
    assert rows[0]["ratio_to_e2e"] == 1.0
    assert rows[1]["images_per_s"] == pytest.approx(2 / rows[1]["median_s_per_it"])
    assert read_rows(out) == json.loads(json.dumps(rows))


def test_speed_times_each_method_in_each_autocast_mode(tmp_path):
    rows = run_speed("resnet20", ["greedy"], K=3, batch=2, iters=1, warmup=0, results=tmp_path / "s.jsonl",
                     breakdown=False, amps=("off", "bf16"), say=lambda *a, **k: None)
    assert [(r["method"], r["amp"]) for r in rows] == [("e2e", "off"), ("greedy", "off"), ("e2e", "bf16"),
                                                       ("greedy", "bf16")]
    assert rows[0]["ratio_to_e2e"] == rows[2]["ratio_to_e2e"] == 1.0  # each mode against its own E2E


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (scripts/setup.sh installs it)")
def test_accuracy_run_appends_once_and_skips_done_runs(tmp_path):
    res = tmp_path / "acc.jsonl"
    extra = ["model=resnet20", "train_limit=128", "eval_limit=64", "eval_batch_size=64"]
    said: list[str] = []
    run_accuracy(["dgl"], [3], 1, [0], res, tmp_path / "runs", extra=extra, say=said.append)
    rows = read_rows(res)
    assert len(rows) == 1 and rows[0]["method"] == "dgl" and rows[0]["K"] == 3 and rows[0]["steps"] == 1
    assert 0.0 <= rows[0]["test_acc"] <= 1.0 and rows[0]["test_acc_per_epoch"] == [rows[0]["test_acc"]]
    assert rows[0]["torch"] == torch.__version__ and rows[0]["date"]
    run_accuracy(["dgl"], [3], 1, [0], res, tmp_path / "runs", extra=extra, say=said.append)
    assert len(read_rows(res)) == 1 and any(s.startswith("skip dgl") for s in said)


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (scripts/setup.sh installs it)")
def test_an_interrupted_sweep_run_resumes_from_its_checkpoint(tmp_path):
    """A run stopped part-way (its folder holds last.pt) is continued, not started over, and ends where an
    uninterrupted run ends; the row names the command and that it was resumed."""
    from manlearn.bench.accuracy import fm_r32_config
    from manlearn.train import Trainer

    extra = ["model=resnet20", "train_limit=384", "eval_limit=64", "eval_batch_size=64", "ckpt_every_steps=1"]
    whole = run_accuracy(["greedy"], [2], 1, [0], tmp_path / "a.jsonl", tmp_path / "a", extra=extra,
                         say=lambda *a: None)[0]
    name = next(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())  # the sweep's folder name
    cut = fm_r32_config("greedy", 2, 1, 0, tmp_path / "b" / name, [*extra, "max_steps=2"])
    Trainer.from_config(cut, overwrite=True).fit()  # the stopped run: 2 of 3 steps done, then lost
    said: list[str] = []
    row = run_accuracy(["greedy"], [2], 1, [0], tmp_path / "b.jsonl", tmp_path / "b", extra=extra,
                       say=said.append)[0]
    assert said[0].startswith("resume greedy") and row["resumed"] and not whole["resumed"]
    assert row["steps"] == whole["steps"] == 3 and row["test_acc"] == whole["test_acc"]
    assert row["command"].startswith("manlearn bench accuracy --methods greedy --K 2 --epochs 1 --seeds 0")


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (scripts/setup.sh installs it)")
def test_a_sweep_with_other_overrides_is_other_runs(tmp_path):
    """amp=bf16 (here lr=0.2, which is quicker to tell apart) is not the run already in the file: it runs,
    in its own folder, and both rows stay."""
    res, runs = tmp_path / "acc.jsonl", tmp_path / "runs"
    extra = ["model=resnet20", "train_limit=128", "eval_limit=64", "eval_batch_size=64"]
    run_accuracy(["greedy"], [2], 1, [0], res, runs, extra=extra, say=lambda *a: None)
    run_accuracy(["greedy"], [2], 1, [0], res, runs, extra=[*extra, "lr=0.2"], say=lambda *a: None)
    rows = read_rows(res)
    assert [r["overrides"][-1] for r in rows] == ["eval_batch_size=64", "lr=0.2"]
    assert run_key(rows[0]) != run_key(rows[1])
    folders = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert folders == ["greedy-K2-e1-s0-eval_batch_size-64-eval_limit-64-model-resnet20",
                       "greedy-K2-e1-s0-o10153bf0af"]  # a long set of overrides: a hash of them


def test_run_key_names_the_overrides_but_not_train_limit_twice():
    row = dict(method="dgl", K=16, epochs=1, seed=0, train_limit=None, overrides=["amp=bf16", "lr=0.05"])
    assert run_key(row) == ("dgl", 16, 1, 0, None, ("amp=bf16", "lr=0.05"))
    assert run_key({**row, "overrides": ["lr=0.05", "amp=bf16"]}) == run_key(row)  # order does not matter
    assert run_key({**row, "train_limit": 128, "overrides": ["train_limit=128"]})[4:] == (128, ())
    assert run_key({k: v for k, v in row.items() if k != "overrides"})[5] == ()  # rows of older versions


def test_accuracy_rerun_redoes_old_rows_once(tmp_path):
    res = tmp_path / "acc.jsonl"
    extra = ["model=resnet20", "train_limit=128", "eval_limit=64", "eval_batch_size=64"]
    run_accuracy(["greedy"], [2], 1, [0], res, tmp_path / "runs", extra=extra, say=lambda *a: None)
    # the second "greedy" stands for a worker beside this one reaching the same run later
    run_accuracy(["greedy", "greedy"], [2], 1, [0], res, tmp_path / "runs", extra=extra, rerun=True,
                 say=lambda *a: None)
    assert [r["method"] for r in read_rows(res)] == ["greedy", "greedy"]


def test_accuracy_workers_share_one_sweep(tmp_path, capsys):
    res = tmp_path / "acc.jsonl"
    args = ["bench", "accuracy", "--methods", "greedy", "dgl", "--K", "2", "--seeds", "0", "--workers", "2",
            "--threads", "1", "--results", str(res), "--runs-dir", str(tmp_path / "runs"),
            "model=resnet20", "train_limit=128", "eval_limit=64", "eval_batch_size=64"]
    assert main(args) == 0
    rows = read_rows(res)
    assert sorted(r["method"] for r in rows) == ["dgl", "greedy"]  # each run once, by one of the workers
    assert all(r["threads"] == 1 for r in rows)  # --threads reaches every worker
    out = capsys.readouterr().out
    assert "[w0] " in out and "[w1] " in out and out.count(" run ") == 2
    assert main([*args[:-4], "--workers", "2", "--methods", "dgl+nope"]) == 2  # checked before spawning


def test_report_tables_and_plots(tmp_path):
    env = {"date": "2026-11-21", "torch": "x", "device": "cpu"}
    runs = [(2, 0, "e2e", 0.9), (2, 0, "dgl", 0.8), (2, 0, "dgl+manpp", 0.84),
            (1, 0, "e2e", 0.88), (1, 0, "dgl", 0.80), (1, 1, "dgl", 0.82), (1, 0, "dgl+manpp", 0.83),
            (1, 1, "dgl+manpp", 0.81)]
    acc = [dict(method=m, K=16 if m != "e2e" else 1, epochs=e, seed=s, test_acc=a, test_acc_per_epoch=[a] * e,
                seconds_per_iter=1.0, **env) for e, s, m, a in runs]
    mem = [dict(model="resnet32", method=m, K=16 if m != "e2e" else 1, batch=128, activation_peak_MiB=v,
                total_counted_MiB=v + 10, **env) for m, v in (("e2e", 300.0), ("dgl", 66.0), ("dgl+manpp", 138.0))]
    for name, rows in (("accuracy", acc), ("memory", mem)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    text = write_report(tmp_path, tmp_path / "plots", say=lambda *a: None)
    assert "| 2 | dgl+manpp | 16 | 0 | 0.8400 | +4.00 pt | 1/1 | -6.00 pt |" in text
    # seed 0 beats its base, seed 1 does not: the paired count says so while the means say +1 point
    assert "| 1 | dgl+manpp | 16 | 0,1 | 0.8200 ± 0.0141 | +1.00 pt | 1/2 | -6.00 pt |" in text
    assert "| resnet32 | dgl | 16 | 128 | 66.0 | 22% |" in text
    assert (tmp_path / "plots" / "accuracy_vs_memory.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "accuracy_vs_epochs.png").stat().st_size > 1000
    assert not (tmp_path / "plots" / "learning_curves.png").exists()  # no run of 5 epochs or more yet
    # one budget only: no curve to draw, and no stale plot is claimed
    (tmp_path / "accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in acc if r["epochs"] == 1))
    said: list[str] = []
    write_report(tmp_path, tmp_path / "plots2", say=said.append)
    assert (tmp_path / "plots2" / "accuracy_vs_memory.png").exists()
    assert not (tmp_path / "plots2" / "accuracy_vs_epochs.png").exists() and "accuracy_vs_epochs" not in said[-1]
    # runs of 10 epochs: their per-epoch records become learning curves
    long = [dict(r, epochs=10, test_acc_per_epoch=[r["test_acc"] - 0.01 * (10 - i) for i in range(1, 11)])
            for r in acc if r["epochs"] == 2]
    (tmp_path / "accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in acc + long))
    write_report(tmp_path, tmp_path / "plots3", say=said.append)
    assert (tmp_path / "plots3" / "learning_curves.png").stat().st_size > 1000 and "learning_curves" in said[-1]


def test_report_keeps_runs_of_other_overrides_and_precisions_apart(tmp_path):
    env = {"date": "2026-12-06", "torch": "x", "device": "cpu"}
    acc = [dict(method=m, K=16 if m != "e2e" else 1, epochs=1, seed=0, test_acc=a, test_acc_per_epoch=[a],
                seconds_per_iter=1.0, overrides=o, **env)
           for m, a, o in (("dgl", 0.80, []), ("dgl+manpp", 0.83, []), ("dgl+manpp", 0.79, ["amp=bf16"]))]
    spd = [dict(model="resnet32", method=m, K=16, batch=128, channels_last=True, compile=False, amp=amp,
                median_s_per_it=t, images_per_s=128 / t, ratio_to_e2e=1.0, **env)
           for m, amp, t in (("dgl+manpp", "off", 1.0), ("dgl+manpp", "bf16", 0.6))]
    for name, rows in (("accuracy", acc), ("speed", spd)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path, tmp_path / "plots", say=lambda *a: None)
    assert "| 1 | dgl+manpp | 16 | 0 | 0.8300 | +3.00 pt | 1/1 |" in text  # float32 against its float32 base
    assert "| 1 | dgl+manpp [amp=bf16] | 16 | 0 | 0.7900 |  |  |" in text  # no bf16 base to compare with
    assert "| resnet32 | dgl+manpp | 16 | 128 | 1.000 |" in text
    assert "| resnet32 | dgl+manpp (bf16) | 16 | 128 | 0.600 |" in text


def test_bench_cli_refuses_bad_input(capsys, tmp_path):
    assert main(["bench", "memory", "--methods", "dgl+nope"]) == 2
    assert "bad method spec" in capsys.readouterr().err
    assert main(["bench", "speed", "--K", "0"]) == 2
    assert "--K must be >= 1" in capsys.readouterr().err
    assert main(["bench", "speed", "--amp", "bf16", "bf16"]) == 2
    assert "--amp lists a mode twice" in capsys.readouterr().err
    assert main(["bench", "speed", "--methods", "greedy", "--amp", "fp16", "--iters", "1", "--warmup", "0",
                 "--model", "resnet20", "--K", "2", "--batch", "2", "--no-breakdown",
                 "--results", str(tmp_path / "s.jsonl")]) == 2
    assert "amp=fp16 needs a CUDA device" in capsys.readouterr().err
    # --device was never checked: torch's AssertionError / RuntimeError tracebacks
    for part in ("speed", "memory"):
        assert main(["bench", part, "--device", "foo", "--results", str(tmp_path / "d.jsonl")]) == 2
        assert "device='foo' is not a device" in capsys.readouterr().err
        if not torch.cuda.is_available():
            assert main(["bench", part, "--device", "cuda", "--results", str(tmp_path / "d.jsonl")]) == 2
            assert "CUDA is not available here" in capsys.readouterr().err


def test_accuracy_refuses_overrides_of_its_own_keys_and_leaves_no_claim(tmp_path):
    """seed=3 ran every --seeds run at seed 3 while the rows said 0 and 1; a bad override left a stale claim."""
    runs = tmp_path / "runs"
    for key, flag in (("seed=3", "--seeds"), ("K=4", "--K"), ("epochs=2", "--epochs"), ("method=dgl", "--methods"),
                      ("out_dir=x", "--runs-dir")):
        with pytest.raises(ConfigError, match=f"^the override {key.split('=')[0]}=... would replace the sweep's own "
                                              f"setting .*: give it with {flag}"):
            run_accuracy(["dgl"], [3], 1, [0, 1], tmp_path / "a.jsonl", runs, extra=[key], say=lambda *a: None)
    for bad in (["foo=1"], ["lr=abc"]):
        with pytest.raises(ConfigError):
            run_accuracy(["dgl"], [3], 1, [0], tmp_path / "a.jsonl", runs, extra=bad, say=lambda *a: None)
    assert not runs.exists() or not list(runs.glob("*.claim"))
    assert not (tmp_path / "a.jsonl").exists()


def test_report_refuses_a_folder_without_results(capsys, tmp_path):
    """A mistyped --results-dir was made into a new folder holding an empty tables.md, with rc 0."""
    (tmp_path / "file.jsonl").write_text("{}\n")
    (tmp_path / "empty").mkdir()
    for where, why in (("missing", "does not exist"), ("file.jsonl", "is a file, not a folder"),
                       ("empty", "holds none of accuracy.jsonl, memory.jsonl, speed.jsonl")):
        plots = tmp_path / f"plots-{where}"
        assert main(["bench", "report", "--results-dir", str(tmp_path / where), "--plots-dir", str(plots)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and "no benchmark results to report" in err, err
        assert not plots.exists() and not (tmp_path / where / "tables.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.jsonl"]


def test_fresh_process_rss_measures_the_steps():
    from manlearn.bench.memory import measured_rss

    small = measured_rss("resnet20", "dgl", 3, 2)
    big = measured_rss("resnet20", "dgl", 3, 64)
    assert small["rss_malloc"].startswith("MALLOC_MMAP_THRESHOLD_") and small["rss_steps"] == 2
    assert small["peak_rss_MiB"] >= small["rss_before_steps_MiB"] > 50  # torch alone is ~100 MiB
    # 32x the batch: resnet20's first stage alone keeps ~2 MiB per image alive in a dgl block
    assert big["rss_step_increase_MiB"] > small["rss_step_increase_MiB"] + 20


def test_accuracy_workers_claim_runs(tmp_path):
    from manlearn.bench.accuracy import _claim

    p = tmp_path / "run.claim"
    p.write_text("1")  # a live process (init) holds it
    assert _claim(p) is None
    p.write_text("999999999")  # a dead one: taken over
    assert _claim(p) == p and p.read_text() == str(__import__("os").getpid())


def test_checkpointed_e2e_is_drawn_at_e2e_accuracy():
    """E2E with checkpointing has E2E's gradients: the plot puts it at E2E's accuracy of every budget and at
    its own memory, one point per granularity measured."""
    from manlearn.bench.report import _checkpoint_granularity, _checkpointed_points, base_of

    assert [_checkpoint_granularity(m) for m in ("e2e+ckpt", "e2e:grad_checkpoint=unit", "e2e", "dgl", "nope")] == [
        "stage", "unit", None, None, None]
    assert (base_of("dgl+manpp:fidelity=authors"), base_of("infopro+hpff"), base_of("predsim")) == ("dgl", "infopro", None)
    calls = []

    class Ax:
        def errorbar(self, xs, ys, yerr, **kw):
            calls.append((xs[0], ys[0], yerr[0]))

        def annotate(self, *a, **kw):
            pass

    mem = {("e2e", 1): {"activation_peak_MiB": 300.0}, ("e2e+ckpt", 1): {"activation_peak_MiB": 180.0},
           ("e2e:grad_checkpoint=unit", 1): {"activation_peak_MiB": 75.0}, ("dgl", 16): {"activation_peak_MiB": 66.0}}
    final = {(1, "e2e", 1): [0.87, 0.89], (2, "e2e", 1): [0.9], (1, "dgl", 16): [0.8]}
    _checkpointed_points(Ax(), mem, mem[("e2e", 1)], final)
    assert sorted(calls) == sorted([(25.0, 88.0, pytest.approx(1.4142, abs=1e-3)), (60.0, 88.0, pytest.approx(1.4142, abs=1e-3)),
                                    (25.0, 90.0, 0.0), (60.0, 90.0, 0.0)])


def test_bench_memory_takes_any_size_and_user_models_through_import(tmp_path, capsys):
    """--image-size and a model from --import reach the counted step and the fresh RSS process; each row
    records its size, split and the plan's figures."""
    net = tmp_path / "my_net.py"
    net.write_text(
        "from torch import nn\nimport manlearn\nfrom manlearn.models import Backbone\n\n"
        "@manlearn.register_model\n"
        "def bench_tiny_net(num_classes=10, in_channels=3, **kw):\n"
        "    units = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(4)]\n"
        "    return Backbone(nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU()), units,\n"
        "                    nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)))\n")
    res = tmp_path / "mem.jsonl"
    assert main(["--import", str(net), "bench", "memory", "--model", "bench_tiny_net", "--methods", "dgl",
                 "--K", "3", "--batch", "4", "--image-size", "20", "--plan", "--results", str(res)]) == 0
    rows = read_rows(res)
    assert [r["method"] for r in rows] == ["dgl", "e2e+ckpt"]
    assert all(r["image_size"] == 20 and r["peak_rss_MiB"] > 0 for r in rows)
    assert rows[0]["split"] and rows[0]["split_ends"][-1] == 4
    assert rows[0]["plan_activation_MiB"] == pytest.approx(rows[0]["activation_peak_MiB"], rel=0.05)


def test_interleaved_timing_calls_every_step_once_per_round_in_order():
    """The one timing helper of every benchmark: rounds interleave the steps, warm-up rounds are not
    recorded, and the sync runs before and after each timed call."""
    from manlearn.bench.common import interleaved

    calls: list[str] = []
    steps = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = interleaved(steps, rounds=3, warmup=2, sync=lambda: calls.append("|"))
    assert calls == ["|", "a", "|", "|", "b", "|", "|", "c", "|"] * 5
    assert list(times) == ["a", "b", "c"] and all(len(t) == 3 and min(t) >= 0 for t in times.values())


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (scripts/setup.sh installs it)")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_a_sweep_with_workers_saves_every_run_and_the_sweep_goes_on(tmp_path, sig, code):
    """Ctrl-C (or SIGTERM) to the sweep's process: each worker saves its run at the step in flight (it must
    not get a second signal, which stops at once), the sweep exits with the signal's status, and the same
    command continues both runs from their checkpoints."""
    res, runs = tmp_path / "acc.jsonl", tmp_path / "runs"
    cmd = [sys.executable, "-m", "manlearn", "bench", "accuracy", "--methods", "greedy", "dgl", "--K", "2",
           "--epochs", "3", "--seeds", "0", "--workers", "2", "--threads", "1", "--results", str(res),
           "--runs-dir", str(runs), "model=resnet20", "train_limit=1280", "eval_limit=64", "eval_batch_size=64",
           "log_every=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and proc.poll() is None:
            logs = list(runs.glob("*/metrics.jsonl")) if runs.is_dir() else []
            if len(logs) == 2 and all('"train"' in p.read_text() for p in logs):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the sweep's process group
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, out[-3000:]
    assert "stopping: each worker saves its run" in out and "Traceback" not in out, out
    assert "stopped at once" not in out and "--resume" not in out, out  # one signal each; a sweep resumes itself
    steps = [load_checkpoint(p / "last.pt")["step"] for p in sorted(runs.iterdir()) if p.is_dir()]
    assert len(steps) == 2 and all(0 < s < 30 for s in steps), (steps, out[-3000:])
    assert out.count("the same command continues the sweep from there") == 3, out  # the sweep's line, each worker's
    assert not read_rows(res) and not list(runs.glob("*.claim"))
    if sig == signal.SIGINT:
        done = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = read_rows(res)
        assert sorted(r["method"] for r in rows) == ["dgl", "greedy"] and all(r["resumed"] for r in rows)
        assert all(r["steps"] == 30 for r in rows)
