"""One registry and one factory for backbones (timm style)."""
from __future__ import annotations

from typing import Callable

from ..errors import ConfigError
from .base import Backbone

_MODELS: dict[str, Callable[..., Backbone]] = {}


def register_model(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
    """Decorator: make ``fn`` creatable by its name through :func:`create_model`."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> Backbone:
    """Build a registered backbone, e.g. ``create_model("resnet32", num_classes=10)``."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
