"""What only a GPU shows: the step on CUDA, bf16 autocast, a fp16 GradScaler, channels-last, and that CPU
and CUDA compute the same step. Skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine."""
from __future__ import annotations

import copy

import pytest
import torch

from manlearn import LocalLearner
from manlearn.tasks import RetinaNetTask

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make(**kw):
    torch.manual_seed(0)
    return LocalLearner("resnet20", method="manpp", base="infopro", K=4, num_classes=10, image_size=32, **kw)


def test_cpu_and_cuda_compute_the_same_step():
    cpu = make()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    a, b = cpu.train_step(x, y), gpu.train_step(x.cuda(), y.cuda())
    torch.testing.assert_close(b.loss_values.cpu(), a.loss_values, rtol=1e-3, atol=1e-4)
    for pa, pb in zip(cpu.parameters(), gpu.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad.cpu(), pa.grad, rtol=5e-3, atol=5e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_autocast_step_is_finite_and_ema_moves(channels_last):
    learner = make(amp_dtype=torch.bfloat16, channels_last=channels_last).cuda()
    before = [p.clone() for p in learner.auxes[0].ema.parameters()]
    with torch.no_grad():
        for p in learner.blocks[1].parameters():
            p.add_(0.01)
    out = learner.train_step(torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))
    assert torch.isfinite(out.loss_values).all() and out.loss_values.device.type == "cuda"
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.auxes[0].ema.parameters()))


def test_fp16_grad_scaler_steps():
    learner = make(amp_dtype=torch.float16).cuda()
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        out = learner.train_step(torch.randn(32, 3, 32, 32, device="cuda"),
                                 torch.randint(0, 10, (32,), device="cuda"), scaler=scaler)
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(out.loss_values).all()


def test_dense_detection_step_on_cuda():
    torch.manual_seed(0)
    learner = LocalLearner("resnet50", task=RetinaNetTask(3, fpn_channels=16), method="manpp", K=4,
                           image_size=64, model_kwargs=dict(widths=(16, 32, 64, 128)),
                           amp_dtype=torch.bfloat16).cuda()
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 60.0, 70.0]], device="cuda"),
                    labels=torch.tensor([1], device="cuda"))] * 2
    out = learner.train_step(torch.randn(2, 3, 96, 128, device="cuda"), targets)
    assert torch.isfinite(out.loss_values).all()
