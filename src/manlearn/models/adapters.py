"""Your network, as it is: adapters that express a network written elsewhere as ``stem -> units -> head``.

``adapt_model(module)`` recognises three layouts by their attribute names and cuts them without copying
anything: the adapted backbone's stem, units and head are the user's own module and parameter objects,
so training the learner trains the user's network in place.

* **torchvision ResNet / ResNeXt** (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``):
  stem = ``conv1, bn1, relu, maxpool``; units = every block of ``layer1..layer4`` in order, ids
  ``(stage 1..4, index)``; head = ``avgpool``, flatten, ``fc``.
* **timm VisionTransformer** (``patch_embed, cls_token, pos_embed, blocks, norm, head``, optional
  ``pos_drop, patch_drop, norm_pre, fc_norm, head_drop``), the standard case only: one class token
  prepended, ``pos_embed`` added to every token including it, ``global_pool`` ``'token'`` or ``'avg'``.
  stem = patch_embed + class token + position embedding (+ pos_drop, patch_drop, norm_pre); units =
  ``blocks``, ids ``(1, i)``; head = norm -> pooling (class token or mean of the patch tokens) ->
  fc_norm -> head_drop -> head. Register tokens, ``no_embed_class``, no class token, attention pooling
  and dynamic image sizes are refused.
* **nn.Sequential**: stem = the first child, head = the last child, units = the children between.
  A parameter-free child (ReLU, pooling, dropout, flatten) never stands alone: it joins the unit before
  it (or the stem), and the parameter-free children just before the last child join the head (so
  ``..., AdaptiveAvgPool2d, Flatten, Linear`` is one head). At least one unit must remain.

A ResNet or ViT is checked once on a probe input (eval mode, no gradient): the cut network must compute
what the module's own ``forward`` computes, so a subclass that changed ``forward`` is refused rather
than silently trained as something else.

Anything else: name the cut points with :func:`cut_model`, e.g.
``cut_model(net, stem=["conv1", "bn1", "relu", "maxpool"], units=["layer*.*"],
head=["avgpool", nn.Flatten(1), "fc"])``.
"""
from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from .base import Backbone, follows_protocol
from .resnet import imagenet_init
from .vit import vit_init

RECOGNISED = ("a module that already has `stem`, `units`, `head`; torchvision's ResNet/ResNeXt layout "
              "(conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc); timm's VisionTransformer layout "
              "(patch_embed, cls_token, pos_embed, blocks, norm, head); an nn.Sequential")

Part = Union[str, nn.Module]

_TV_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
_TIMM_VIT = ("patch_embed", "blocks", "norm", "head")


def _seq(mods: Sequence[nn.Module]) -> nn.Module:
    """One module for a list of modules: the module itself when alone (its own state_dict keys)."""
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


# --------------------------------------------------------------------------- torchvision ResNet
def _is_tv_resnet(m: nn.Module) -> bool:
    return (all(isinstance(getattr(m, n, None), nn.Module) for n in _TV_RESNET)
            and all(isinstance(getattr(m, f"layer{s}"), nn.Sequential) for s in range(1, 5))
            and isinstance(m.conv1, nn.Conv2d))  # fc: a Linear, or your own head (nn.Sequential(Dropout, Linear))


def _adapt_tv_resnet(m: nn.Module) -> Backbone:
    units, ids = [], []
    for s in range(1, 5):
        for i, block in enumerate(getattr(m, f"layer{s}")):
            units.append(block)
            ids.append((s, i))
    if not units:
        raise ConfigError("this torchvision-layout ResNet has no blocks in layer1..layer4; nothing to cut")
    bb = Backbone(nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), units,
                  nn.Sequential(m.avgpool, nn.Flatten(1), m.fc), ids)
    bb.init_weights = imagenet_init  # torchvision's ResNet init, for MAN's init="random"
    return bb


# --------------------------------------------------------------------------- timm ViT
class TimmViTStem(nn.Module):
    """timm's ``patch_embed`` -> ``_pos_embed`` (class token first, position embedding on every token,
    ``pos_drop``) -> ``patch_drop`` -> ``norm_pre``, on the user's own modules and parameters."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token      # the same nn.Parameter objects as the user's network
        self.pos_embed = vit.pos_embed
        for name in ("pos_drop", "patch_drop", "norm_pre"):
            mod = getattr(vit, name, None)
            setattr(self, name, mod if isinstance(mod, nn.Module) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm_pre(self.patch_drop(x))


class TimmViTHead(nn.Module):
    """timm's ``forward_head`` after ``norm``: class-token or mean pooling, ``fc_norm``, ``head_drop``, ``head``."""

    def __init__(self, vit: nn.Module, pool: str, num_prefix_tokens: int) -> None:
        super().__init__()
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.norm = vit.norm
        for name in ("fc_norm", "head_drop"):
            mod = getattr(vit, name, None)
            setattr(self, name, mod if isinstance(mod, nn.Module) else nn.Identity())
        self.head = vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.pool == "avg" else x[:, 0]
        return self.head(self.head_drop(self.fc_norm(x)))

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


def _is_timm_vit(m: nn.Module) -> bool:
    return (all(isinstance(getattr(m, n, None), nn.Module) for n in _TIMM_VIT)
            and hasattr(m, "cls_token") and hasattr(m, "pos_embed"))


def _adapt_timm_vit(m: nn.Module) -> Backbone:
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"this timm-layout VisionTransformer is not the standard case the adapter handles "
                           f"({why}); name its cut points with manlearn.cut_model(...) and a stem of your own")
    if not isinstance(m.cls_token, nn.Parameter):
        raise refuse("it has no class token (class_token=False)")
    if not isinstance(m.pos_embed, nn.Parameter):
        raise refuse("it has no learned position embedding")
    if getattr(m, "reg_token", None) is not None or getattr(m, "num_reg_tokens", 0):
        raise refuse("it has register tokens")
    if getattr(m, "no_embed_class", False):
        raise refuse("no_embed_class=True: the position embedding skips the class token")
    if getattr(m, "num_prefix_tokens", 1) != 1:
        raise refuse(f"num_prefix_tokens={m.num_prefix_tokens}, expected 1 (the class token)")
    if getattr(m, "dynamic_img_size", False):
        raise refuse("dynamic_img_size=True")
    if getattr(m, "attn_pool", None) is not None:
        raise refuse("attention pooling (global_pool='map')")
    pool = getattr(m, "global_pool", "token")
    if pool not in ("token", "avg"):
        raise refuse(f"global_pool={pool!r}; 'token' and 'avg' are handled")
    if m.cls_token.shape[:2] != (1, 1) or m.pos_embed.dim() != 3 or m.pos_embed.shape[0] != 1:
        raise refuse(f"cls_token {tuple(m.cls_token.shape)} / pos_embed {tuple(m.pos_embed.shape)} shapes")
    blocks = list(m.blocks)
    if not blocks:
        raise refuse("it has no blocks")
    bb = Backbone(TimmViTStem(m), blocks, TimmViTHead(m, pool, 1), [(1, i) for i in range(len(blocks))])
    bb.init_weights = vit_init  # timm's init of linear and LayerNorm layers, for MAN's init="random"
    return bb


def _vit_probe(m: nn.Module) -> torch.Tensor | None:
    pe = m.patch_embed
    size = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if size is None or not isinstance(proj, nn.Conv2d):
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(1, proj.in_channels, *size, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- nn.Sequential
def _adapt_sequential(m: nn.Sequential) -> Backbone:
    children = list(m)
    too_short = ConfigError(
        f"this nn.Sequential has {len(children)} children and cannot be cut: the rule for a Sequential is "
        "stem = first child (with the parameter-free children after it), head = last child (with the "
        "parameter-free children before it), units = the children between (a parameter-free child joins "
        "the unit before it), and at least one unit must remain. Name the cut points with "
        "manlearn.cut_model(...)")
    if len(children) < 3:
        raise too_short

    def has_params(c: nn.Module) -> bool:
        return any(True for _ in c.parameters())

    first, last = 1, len(children) - 1            # children[first:last] are unit candidates
    while first < last and not has_params(children[first]):
        first += 1
    while last > first and not has_params(children[last - 1]):
        last -= 1
    groups: list[list[nn.Module]] = []
    for c in children[first:last]:
        if has_params(c) or not groups:
            groups.append([c])
        else:
            groups[-1].append(c)
    if not groups:
        raise too_short
    return Backbone(_seq(children[:first]), [_seq(g) for g in groups], _seq(children[last:]),
                    [(1, i) for i in range(len(groups))])


# --------------------------------------------------------------------------- checks
def _check_same(module: nn.Module, adapted: nn.Module, x: torch.Tensor, what: str) -> None:
    """The adapted network must compute what ``module.forward`` computes (eval and training mode, no gradient)."""
    params = list(module.parameters())
    if params:
        x = x.to(device=params[0].device, dtype=params[0].dtype if params[0].is_floating_point() else x.dtype)
    want, got = _run_both(module, adapted, x, what, train=False)
    if not _same(want, got):
        raise ConfigError(f"{what}: the network's own forward does not compute stem -> units -> head of the "
                          "recognised layout (was forward changed?); name its cut points with "
                          "manlearn.cut_model(...)")
    # training mode too: a forward that differs only there (F.dropout(x, self.training)) is refused as well;
    # two images, since batch norm in training mode needs more than one value
    want, got = _run_both(module, adapted, torch.cat([x, x.flip(-1)]), what, train=True)
    if not _same(want, got):
        raise ConfigError(f"{what}: in training mode the network's own forward ({type(module).__name__}.forward) "
                          "does not compute stem -> units -> head (a dropout or another training-only step written "
                          "in forward?); move it into a module, or name the cut points with manlearn.cut_model(...)")


def _run_both(module: nn.Module, adapted: nn.Module, x: torch.Tensor, what: str, train: bool) -> tuple[Any, Any]:
    """``module(x)`` and ``adapted(x)`` without gradient, in eval or training mode (the same random draws for
    both); the modes, the BN statistics and the global random state are as before afterwards."""
    modes = [(mod, mod.training) for mod in module.modules()]
    saved = {k: v.clone() for k, v in module.state_dict().items()} if train else None  # BN statistics move
    try:
        module.train(train)
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(0)
            want = module(x)
            torch.manual_seed(0)
            got = adapted(x)
    except Exception as e:  # noqa: BLE001 - reported as a refusal with the cause
        raise ConfigError(f"{what}: running the network on a probe input {list(x.shape)} failed ({e}); name its "
                          "cut points with manlearn.cut_model(...)") from None
    finally:
        if saved is not None:
            module.load_state_dict(saved)
        for mod, mode in modes:
            mod.training = mode
    return want, got


def _same(want: Any, got: Any) -> bool:
    return isinstance(want, torch.Tensor) and want.shape == got.shape and bool(torch.allclose(
        want.float(), got.float(), rtol=1e-3, atol=1e-4))


# --------------------------------------------------------------------------- public
def adapt_model(module: nn.Module, *, check: bool = True) -> nn.Module:
    """``module`` as a backbone following the protocol (``stem``, ``units``, ``head``, ``unit_ids``).

    Returns ``module`` itself when it already follows the protocol; otherwise a :class:`Backbone` whose
    parts are ``module``'s own submodules and parameters (see the module docstring for the recognised
    layouts). ``check`` runs a recognised ResNet/ViT once on a probe input to confirm the cut network
    computes what ``module`` computes. Unrecognised modules raise :class:`ConfigError`.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"adapt_model takes an nn.Module, got {type(module).__name__}")
    if follows_protocol(module):
        return module
    name = type(module).__name__
    if _is_tv_resnet(module):
        adapted = _adapt_tv_resnet(module)
        if check:
            probe = torch.randn(1, module.conv1.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
            _check_same(module, adapted, probe, f"{name} (torchvision ResNet layout)")
        return adapted
    if _is_timm_vit(module):
        adapted = _adapt_timm_vit(module)
        probe = _vit_probe(module) if check else None
        if probe is not None:
            _check_same(module, adapted, probe, f"{name} (timm VisionTransformer layout)")
        return adapted
    if isinstance(module, nn.Sequential):
        return _adapt_sequential(module)
    children = ", ".join(n for n, _ in module.named_children()) or "none"
    raise ConfigError(f"cannot tell where to cut {name} (children: {children}). Recognised: {RECOGNISED}. "
                      "For anything else name the cut points by module path: manlearn.cut_model(model, "
                      "stem=[...], units=['layer*.*'], head=[..., nn.Flatten(1), 'fc'])")


def _path_matches(pattern: str, name: str) -> bool:
    """Glob on dotted paths: ``*`` matches within one path component (``layer*.*`` = ``layer1.0``,
    never ``layer1.0.conv1``)."""
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(b, a) for a, b in zip(p, n))


def _resolve(module: nn.Module, item: Part, role: str, names: dict[str, nn.Module],
             glob: bool = False) -> list[tuple[str, nn.Module]]:
    if isinstance(item, nn.Module):
        return [(f"<{type(item).__name__}>", item)]
    if not isinstance(item, str):
        raise ConfigError(f"cut_model {role}: give module paths (str) or nn.Module objects, got {item!r}")
    if glob and any(ch in item for ch in "*?["):
        hits = [(n, m) for n, m in names.items() if n and _path_matches(item, n)]
        if not hits:
            raise ConfigError(f"cut_model {role}: the pattern {item!r} matches no module of "
                              f"{type(module).__name__}; top-level children: "
                              f"{', '.join(n for n, _ in module.named_children())}")
        return hits
    if item not in names or item == "":
        close = difflib.get_close_matches(item, [n for n in names if n], n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"cut_model {role}: {type(module).__name__} has no module at path {item!r}{hint} "
                          f"(top-level children: {', '.join(n for n, _ in module.named_children())})")
    return [(item, names[item])]


def cut_model(module: nn.Module, stem: Sequence[Part], units: Sequence[Part], head: Sequence[Part],
              unit_ids: Sequence[tuple[int, int]] | None = None, *,
              example_input: torch.Tensor | None = None) -> Backbone:
    """Name where to cut any network, by module path: a :class:`Backbone` of ``module``'s own modules.

    Args:
        stem: module paths (``"conv1"``, ``"features.0"``) or modules, applied in order.
        units: module paths, or globs over dotted paths where ``*`` stays within one component
            (``"layer*.*"`` = every block of ``layer1..layer4``, in the network's order).
        head: module paths or modules (e.g. ``nn.Flatten(1)``), applied in order.
        unit_ids: ``(stage, index)`` per unit; default: one stage per parent module of the units
            (``layer1.*`` -> stage 1, ``layer2.*`` -> stage 2; ``blocks.*`` -> stage 1), indices in order.
        example_input: when given, the cut network must compute what ``module(example_input)`` does.

    The path ``"conv1"`` is the module ``module.conv1``; a path that does not exist, a pattern matching
    nothing, and a module named twice (or inside another named module) are refused.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"cut_model takes an nn.Module, got {type(module).__name__}")
    names = dict(module.named_modules())
    for role, items in (("stem", stem), ("units", units), ("head", head)):
        if isinstance(items, (str, nn.Module)):
            raise ConfigError(f"cut_model {role} must be a list of module paths or modules, e.g. [{items!r}]")
    stem_parts = [p for it in stem for p in _resolve(module, it, "stem", names)]
    unit_parts = [p for it in units for p in _resolve(module, it, "units", names, glob=True)]
    head_parts = [p for it in head for p in _resolve(module, it, "head", names)]
    if not unit_parts:
        raise ConfigError("cut_model needs at least one unit")
    named = [(n, m) for n, m in stem_parts + unit_parts + head_parts if not n.startswith("<")]
    seen: dict[int, str] = {}
    for n, m in named:
        if id(m) in seen:
            raise ConfigError(f"cut_model: module {n!r} is named twice (also as {seen[id(m)]!r})")
        seen[id(m)] = n
    paths = [n for n, _ in named]
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a + "."):
                raise ConfigError(f"cut_model: {b!r} lies inside {a!r}; a module belongs to one part only")
    if unit_ids is None:
        parents: list[str] = []
        unit_ids = []
        counts: dict[str, int] = {}
        for n, _ in unit_parts:
            parent = n.rpartition(".")[0]
            if parent not in parents:
                parents.append(parent)
            unit_ids.append((parents.index(parent) + 1, counts.get(parent, 0)))
            counts[parent] = counts.get(parent, 0) + 1
    elif len(unit_ids) != len(unit_parts):
        raise ConfigError(f"cut_model: {len(unit_ids)} unit_ids for {len(unit_parts)} units "
                          f"({', '.join(n for n, _ in unit_parts)})")
    bb = Backbone(_seq([m for _, m in stem_parts]) if stem_parts else nn.Identity(),
                  [m for _, m in unit_parts],
                  _seq([m for _, m in head_parts]) if head_parts else nn.Identity(),
                  [tuple(map(int, u)) for u in unit_ids])
    if example_input is not None:
        _check_same(module, bb, example_input, f"cut_model({type(module).__name__})")
    return bb
