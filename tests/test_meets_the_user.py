"""The Python API meets the user where they are (#27 items 5, 6): the classes come from the network's own
classifier, a conflict gets the fix, and a forward that differs only in training is refused."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import manlearn
from foreign_nets import tv_resnet18
from manlearn.errors import ConfigError


def test_num_classes_is_read_from_the_networks_classifier():
    learner = manlearn.LocalLearner(tv_resnet18(num_classes=100), method="dgl", K=4, image_size=64)
    assert learner.num_classes == 100 and learner.task.num_classes == 100
    out = learner.train_step(torch.randn(2, 3, 64, 64), torch.tensor([3, 99]))
    assert out.logits.shape == (2, 100)


def test_a_conflicting_num_classes_gets_the_fix():
    with pytest.raises(ConfigError, match=r"to \[B, 100\]; a classifier of num_classes=10 must give \[B, 10\]: "
                                          r"pass num_classes=100"):
        manlearn.LocalLearner(tv_resnet18(num_classes=100), method="dgl", K=4, image_size=64, num_classes=10)


def test_a_forward_with_dropout_only_in_training_is_refused():
    net = tv_resnet18(num_classes=10)

    def forward(self, x):  # torchvision's forward, with a functional dropout before the classifier
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.fc(F.dropout(torch.flatten(x, 1), 0.5, self.training))

    net.forward = types.MethodType(forward, net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=r"in training mode the network's own forward \(TVResNet.forward\)"):
        manlearn.LocalLearner(net, method="dgl", K=4, image_size=64)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the check changed nothing


def test_dropout_in_a_module_is_part_of_the_cut_and_accepted():
    net = tv_resnet18(num_classes=10)
    net.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(net.fc.in_features, 10))
    learner = manlearn.LocalLearner(net, method="dgl", K=4, image_size=64)
    assert learner.num_classes == 10


def test_an_input_too_small_for_the_network_is_refused_with_the_size_it_needs():
    """An 8x8 input to a 7x7-stem ResNet-18 used to train silently on 1x1 maps (#27 point 9)."""
    with pytest.raises(ConfigError, match=r"a 8x8 input is too small for this network: layer3\.0\.conv1 \(stride 2\) "
                                          r"receives a 1x1 map.*at least 32 pixels a side"):
        manlearn.LocalLearner(tv_resnet18(num_classes=10), "dgl", K=4, image_size=8, in_channels=3)
    manlearn.LocalLearner(tv_resnet18(num_classes=10), "dgl", K=4, image_size=32, in_channels=3)  # enough
    # a built-in CIFAR network on digits' 8x8 images downsamples 8 -> 4 -> 2: accepted
    manlearn.LocalLearner("resnet20", "dgl", K=3, image_size=8, in_channels=1, num_classes=10)
