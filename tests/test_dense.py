"""Dense local learning (SPEC 3.4): the core invariants for detection and segmentation learners,
parametrised over tasks x methods, at tiny widths."""
from __future__ import annotations

import copy

import pytest
import torch

from invariants import (assert_block_grads_are_their_local_loss_grads, assert_ema_is_m_old_plus_one_minus_m_source,
                        perturb_ema_and_snapshot)
from manlearn import LocalLearner
from manlearn.detection import RetinaNetTask
from manlearn.errors import ConfigError
from manlearn.rules import MomentumAux, TaskLoss

WIDTHS = dict(widths=[8, 16, 32, 64], stem_width=8)
TASKS = {
    "detection": lambda: RetinaNetTask(5, fpn_channels=8, head_convs=1, local_channels=8),
    "segmentation": lambda: __import__("manlearn.segmentation", fromlist=["DeepLabV3Task"]).DeepLabV3Task(
        6, aspp_channels=8),
}


def _batch(task: str, b: int = 2, size: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, size, size, generator=g)
    if task == "detection":
        y = [dict(boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), labels=torch.tensor([1, 3])),
             dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))][:b]
    else:
        y = torch.randint(0, 6, (b, size, size), generator=g)
        y[:, :4] = 255  # ignored pixels
    return x, y


#: The dense recipes' methods: the task's local head alone (greedy), and MAN / MAN++ in front of it.
METHODS = {"greedy": dict(method="greedy"), "man": dict(method="man", base="greedy"),
           "manpp": dict(method="manpp", base="greedy"), "e2e": dict(method="e2e")}
LOCAL = ["greedy", "man", "manpp"]


def dense(task, model="resnet50", method="manpp", K=4, **kw) -> LocalLearner:
    """A dense learner as the recipes build it: cut at stage boundaries with the stem in the first block."""
    return LocalLearner(model, task=task, K=K, stem_module=False, image_size=64, **METHODS[method], **kw)


def _learner(task: str, method: str, K: int = 4, model: str = "resnet50", **kw) -> LocalLearner:
    torch.manual_seed(0)
    return dense(TASKS[task](), model, method, K, model_kwargs=WIDTHS, **kw).double()


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method", LOCAL)
@pytest.mark.parametrize("K", [2, 4])
def test_no_gradient_crosses_a_block_boundary(task, method, K):
    learner = _learner(task, method, K)
    x, y = _batch(task)
    assert_block_grads_are_their_local_loss_grads(learner, x.double(), y, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method", LOCAL)
def test_last_block_and_head_learn_from_the_task_loss_on_detached_earlier_stages(task, method):
    """The final head reads C2..C4 from earlier blocks detached (SPEC 3.4: FPN inputs detached)."""
    learner = _learner(task, method)
    ref = copy.deepcopy(learner)
    x, y = _batch(task)
    x = x.double()
    torch.manual_seed(7)  # the same dropout draw (DeepLab's ASPP) in both computations
    learner.train_step(x, y)
    with torch.no_grad():
        feats = ref.features(x)[:-1]
    torch.manual_seed(7)
    last = ref.blocks[-1](feats[-1])
    params = list(ref.blocks[-1].parameters()) + list(ref.head.parameters())
    expected = torch.autograd.grad(ref.task.loss(ref.head(feats + [last]), y, (64, 64)), params, allow_unused=True)
    got = list(learner.blocks[-1].parameters()) + list(learner.head.parameters())
    for p, g in zip(got, expected):
        if g is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-10)
    # and every trainable parameter of block 0 got a gradient from its local loss
    assert all(p.grad is not None for p in learner.blocks[0].parameters())


@pytest.mark.parametrize("task", sorted(TASKS))
def test_k1_e2e_equals_plain_backprop(task):
    learner = _learner(task, "e2e")
    assert learner.K == 1 and len(learner.auxes) == 0
    ref = copy.deepcopy(learner)
    x, y = _batch(task)
    x = x.double()
    torch.manual_seed(7)
    learner.train_step(x, y)
    params = [p for p in ref.parameters() if p.requires_grad]
    torch.manual_seed(7)
    loss = ref.task.loss(ref(x), y, (64, 64))
    expected = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip([p for p in learner.parameters() if p.requires_grad], expected):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-10)
    assert all(p.grad is not None for p in learner.blocks[0].parameters())


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method", ["man", "manpp"])
def test_ema_update_is_exact(task, method):
    learner = _learner(task, method).float()
    learner.momentum = 0.9
    before = perturb_ema_and_snapshot(learner)
    # the sources change in the optimiser step, so the EMA reads them as they are during train_step
    x, y = _batch(task)
    learner.train_step(x, y)
    assert_ema_is_m_old_plus_one_minus_m_source(learner, before, 0.9)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_manpp_aux_is_built_from_the_next_stage_first_unit_and_fuses_with_s(task):
    learner = _learner(task, "manpp")
    x, _ = _batch(task)
    h = x.double()
    for k, aux in enumerate(learner.auxes):
        h = learner.blocks[k](h)
        assert isinstance(aux, MomentumAux) and isinstance(aux.heads, TaskLoss)
        assert aux.source is learner.blocks[k + 1][0]  # first unit of the next block (its first stage)
        with torch.no_grad():
            aux.scale.fill_(0.3)
            torch.testing.assert_close(aux.fuse(h), 0.3 * aux.lb(h) + 1.7 * aux.ema(h))


def test_stage_cuts_follow_spec_and_bad_k_is_refused():
    learner = _learner("detection", "manpp")
    assert learner.stage_cuts == (1, 2, 3) and learner.stage_strides == [4, 8, 16, 32]
    assert [len(b) for b in learner.blocks] == [1 + 3, 4, 6, 3]  # stem + layer1 | layer2 | layer3 | layer4
    with pytest.raises(ConfigError, match="K must be 1..4"):
        _learner("detection", "manpp", K=5)
    assert _learner("detection", "manpp", K=1).K == 1  # K=1 is plain backprop, as for every task
    with pytest.raises(ConfigError, match="stage_cuts"):
        _learner("detection", "manpp", K=3, stage_cuts=(2, 2))
    with pytest.raises(ConfigError, match="use 'greedy'"):  # a rule that needs per-image class labels
        LocalLearner("resnet50", task=TASKS["detection"](), method="dgl", K=4, stem_module=False, image_size=64,
                     model_kwargs=WIDTHS)
    with pytest.raises(ConfigError, match="stage"):
        dense(TASKS["detection"](), "resnet32", "manpp", 4)
    with pytest.raises(ConfigError, match="lacks"):
        dense(object(), "resnet50", "manpp", 4, model_kwargs=WIDTHS)
    for name in sorted(TASKS):  # the 'memory' split measured cuts on class labels: a torch error inside
        with pytest.raises(ConfigError, match=r"^the 'memory' split .* per-image class labels, which \w+Task does not "
                                              r"have: cut its network with split='stages'"):
            LocalLearner("resnet50", task=TASKS[name](), method="manpp", K=4, split="memory", image_size=64,
                         model_kwargs=WIDTHS)


@pytest.mark.parametrize("model", ["resnet50", "resnet101", "resnet152"])
def test_every_detection_backbone_of_the_issue_is_isolated_at_k4(model):
    """RetinaNet MAN++ K=4 on ResNet-50/101/152 (issue #6), at reduced width."""
    learner = _learner("detection", "manpp", 4, model=model)
    assert learner.stage_cuts == (1, 2, 3) and learner.stage_strides == [4, 8, 16, 32]
    x, y = _batch("detection")
    assert_block_grads_are_their_local_loss_grads(learner, x.double(), y, rtol=1e-7, atol=1e-10)


def test_bad_dense_targets_are_one_line_before_any_work():
    """A mask id out of range was torch's IndexError, a list of masks an AttributeError, a mask tensor given to
    detection a RuntimeError at `"boxes" in t`: all from inside the step, after the blocks' forwards."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    masks = torch.randint(0, 6, (2, 32, 32))
    masks[0, 0, 0] = 255  # ignore_index is a valid entry
    seg = _learner("segmentation", "manpp")
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    for bad, why in ((torch.full((2, 32, 32), 8), r"class ids 0\.\.5 or 255 \(ignore_index\), got 8"),
                     ([masks[0], masks[1]], "integer class maps for a batch of 2, got list"),
                     (masks[0], r"got torch.int64 \[32, 32\]"), (masks.float(), "got torch.float32")):
        with pytest.raises(ConfigError, match="^segmentation targets must"):
            seg.train_step(x, bad)
        with pytest.raises(ConfigError, match=why):
            seg.train_step(x, bad)
    assert all(torch.equal(v, seg.state_dict()[k]) for k, v in before.items())  # refused before any work
    assert len(seg.train_step(x, masks).losses) == 4
    det = _learner("detection", "manpp")
    box = torch.tensor([[1.0, 2.0, 20.0, 24.0]], dtype=torch.float64)
    for bad, why in ((masks, r"^detection targets must be a list of one dict per image .* got a tensor \[2, 32, 32\]"),
                     ([masks[0], masks[1]], r"^target 0 must be a dict .* it is a Tensor"),
                     ([dict(boxes=[[1, 2, 3, 4]], labels=[1])] * 2, "^target 0: boxes and labels must be tensors"),
                     ([dict(boxes=box, labels=torch.tensor([7]))] * 2, r"^target 0: labels must lie in 0\.\.4")):
        with pytest.raises(ConfigError, match=why):
            det.train_step(x, bad)
    assert len(det.train_step(x, [dict(boxes=box, labels=torch.tensor([3]))] * 2).losses) == 4
