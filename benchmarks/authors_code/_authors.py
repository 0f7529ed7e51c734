"""Make the authors' MAN++ CIFAR code importable on any device: their modules call ``.cuda()`` while being
built, so ``.cuda()`` becomes a no-op, and ``MAN_PLUSPLUS_DIR`` (a checkout of JunhaoSu0/MAN_PlusPlus,
outside this repository) goes on ``sys.path``; ``from networks import ...`` then finds their models."""
import os
import sys

import torch
from torch import nn


def use_authors_code() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    root = os.environ.get("MAN_PLUSPLUS_DIR", "")
    code = os.path.join(root, "Exp_on_CIFAR-SVHN-STL")
    if not os.path.isdir(os.path.join(code, "networks")):
        sys.exit("set MAN_PLUSPLUS_DIR to a checkout of github.com/JunhaoSu0/MAN_PlusPlus "
                 "(see benchmarks/authors_code/README.md)")
    sys.path.insert(0, code)
