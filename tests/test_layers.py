"""The layout-preserving layers: same function as torch's, gradients in the activation's layout."""
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
    dec = InfoProDecoder(16, image_size=32, factorized=True).to(memory_format=layout)
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
