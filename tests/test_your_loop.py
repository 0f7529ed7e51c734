"""A PyTorch user's own loop: any input size, soft targets and label smoothing, a standard GradScaler,
and a step that does not wait for the device."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from invariants import rule_kw
from manlearn import ConfigError, LocalLearner
from manlearn.tasks import ClassificationTask


def make(method="manpp", base="infopro", **kw):
    torch.manual_seed(0)
    return LocalLearner("resnet20", method=method, **rule_kw(method, base), K=4, num_classes=5, image_size=32, **kw)


@pytest.mark.parametrize("method,base", [("manpp", "infopro"), ("dgl", None), ("infopro-contrast", None)])
@pytest.mark.parametrize("b,size", [(3, 24), (5, 40), (2, 32)])
def test_any_batch_and_spatial_size(method, base, b, size):
    learner = make(method, base)
    x, y = torch.randn(b, 3, size, size), torch.arange(b) % 5
    out = learner.train_step(x, y)
    assert out.logits.shape == (b, 5) and torch.isfinite(out.loss_values).all()


def test_infopro_reconstructs_at_the_batch_size():
    learner = make("infopro", None)
    seen = []
    learner.auxes[0].decoder.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    learner.train_step(torch.randn(2, 3, 40, 24), torch.tensor([0, 1]))
    assert seen == [(40, 24)]


@pytest.mark.parametrize("method,base", [("manpp", "infopro"), ("dgl", None), ("greedy", None)])
def test_one_hot_soft_targets_equal_class_indices(method, base):
    a = make(method, base).double()
    b = copy.deepcopy(a)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 3, 1, 4])
    oa = a.train_step(x, y)
    ob = b.train_step(x, F.one_hot(y, 5).double())
    assert oa.losses == pytest.approx(ob.losses, rel=1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)


def test_mixed_soft_targets_and_label_smoothing_reach_the_final_loss():
    learner = make("dgl", None, task=ClassificationTask(5, label_smoothing=0.1)).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, 5, dtype=torch.float64), dim=1)
    out = learner.train_step(x, y)
    expected = F.cross_entropy(out.logits, y, label_smoothing=0.1)
    assert out.losses[-1] == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ConfigError, match=r"\[B, 5\] class probabilities"):
        learner.train_step(x, torch.rand(4, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="label_smoothing"):
        ClassificationTask(5, label_smoothing=1.5)


def test_a_standard_grad_scaler_scales_every_local_backward():
    plain = make()
    scaled = copy.deepcopy(plain)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 1, 4])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    plain.train_step(x, y)
    scaled.train_step(x, y, scaler=scaler)
    for pa, pb in zip(plain.parameters(), scaled.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad * 1024, rtol=1e-4, atol=1e-6)
    opt_a = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    opt_b = torch.optim.SGD([p for p in scaled.parameters() if p.requires_grad], lr=0.1)
    opt_a.step()
    scaler.step(opt_b)
    scaler.update()
    for pa, pb in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_with_a_grad_scaler_on_cpu():
    learner = make(amp_dtype=torch.bfloat16)
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.05)
    out = learner.train_step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(out.loss_values).all()


def test_the_step_keeps_losses_on_the_device_until_asked():
    learner = make("dgl", None)
    out = learner.train_step(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert isinstance(out.loss_values, torch.Tensor) and out.loss_values.shape == (learner.K,)
    assert out._losses is None  # nothing turned into Python floats yet
    assert out.losses == out.loss_values.tolist() and out.loss == out.losses[-1]


def test_readme_own_loop_example_runs(capsys, monkeypatch):
    """The README's loop, with `torchvision.models.resnet18` standing for a network of torchvision's
    ResNet layout (torchvision cannot be imported here: tests/foreign_nets.py builds that layout)."""
    import re
    import sys
    import types
    from pathlib import Path

    from foreign_nets import tv_resnet18

    stub = types.ModuleType("torchvision")
    stub.models = types.SimpleNamespace(resnet18=tv_resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", stub)

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- the test suite runs this block \(tests/test_your_loop.py\) -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its tested own-loop example"
    exec(compile(m.group(1), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and len(eval(printed)) == 4  # K=4 losses


def test_mix_batch_gives_probabilities_and_is_a_function_of_its_seed():
    from manlearn.data.transforms import mix_batch

    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        a_x, a_y = mix_batch(x, y, 5, mixup, cutmix, seed=11)
        b_x, b_y = mix_batch(x, y, 5, mixup, cutmix, seed=11)
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
        assert a_y.shape == (6, 5) and torch.allclose(a_y.sum(1), torch.ones(6))
        assert not torch.equal(mix_batch(x, y, 5, mixup, cutmix, seed=12)[1], a_y)  # cutmix alone too
    # CutMix: the weight of the pasted image is exactly the pasted area
    cx, cy = mix_batch(x, y, 5, 0.0, 1.0, seed=3)
    pasted = (cx != x).any(dim=1)[1].float().mean()  # sample 1 (class 1) is paired with sample 4 (class 4)
    assert float(cy[1, 4]) == pytest.approx(float(pasted), abs=1e-6) and 0 < float(pasted) < 1


def test_trainer_with_mixup_cutmix_and_label_smoothing_resumes_exactly(tmp_path):
    """Soft targets reach the learner through the CLI's config keys, and a resumed run mixes exactly as an
    uninterrupted one (the draws are a function of (seed, step))."""
    from manlearn.config import TrainConfig, apply_overrides
    from manlearn.train import Trainer

    base = ["dataset=digits", "model=resnet20", "method=dgl", "K=2", "epochs=1", "batch_size=32",
            "eval_limit=64", "progress=false", "device=cpu", "task.mixup_alpha=0.4", "task.cutmix_alpha=1.0",
            "task.label_smoothing=0.1", "log_every=0"]
    full = Trainer.from_config(apply_overrides(TrainConfig(), [*base, f"out_dir={tmp_path / 'a'}", "max_steps=4"]))
    seen = []
    real = full.learner.train_step
    full.learner.train_step = lambda x, y, **kw: (seen.append(y), real(x, y, **kw))[1]
    full.fit()
    assert all(t.is_floating_point() and t.shape[1] == 10 for t in seen)
    Trainer.from_config(apply_overrides(TrainConfig(), [*base, f"out_dir={tmp_path / 'b'}", "max_steps=2"])).fit()
    resumed = Trainer.from_config(apply_overrides(TrainConfig(), [*base, f"out_dir={tmp_path / 'b'}", "max_steps=4"]), resume=True)
    resumed.fit()
    for pa, pb in zip(full.learner.state_dict().values(), resumed.learner.state_dict().values()):
        assert torch.equal(pa, pb)
    with pytest.raises(ConfigError, match="label_smoothing"):
        apply_overrides(TrainConfig(), ["task.label_smoothing=1.0"])
