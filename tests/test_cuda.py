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


@pytest.mark.parametrize("base", ["dgl", "infopro"])
@pytest.mark.parametrize("n", [2, 3])
def test_blocks_in_flight_on_streams_equals_the_sequential_step(base, n, monkeypatch):
    """blocks_in_flight > 1 on CUDA runs concurrency.stream_step on n streams, and computes the sequential
    step's losses, gradients, EMA units and BN statistics (float64, two steps)."""
    import manlearn.concurrency as concurrency

    torch.manual_seed(0)
    seq = LocalLearner("resnet20", method="manpp", base=base, K=5, num_classes=10, image_size=32).double().cuda()
    seq.momentum = 0.9
    conc = copy.deepcopy(seq)
    conc.blocks_in_flight = n
    used = []
    real = concurrency.stream_step
    monkeypatch.setattr(concurrency, "stream_step", lambda *a, **kw: used.append(len(a[5])) or real(*a, **kw))
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(2):
        a, b = seq.train_step(x, y), conc.train_step(x, y)
        torch.testing.assert_close(b.loss_values, a.loss_values, rtol=1e-9, atol=1e-11)
        for (name, pa), pb in zip(seq.named_parameters(), conc.parameters()):
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-8, atol=1e-10, msg=name)
        for (name, va), vb in zip(seq.state_dict().items(), conc.state_dict().values()):
            torch.testing.assert_close(vb, va, rtol=1e-8, atol=1e-10, msg=name)
        with torch.no_grad():
            for p, q in zip(seq.parameters(), conc.parameters()):
                if p.grad is not None:
                    p.sub_(0.01 * p.grad)
                    q.sub_(0.01 * q.grad)
    assert used == [n, n]
