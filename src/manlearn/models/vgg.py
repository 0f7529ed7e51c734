"""PredSim's VGG backbones ``vgg8b`` / ``vgg11b`` (Nøkland & Eidnes 2019), for running the original
PredSim recipe.

Configurations (numbers: 3x3 conv-BN-ReLU widths, ``M``: 2x2 max-pool):
``vgg8b``  128, 256, M, 256, 512, M, 512, M, 512, M, FC1024, FC;
``vgg11b`` 128, 128, 128, 256, M, 256, 512, M, 512, 512, M, 512, M, FC1024, FC.
Every conv layer (with the max-pool after it) is one unit; the stem is the first conv layer. The
``FC1024`` layer belongs to the head here (flatten, Linear, BN1d, ReLU, Linear), so it is trained with the
last piece rather than as a local block of its own as in the original code; dropout is not built.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import Backbone
from .registry import options_of, register_model
from .resnet_cifar import init_weights

VGG_CONFIGS = {
    "vgg8b": (128, 256, "M", 256, 512, "M", 512, "M", 512, "M"),
    "vgg11b": (128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"),
}


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def vgg_predsim(config: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                hidden: int = 1024) -> Backbone:
    """A PredSim VGG; ``image_size`` fixes the flattened size the FC layer reads."""
    pools = VGG_CONFIGS[config].count("M")
    if image_size < 2 ** pools:
        raise ConfigError(f"{config} halves its input {pools} times: it needs image_size >= {2 ** pools}, "
                          f"got {image_size}")
    layers: list[list[nn.Module]] = []
    c, size = in_channels, image_size
    for item in VGG_CONFIGS[config]:
        if item == "M":
            layers[-1].append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers.append(_conv(c, int(item)))
            c = int(item)
    stem, *rest = [nn.Sequential(*mods) for mods in layers]
    head = nn.Sequential(nn.Flatten(1), nn.Linear(c * size * size, hidden), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
    model = Backbone(stem, rest, head)
    init_weights(model)
    return model


@register_model(tags=("vgg",))
@options_of(vgg_predsim, "config")
def vgg8b(image_size: int = 32, **kw) -> Backbone:
    return vgg_predsim("vgg8b", image_size=image_size, **kw)


@register_model(tags=("vgg",))
@options_of(vgg_predsim, "config")
def vgg11b(image_size: int = 32, **kw) -> Backbone:
    return vgg_predsim("vgg11b", image_size=image_size, **kw)
