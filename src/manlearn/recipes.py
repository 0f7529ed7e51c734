"""Training recipes: named YAML configs, shipped in the package and overridable from ``./configs``.

Recipes live in ``manlearn/configs/*.yaml`` and are found with :mod:`importlib.resources`, so an
installed wheel works from any directory (no path relative to a source checkout).  A user's own
``./configs`` folder in the current directory is searched first, so a user recipe of the same name
wins over the packaged one; an explicit YAML path always wins.

Names follow ``<data>-<model>[-k<K>]-<method>`` with hyphens (``mosaic-retinanet-r50-k4-manpp``,
``cifar10-resnet32-k16-infopro-manpp``).  Other spellings resolve too: ``_`` is read as ``-``, and the
same words in another order match (``mosaic_retinanet_r50_manpp_k4``).

:func:`recipe_info` reads a recipe generically (any mapping; ``task:`` as a string or as a mapping
with a ``name``) for ``manlearn list``; it never raises, a broken file becomes an ``error`` note.
"""

from __future__ import annotations

import difflib
import functools
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from manlearn.errors import ConfigError

__all__ = ["PACKAGE_SOURCE", "RecipeInfo", "all_recipe_info", "list_recipes", "packaged_recipes_dir",
           "recipe_info", "recipes_dirs", "resolve_recipe", "user_recipes_dir"]

#: ``RecipeInfo.source`` of a recipe shipped in the package.
PACKAGE_SOURCE = "package"

@functools.lru_cache(maxsize=None)
def packaged_recipes_dir() -> Path:
    """The folder of the recipes shipped in the package.

    A plain folder for every normal install (wheel, editable, source tree).  Should the package be
    imported from a zip, the recipes are copied once (cached) to a temporary folder, because the trainers
    and ``load_config`` take file paths.
    """
    root = resources.files("manlearn") / "configs"
    if isinstance(root, Path):
        return root
    out = Path(tempfile.mkdtemp(prefix="manlearn-recipes-"))  # pragma: no cover - zipped package only
    for entry in root.iterdir():  # pragma: no cover
        if entry.name.endswith(".yaml"):
            (out / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return out  # pragma: no cover


def user_recipes_dir() -> Path:
    """``./configs`` of the current directory: a user's own recipes, searched before the packaged ones."""
    return Path.cwd() / "configs"


def recipes_dirs() -> list[tuple[str, Path]]:
    """(source, folder) pairs searched for recipes, first wins: ``./configs`` (if it exists), then the package."""
    out: list[tuple[str, Path]] = []
    user = user_recipes_dir()
    packaged = packaged_recipes_dir()
    if user.is_dir() and user.resolve() != packaged.resolve():
        out.append(("./configs", user))
    if packaged.is_dir():
        out.append((PACKAGE_SOURCE, packaged))
    return out


def list_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> YAML path; a name in ``./configs`` hides the packaged recipe of that name."""
    found: dict[str, Path] = {}
    for _, d in recipes_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def _words(name: str) -> list[str]:
    """The sorted words of a name, ``_`` read as ``-``: equal for two spellings of one recipe."""
    return sorted(w for w in name.lower().replace("_", "-").split("-") if w)


def resolve_recipe(name: str | Path) -> Path:
    """A YAML path, or a recipe name (with or without ``.yaml``, old spellings included) -> its file.

    Unknown names raise :class:`ConfigError` with a did-you-mean and the list of recipes.
    """
    p = Path(name)
    if p.is_file():
        return p
    recipes = list_recipes()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent == Path("."):
        if stem in recipes:
            return recipes[stem]
        key = stem.lower().replace("_", "-")
        if key in recipes:
            return recipes[key]
        # Same words in another order (fm-r32-manpp-infopro, mosaic_retinanet_r50_manpp_k4).
        same = [r for r in recipes if _words(r) == _words(stem)]
        if len(same) == 1:
            return recipes[same[0]]
    close = difflib.get_close_matches(stem.replace("_", "-"), list(recipes), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"no config file or recipe named '{name}'{hint}; recipes: "
                      f"{', '.join(recipes) or '(none found)'}")


# ------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class RecipeInfo:
    """What a recipe trains, as ``manlearn list`` shows it; ``error`` is set when the file is unreadable."""

    name: str
    path: Path
    source: str
    task: str = ""
    model: str = ""
    method: str = ""              # as written ("" when the recipe leaves it to the config's default)
    base: str = ""                # as written, likewise
    K: int | None = None
    budget: str = ""
    dataset: str = ""             # dataset name, or the data format of a dense recipe (coco, mask-folder)
    data_dir: str | None = None   # None: the dataset's default search ($MANLEARN_DATA, built-in folders)
    error: str | None = None


def _lookup(raw: dict[str, Any], key: str) -> Any:
    """``key`` at the top level, else inside a nested section (``task:``/``data:`` mappings)."""
    if key in raw:
        return raw[key]
    for section in raw.values():
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


def _task_name(raw: dict[str, Any]) -> str:
    task = raw.get("task")
    if isinstance(task, dict):
        task = task.get("name")
    return str(task) if task else "classification"


def _budget(raw: dict[str, Any]) -> str:
    batch = _lookup(raw, "batch_size")
    per = f" x {batch}" if batch is not None else ""
    iterations, epochs = _lookup(raw, "iterations"), _lookup(raw, "epochs")
    if iterations is not None:
        out = f"{iterations} it{per}"
    elif epochs is not None:
        out = f"{epochs} ep{per}"
    else:
        out = f"default{per}"
    limit = _lookup(raw, "train_limit")
    return out + (f" (first {limit} images)" if limit else "")


def recipe_info(name: str, path: Path, source: str = PACKAGE_SOURCE) -> RecipeInfo:
    """Read one recipe for display; never raises (a broken YAML gives ``RecipeInfo.error``)."""
    import yaml

    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return RecipeInfo(name, path, source, error=f"unreadable: {first}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return RecipeInfo(name, path, source, error=f"not a mapping of config keys ({type(raw).__name__})")
    method = str(_lookup(raw, "method") or "")
    base = str(_lookup(raw, "base") or "")
    K = _lookup(raw, "K")
    if method == "e2e":
        K = 1
    data_dir = _lookup(raw, "data_dir")
    return RecipeInfo(name, path, source, task=_task_name(raw), model=str(_lookup(raw, "model") or ""),
                      method=method, base=base, K=K if isinstance(K, int) else None, budget=_budget(raw),
                      dataset=str(_lookup(raw, "dataset") or _lookup(raw, "data_format") or ""),
                      data_dir=str(data_dir) if data_dir else None)


def all_recipe_info() -> list[RecipeInfo]:
    """:func:`recipe_info` of every recipe that :func:`list_recipes` finds, with its source folder."""
    source_of = {d: s for s, d in recipes_dirs()}
    return [recipe_info(name, path, source_of.get(path.parent, PACKAGE_SOURCE))
            for name, path in list_recipes().items()]
