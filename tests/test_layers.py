"""The layout-preserving layers: same function as torch's, gradients in the activation's layout."""
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import manlearn
from manlearn.models.layers import GlobalAvgPool
from manlearn.rules.heads import InfoProDecoder


def _relu_pool_grad(pool, x):
    x = x.clone().requires_grad_()
    out = pool(torch.relu(x))
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out, x.grad


def test_global_avg_pool_equals_adaptive_avg_pool_and_its_gradient():
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64)
    out, grad = _relu_pool_grad(GlobalAvgPool(), x)
    ref, ref_grad = _relu_pool_grad(lambda t: F.adaptive_avg_pool2d(t, 1), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_global_avg_pool_backward_keeps_channels_last():
    """The ReLU before the pool must see a gradient it can use in its own (channels-last) layout:
    a dense NCHW gradient there is the slow mixed-layout path."""
    seen = []
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.relu(x)
    r.register_hook(lambda g: seen.append(g))
    GlobalAvgPool()(r).sum().backward()
    g = seen[0]
    assert g.is_contiguous(memory_format=torch.channels_last) or 0 in g.stride()[2:], g.stride()


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_factorized_infopro_decoder_hands_back_the_input_layout(layout):
    dec = InfoProDecoder(16, image_size=32, factorized=True, cpu_bn_nchw=False).to(memory_format=layout)
    h = torch.randn(2, 16, 8, 8).contiguous(memory_format=layout)
    seen = []
    orig = dec.bn.forward
    dec.bn.forward = lambda t: (seen.append(t), orig(t))[1]
    dec(h)
    assert seen[0].is_contiguous(memory_format=layout)


def test_heads_of_every_rule_use_the_layout_preserving_pool():
    learner = manlearn.LocalLearner("resnet20", method="manpp", base="dgl", K=4)
    pools = [m for m in learner.modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
    assert not pools
    assert any(isinstance(m, GlobalAvgPool) for m in learner.auxes.modules())


def _decoder_run(dec, h):
    h = h.clone().requires_grad_()
    out = dec(h)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                [h, *dec.parameters()])
    return out, grads, [b.clone() for b in dec.buffers()]


def _assert_same_function(fast, plain, h):
    """Same output, gradients (input and every parameter) and running statistics, to float64 rounding;
    returns ``fast``'s gradients."""
    out, grads, buffers = _decoder_run(fast, h)
    ref, ref_grads, ref_buffers = _decoder_run(plain, h)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    for b, r in zip(buffers, ref_buffers):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=0)
    return grads


@pytest.mark.parametrize("side", [8, 16, 32])  # factorised, upsample-then-conv, no upsampling
def test_infopro_decoder_cpu_bn_nchw_is_the_same_function(side):
    """The decoder's batch norm in NCHW on a channels-last input: same output, gradients (input and
    every parameter) and running statistics as the channels-last batch norm, to float64 rounding."""
    import copy

    torch.manual_seed(0)
    fast = InfoProDecoder(16, image_size=32).double().to(memory_format=torch.channels_last)
    plain = copy.deepcopy(fast)
    plain.cpu_bn_nchw = False
    h = (torch.randn(3, 16, side, side, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    grads = _assert_same_function(fast, plain, h)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # the caller's layout comes back


def test_infopro_decoder_cpu_bn_nchw_layouts_and_memory():
    """The batch norm sees NCHW input *and* NCHW gradient (a mixed pair is torch's slow path), conv2 a
    channels-last input, and the decoder keeps exactly as many bytes for backward as before."""
    import copy

    from manlearn.memory import SavedTensorTracker

    torch.manual_seed(0)
    fast = InfoProDecoder(16, image_size=32).to(memory_format=torch.channels_last)
    plain = copy.deepcopy(fast)
    plain.cpu_bn_nchw = False
    h = torch.randn(4, 16, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    seen = {}
    batch_norm = torch.nn.functional.batch_norm

    def watch_bn(x, *args, **kwargs):  # the op itself, inside the module
        out = batch_norm(x, *args, **kwargs)
        if "bn_in" not in seen:
            seen["bn_in"] = x
            out.register_hook(lambda g: seen.setdefault("bn_grad", g))
        return out

    fast.conv2.register_forward_pre_hook(lambda m, args: seen.setdefault("conv2_in", args[0]))
    kept = []
    for dec in (fast, plain):
        with SavedTensorTracker([*dec.parameters(), *dec.buffers(), h]) as tr:
            with mock.patch("torch.nn.functional.batch_norm", watch_bn) if dec is fast else contextlib.nullcontext():
                out = dec(h)
            kept.append(tr.live)
        out.sum().backward()
    assert seen["bn_in"].is_contiguous() and seen["bn_grad"].is_contiguous()
    assert seen["conv2_in"].is_contiguous(memory_format=torch.channels_last) and not seen["conv2_in"].is_contiguous()
    assert kept[0] == kept[1]


def test_imagenet_decoder_12_channel_bn_runs_nchw_on_cpu_same_function():
    """The ImageNet decoder's narrow (12-channel) batch norm is the NCHW-on-CPU one; the wider ones are
    plain; with it switched off the decoder computes the same outputs, gradients and statistics."""
    import copy

    from manlearn.models.layers import CpuNchwBatchNorm2d
    from manlearn.rules.heads_imagenet import ImageNetInfoProDecoder

    torch.manual_seed(0)
    fast = ImageNetInfoProDecoder(64, feature_size=4, image_size=32).double().to(memory_format=torch.channels_last)
    bns = [m for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    narrow = [m for m in bns if isinstance(m, CpuNchwBatchNorm2d)]
    assert narrow and all(m.num_features < 16 for m in narrow)
    assert all(m.num_features >= 16 for m in bns if m not in narrow)
    plain = copy.deepcopy(fast)
    for m in plain.modules():
        if isinstance(m, CpuNchwBatchNorm2d):
            m.nchw_on_cpu = False
    assert fast.state_dict().keys() == plain.state_dict().keys()
    h = (torch.randn(3, 64, 4, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=torch.channels_last)
    _assert_same_function(fast, plain, h)


def test_cpu_nchw_batch_norm_keeps_the_callers_layout_and_is_batchnorm2d():
    from manlearn.models.layers import CpuNchwBatchNorm2d

    bn = CpuNchwBatchNorm2d(12)
    ref = torch.nn.BatchNorm2d(12)
    assert bn.state_dict().keys() == ref.state_dict().keys()
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 12, 5, 5).contiguous(memory_format=fmt).requires_grad_()
        y = bn(x)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(torch.randn_like(y))
        assert x.grad.is_contiguous(memory_format=fmt)
