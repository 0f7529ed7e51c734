"""One registry and one factory for backbones (timm style)."""
from __future__ import annotations

import difflib
import inspect
import os
from typing import Any, Callable

from ..errors import ConfigError, refuse_clash
from .base import Backbone
from .pretrained import load_pretrained

_MODELS: dict[str, Callable[..., Backbone]] = {}
_TAGS: dict[str, frozenset[str]] = {}


def register_model(fn: Callable[..., Backbone] | None = None, *, tags: tuple[str, ...] = (),
                   override: bool = False):
    """Decorator: make ``fn`` creatable by its name through :func:`create_model`.

    Usable bare (``@register_model``) or with tags (``@register_model(tags=("imagenet",))``); tags
    let tests and tools pick families, e.g. ``list_models(tag="cifar")`` for the small-input models.
    A built-in's name is refused unless ``override=True``.
    """
    def wrap(f: Callable[..., Backbone]) -> Callable[..., Backbone]:
        refuse_clash("model", f.__name__, _MODELS.get(f.__name__), f, override)
        _MODELS[f.__name__] = f
        _TAGS[f.__name__] = frozenset(tags)
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(tag: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, optionally only those carrying ``tag``
    (``cifar``: small-input models cheap at 8-32 px; ``imagenet``; ``resnet``; ``vit``)."""
    return sorted(n for n in _MODELS if tag is None or tag in _TAGS[n])


def model_source(name: str) -> str:
    """The module a registered model's factory comes from (recorded by runs)."""
    return getattr(_MODELS.get(name), "__module__", "?")


def model_tags(name: str) -> frozenset[str]:
    """The tags a registered model was registered with."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _TAGS[name]


def model_accepts(name: str, arg: str) -> bool:
    """True when the factory of ``name`` takes keyword ``arg`` (e.g. ``image_size`` for a ViT)."""
    if name not in _MODELS:
        return False
    return arg in inspect.signature(_MODELS[name]).parameters


def options_of(builder: Callable[..., Any], *fixed: str) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator for a factory that passes ``**kw`` on to ``builder``: its signature lists the builder's
    keyword options (less the ``fixed`` ones it sets itself), so a misspelt option is refused by name."""
    def wrap(f: Callable[..., Backbone]) -> Callable[..., Backbone]:
        own = [p for p in inspect.signature(f).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        taken = {p.name for p in own} | set(fixed)
        extra = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(builder).parameters.values()
                 if p.name not in taken and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        f.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        return f
    return wrap


def _check_model_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """A keyword the factory does not take, refused in one line with the nearest (not a TypeError from inside)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the factory judge
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = sorted(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    for key in kwargs:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"model {name!r} takes no option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; its options: {', '.join(known)}")


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, pretrained_head: bool = True,
                 **kwargs) -> Backbone:
    """Build a registered backbone, e.g. ``create_model("resnet32", num_classes=10)``.

    ``pretrained``: a weights file (torchvision ResNet/ResNeXt, timm ViT or manlearn state_dict, see
    :func:`manlearn.models.load_pretrained`) loaded into the new model; ``pretrained_head=False`` loads
    everything but the classifier (a checkpoint of another class count).
    """
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    _check_model_kwargs(name, _MODELS[name], kwargs)
    model = _MODELS[name](**kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained, head=pretrained_head, name=name)
    return model
