"""Trainer(learner, train_data, eval_data, ...): your own objects train, checkpoint and resume exactly."""
from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import manlearn
from manlearn.errors import CheckpointError, ConfigError
from manlearn.train import Callback, Trainer, evaluate_checkpoint


def _learner(seed: int = 0, **kw) -> manlearn.LocalLearner:
    torch.manual_seed(seed)
    return manlearn.LocalLearner("resnet20", method="manpp", base="dgl", K=3, num_classes=4, image_size=8, **kw)


def _data(shuffle: bool = True, n: int = 48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle),
            DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8))


def _state(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.state_dict().items()}


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_your_objects_resume_exactly_after_a_stop(tmp_path, with_optimizer):
    def trainer(out, **kw):
        learner = _learner()
        train, test = _data()
        opt = torch.optim.SGD(learner.parameters(), lr=0.05, momentum=0.9) if with_optimizer else None
        return Trainer(learner, train, test, optimizer=opt, out_dir=out, epochs=2, log_every=2,
                       eval_every_steps=5, out=io.StringIO(), **kw)

    torch.manual_seed(123)  # the global RNG is part of the run's state (saved and restored)
    full = trainer(tmp_path / "a")
    summary = full.fit()
    assert summary["steps"] == 12 and summary["test_acc"] is not None
    torch.manual_seed(123)
    stopped = trainer(tmp_path / "b", max_steps=7)
    assert stopped.fit()["steps"] == 7
    torch.manual_seed(999)  # whatever the state when resuming: the checkpoint's comes back
    resumed = trainer(tmp_path / "b", resume=True)
    assert resumed.resumed and resumed.step == 7
    resumed.fit()
    a, b = _state(full.learner), _state(resumed.learner)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def train_lines(t):  # (the stopped run also evaluated where it stopped)
        return [(r["step"], r["losses"]) for r in t.records if r["type"] in ("train", "epoch")]

    assert train_lines(full) == train_lines(resumed)


def test_callbacks_see_steps_evaluations_and_checkpoints(tmp_path):
    seen: dict[str, list] = {"step": [], "eval": [], "ckpt": [], "fn": []}

    class Spy(Callback):
        def on_step_end(self, trainer):
            seen["step"].append(trainer.step)

        def on_eval_end(self, trainer, metrics):
            seen["eval"].append((trainer.step, metrics["acc"]))

        def on_checkpoint(self, trainer, path):
            assert path.is_file()
            seen["ckpt"].append(trainer.step)

    train, test = _data()
    Trainer(_learner(), train, test, out_dir=tmp_path, epochs=1, ckpt_every_steps=4, out=io.StringIO(),
            callbacks=[Spy(), lambda t: seen["fn"].append(t.step)]).fit()
    assert seen["step"] == seen["fn"] == list(range(1, 7))
    assert seen["ckpt"] == [4, 6, 6]  # every 4 steps, the epoch end, the end
    assert [s for s, _ in seen["eval"]] == [6] and 0.0 <= seen["eval"][0][1] <= 1.0


def test_a_list_of_batches_without_eval_data_trains(tmp_path):
    train, _ = _data(shuffle=False)
    batches = list(train)
    learner = _learner()
    before = _state(learner)
    summary = Trainer(learner, batches, out_dir=tmp_path, max_steps=3, out=io.StringIO()).fit()
    assert summary["steps"] == 3 and summary["metrics"] is None
    assert any(not torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "config.yaml").exists()
    with pytest.raises(CheckpointError, match="trained from Python objects"):
        evaluate_checkpoint(tmp_path)


def test_bad_objects_and_keywords_get_one_line(tmp_path):
    train, test = _data()
    with pytest.raises(ConfigError, match="did you mean 'log_every'"):
        Trainer(_learner(), train, out_dir=tmp_path, log_evry=5)
    with pytest.raises(ConfigError, match="LocalLearner"):
        Trainer(torch.nn.Linear(2, 2), train, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="must have a length"):
        Trainer(_learner(), iter(list(train)), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="optimizer must be"):
        Trainer(_learner(), train, out_dir=tmp_path, optimizer=3)
    with pytest.raises(ConfigError, match=r"\(inputs, targets\) pairs"):
        Trainer(_learner(), [torch.zeros(2, 3, 8, 8)], out_dir=tmp_path, out=io.StringIO()).fit()


def test_resume_with_another_learner_is_refused(tmp_path):
    train, _ = _data()
    Trainer(_learner(), train, out_dir=tmp_path, max_steps=2, out=io.StringIO()).fit()
    torch.manual_seed(0)
    other = manlearn.LocalLearner("resnet20", method="dgl", K=3, num_classes=4, image_size=8)
    with pytest.raises(CheckpointError):
        Trainer(other, train, out_dir=tmp_path, resume=True, out=io.StringIO())


def test_readme_trainer_example_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- the test suite runs this block too \(tests/test_trainer_objects.py\) -->\n```python\n(.*?)```",
                  text, re.S)
    assert m, "README lost its tested Trainer example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert namespace["summary"]["steps"] == 8 and (tmp_path / "runs/mine/last.pt").is_file()
    assert "step 8: accuracy" in capsys.readouterr().out


def test_every_parameter_group_keeps_its_lr_ratio_through_the_schedule_and_a_resume(tmp_path):
    """Your optimizer's groups (a slower head, say) were all set to the first group's lr at every step."""
    train, _ = _data(shuffle=False, n=32)  # 4 steps per epoch

    def trainer(resume: bool = False, **kw):
        learner = _learner()
        head = {id(p) for p in learner.head.parameters()}
        params = [p for p in learner.parameters() if p.requires_grad]
        opt = torch.optim.SGD([{"params": [p for p in params if id(p) not in head]},
                               {"params": [p for p in params if id(p) in head], "lr": 0.001}], lr=0.1)
        seen: list[list[float]] = []
        t = Trainer(learner, train, optimizer=opt, out_dir=tmp_path, epochs=2, callbacks=[
            lambda tr: seen.append([g["lr"] for g in tr.optimizer.param_groups])], out=io.StringIO(),
            resume=resume, overwrite=not resume, **kw)
        return t, seen

    t, seen = trainer()
    t.fit()
    assert len(seen) == 8 and seen[0] == pytest.approx([0.1, 0.001])  # cosine: the peak at the first step
    assert all(b == pytest.approx(a / 100) for a, b in seen) and seen[-1][0] < seen[1][0] < 0.1
    # stopped after step 7: the lrs in the checkpoint are near 0, the ratio still comes from your optimizer
    t, seen_half = trainer(max_steps=7)
    t.fit()
    t, seen_rest = trainer(resume=True)
    t.fit()
    assert sum(seen_half + seen_rest, []) == pytest.approx(sum(seen, []))
    t, seen = trainer(lr=0.05, max_steps=1)  # lr= sets the first group's peak; the head keeps 1/100 of it
    t.fit()
    assert seen == [pytest.approx([0.05, 0.0005])]


def test_an_fp16_learner_gets_a_gradient_scaler(tmp_path):
    train, _ = _data()
    assert Trainer(_learner(), train, out_dir=tmp_path).scaler is None
    scaler = Trainer(_learner(amp_dtype=torch.float16), train, out_dir=tmp_path).scaler
    assert isinstance(scaler, torch.amp.GradScaler)


def test_bad_eval_data_is_refused_before_training_in_one_line(tmp_path):
    """A bad evaluation batch was a RuntimeError from inside the network at the first evaluation, an epoch of
    training later and before anything was saved."""
    train, test = _data()
    x, y = next(iter(test))
    for bad, why in ((x[:, :1], r"images must be \[B, 3, H, W\]"), ((x * 255).to(torch.uint8), "float tensors"),
                     (x, "class indices must lie in 0..3")):
        labels = y + 10 if bad is x else y
        with pytest.raises(ConfigError, match=f"^eval_data: .*{why}"):
            Trainer(_learner(), train, [(bad, labels)], out_dir=tmp_path / "a")
        assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    with pytest.raises(ConfigError, match="eval_data holds no batch"):
        Trainer(_learner(), train, [], out_dir=tmp_path / "a")
    # a bad batch further on: one line at the evaluation
    t = Trainer(_learner(), train, [(x, y), (x[:, :1], y)], out_dir=tmp_path / "b", max_steps=1, out=io.StringIO())
    with pytest.raises(ConfigError, match=r"^eval_data: images must be \[B, 3, H, W\]"):
        t.fit()


def test_one_callback_outside_a_list_is_taken_and_a_class_is_refused(tmp_path):
    """callbacks=Spy() was "'Spy' object is not iterable", callbacks=[Spy] a TypeError at the first hook."""
    steps: list[int] = []

    class Spy(Callback):
        def on_step_end(self, trainer):
            steps.append(trainer.step)

    train, _ = _data()
    Trainer(_learner(), train, out_dir=tmp_path, max_steps=2, callbacks=Spy(), out=io.StringIO()).fit()
    Trainer(_learner(), train, out_dir=tmp_path, max_steps=2, callbacks=lambda t: steps.append(-t.step),
            overwrite=True, out=io.StringIO()).fit()
    assert steps == [1, 2, -1, -2]
    for bad in (Spy, [Spy]):
        with pytest.raises(ConfigError, match=r"^callbacks: Spy is a class; pass an instance, Spy\(\)$"):
            Trainer(_learner(), train, out_dir=tmp_path, callbacks=bad)
    with pytest.raises(ConfigError, match="^callbacks must be a list of callbacks, got int"):
        Trainer(_learner(), train, out_dir=tmp_path, callbacks=3)


def test_the_memory_header_counts_at_your_datas_size_and_the_peek_changes_nothing(tmp_path):
    """The header counted at the learner's image_size (32 by default), whatever size your batches have."""
    from manlearn.train.loader_run import LoaderRun

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    learner = manlearn.LocalLearner("resnet20", method="manpp", base="dgl", K=3, num_classes=4)  # image_size 32
    out = io.StringIO()
    Trainer(learner, train, out_dir=tmp_path, max_steps=1, out=out).fit()
    line = next(t for t in out.getvalue().splitlines() if t.startswith("memory (counted"))
    assert line.startswith("memory (counted, batch 8, 3x8x8)")
    at_32 = learner.memory_plan(batch_size=8).peak_activation_bytes
    assert 0 < float(line.split("keeps ")[1].split(" MiB")[0]) * 2**20 < at_32 / 4  # 16x fewer pixels
    # peeking at the first batch leaves the epochs' batches and the random state as they were
    run = LoaderRun(learner, train, None, torch.device("cpu"), seed=3)
    state = torch.get_rng_state()
    assert run.input_hw() == (8, 8) and torch.equal(torch.get_rng_state(), state)
    fresh = LoaderRun(learner, train, None, torch.device("cpu"), seed=3)
    for a, b in zip(run.batches(0, 0, 4), fresh.batches(0, 0, 4)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
