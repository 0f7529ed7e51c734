"""Pretrained weights from torchvision and timm checkpoints, into manlearn's own backbones.

``load_pretrained(model, "resnet50.pth")`` (or ``create_model("resnet50", pretrained="resnet50.pth")``)
reads a state_dict saved by ``torch.save`` -- plain, or under ``"state_dict"`` / ``"model"``, with or
without DDP's ``module.`` prefix -- recognises its key layout and renames the keys:

* torchvision ResNet / ResNeXt: ``conv1.* -> stem.0.*``, ``bn1.* -> stem.1.*``,
  ``layer{s}.{i}.* -> units.{j}.*`` (``j`` = the unit with id ``(s, i)``; block-internal names
  ``conv1..3``, ``bn1..3``, ``downsample.0/1`` are the same), ``fc.* -> head.2.*``;
* timm VisionTransformer: ``cls_token, pos_embed -> stem.cls_token, stem.pos_embed``,
  ``patch_embed.proj.* -> stem.proj.*``, ``blocks.{n}.* -> units.{n}.*`` (``mlp.fc1/fc2 -> mlp.0/2``,
  ``norm1, attn.qkv, attn.proj, norm2`` unchanged), ``norm.* -> head.norm.*``, ``head.* -> head.fc.*``;
* manlearn's own keys (``stem.*``, ``units.*``, ``head.*``) load as they are.

Every key must find its place with the right shape, or a :class:`ConfigError` lists the missing and
unexpected keys (in the checkpoint's naming; the first few and the counts) and the shape mismatches.
A classifier of another class count is refused unless ``head=False`` (``pretrained_head=False`` of
``create_model``): then everything but the classifier is loaded and the model keeps its own new one.
"""
from __future__ import annotations

import os
from typing import Mapping, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..files import torch_load_problem

Source = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

#: model key prefix of the classifier of each layout's target
_CLASSIFIER = {"torchvision-resnet": "head.2.", "timm-vit": "head.fc.", "manlearn": None}


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The state_dict in ``source`` (a path or a mapping): plain, ``{"state_dict": ...}`` or
    ``{"model": ...}``; a ``module.`` prefix on every key (DDP) is removed."""
    if isinstance(source, Mapping):
        obj = source
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"pretrained weights file {path!r} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
            raise ConfigError(f"cannot read pretrained weights {path!r} as a torch.save'd state_dict: "
                              f"{torch_load_problem(e)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError("pretrained weights must be a state_dict (names -> tensors), or one under "
                          "'state_dict' or 'model'")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def checkpoint_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``torchvision-resnet``, ``timm-vit`` or ``manlearn``, from the keys."""
    keys = set(sd)
    if any(k.startswith(("stem.", "units.")) for k in keys):
        return "manlearn"
    if any(k.startswith("layer1.") for k in keys) or "conv1.weight" in keys:
        return "torchvision-resnet"
    if any(k.startswith(("patch_embed.", "blocks.")) for k in keys) or "cls_token" in keys:
        return "timm-vit"
    raise ConfigError("unrecognised checkpoint layout (first keys: " + ", ".join(list(sd)[:5]) + "); "
                      "recognised: torchvision ResNet/ResNeXt (conv1, bn1, layer1.0..., fc), timm "
                      "VisionTransformer (cls_token, pos_embed, patch_embed, blocks.N..., norm, head) "
                      "and manlearn's own (stem, units, head)")


def _renames(model: nn.Module, layout: str) -> list[tuple[str, str]]:
    """(model prefix, checkpoint prefix) pairs; a key is renamed by its longest matching prefix."""
    if layout == "manlearn":
        return [("", "")]
    n = len(model.units)
    if layout == "torchvision-resnet":
        ids = getattr(model, "unit_ids", None) or []
        pairs = [("stem.0.", "conv1."), ("stem.1.", "bn1."), ("head.2.", "fc.")]
        return pairs + [(f"units.{j}.", f"layer{s}.{i}.") for j, (s, i) in enumerate(ids)]
    pairs = [("stem.cls_token", "cls_token"), ("stem.pos_embed", "pos_embed"), ("stem.proj.", "patch_embed.proj."),
             ("head.norm.", "norm."), ("head.fc.", "head.")]
    for j in range(n):
        pairs += [(f"units.{j}.", f"blocks.{j}."), (f"units.{j}.mlp.0.", f"blocks.{j}.mlp.fc1."),
                  (f"units.{j}.mlp.2.", f"blocks.{j}.mlp.fc2.")]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]], src: int) -> str | None:
    best = max((p for p in pairs if key.startswith(p[src])), key=lambda p: len(p[src]), default=None)
    return None if best is None else best[1 - src] + key[len(best[src]):]


def _family(model: nn.Module) -> str:
    stem = getattr(model, "stem", None)
    return "vit" if hasattr(stem, "cls_token") and hasattr(stem, "pos_embed") else "cnn"


def _describe(sd: Mapping[str, torch.Tensor], layout: str) -> str:
    """What the checkpoint holds, for the error message: block type, blocks per stage, widths."""
    try:
        if layout == "torchvision-resnet":
            counts = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in (1, 2, 3, 4)]
            block = "Bottleneck" if "layer1.0.conv3.weight" in sd else "BasicBlock"
            return (f": {block} blocks {tuple(counts)}, stem width {sd['conv1.weight'].shape[0]}, "
                    f"{sd['fc.weight'].shape[0]} classes")
        if layout == "timm-vit":
            depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
            p = sd["patch_embed.proj.weight"].shape
            return (f": depth {depth}, dim {p[0]}, patch {p[-1]}, {sd['pos_embed'].shape[1] - 1} patches, "
                    f"{sd['head.weight'].shape[0]} classes")
    except (KeyError, IndexError):
        pass
    return ""


def _listing(title: str, keys: list[str], n: int = 5) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return f"{len(keys)} {title}: {', '.join(keys[:n])}{more}"


def load_pretrained(model: nn.Module, source: Source, *, head: bool = True, name: str | None = None) -> nn.Module:
    """Load torchvision / timm / manlearn weights from ``source`` into ``model`` in place; returns it.

    ``head=False`` loads everything but the classifier (e.g. a 1000-class checkpoint into a 10-class
    model). Any key that does not find its place, or a shape mismatch, raises :class:`ConfigError`.
    """
    what = name or type(model).__name__
    sd = read_state_dict(source)
    layout = checkpoint_layout(sd)
    if layout == "torchvision-resnet" and _family(model) == "vit":
        raise ConfigError(f"a torchvision ResNet checkpoint cannot load into the ViT {what}")
    if layout == "timm-vit" and _family(model) != "vit":
        raise ConfigError(f"a timm VisionTransformer checkpoint cannot load into {what}, which is not a ViT")
    pairs = _renames(model, layout)
    own = model.state_dict()
    renamed: dict[str, str] = {}   # model key -> checkpoint key
    unexpected: list[str] = []
    for k in sd:
        mk = _rename(k, pairs, 1)
        if mk is None or mk not in own:
            unexpected.append(k)
        else:
            renamed[mk] = k
    classifier = _CLASSIFIER[layout]
    if layout == "manlearn":
        # the classifier is the head's last parametrised layer
        last = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)] if hasattr(model, "head") else []
        classifier = f"head.{last[-1]}." if last and last[-1] else ("head." if last else None)
    is_cls = (lambda key: classifier is not None and key.startswith(classifier))
    missing = [_rename(mk, pairs, 0) or mk for mk in own if mk not in renamed and not (not head and is_cls(mk))
               and not mk.endswith("num_batches_tracked")]  # old torchvision files predate it: keep the model's
    shapes = [f"{renamed[mk]} {tuple(sd[renamed[mk]].shape)} vs {tuple(own[mk].shape)} in {what}"
              for mk in renamed if sd[renamed[mk]].shape != own[mk].shape and (head or not is_cls(mk))]
    if head and any(is_cls(mk) and sd[renamed[mk]].shape[1:] == own[mk].shape[1:]
                    for mk in renamed if sd[renamed[mk]].shape != own[mk].shape):
        cls_hint = (" The classifier has another class count: pass pretrained_head=False (load_pretrained(..., "
                    "head=False)) to load everything but the classifier, which then starts from scratch.")
    else:
        cls_hint = ""
    if missing or unexpected or shapes:
        parts = [p for p in (_listing("keys the model needs but the checkpoint lacks", missing) if missing else "",
                             _listing("checkpoint keys the model has no place for", unexpected) if unexpected else "",
                             _listing("shape mismatches", shapes, 4) if shapes else "") if p]
        raise ConfigError(f"pretrained weights ({layout} layout{_describe(sd, layout)}) do not fit {what}: "
                          + "; ".join(parts) + ". Build the model with the checkpoint's widths/depth/image size."
                          + cls_hint)
    new = {mk: sd[ck] for mk, ck in renamed.items() if head or not is_cls(mk)}
    for mk, v in own.items():
        new.setdefault(mk, v)
    model.load_state_dict(new, strict=True)
    return model
