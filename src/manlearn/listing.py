"""``manlearn list``: what can be trained, as aligned plain-text tables (one per kind).

Each table is built from the registries (models, rules, datasets) and from the recipe files, so a
user's registered model or rule, or a YAML in ``./configs``, shows up without touching this module.
Building a table never fails on one bad entry: a broken recipe becomes a row with an error note.
"""

from __future__ import annotations

from typing import Callable, Sequence

from manlearn.data import dataset_files, get_dataset_info, list_datasets
from manlearn.data.info import candidate_dirs
from manlearn.models import list_models, model_tags
from manlearn.recipes import PACKAGE_SOURCE, RecipeInfo, all_recipe_info
from manlearn.rules import get_rule_class, list_base_rules, list_rules, modifier_base

__all__ = ["KINDS", "format_table", "models_table", "methods_table", "datasets_table", "recipes_table",
           "render"]

def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Left-aligned columns separated by two spaces, a dashed rule under the header; no trailing blanks."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return (indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def models_table() -> str:
    """Registered backbones: family and the input size they are built for (from their registry tags)."""
    rows = []
    for name in list_models():
        tags = model_tags(name)
        size = ("small (8-96 px, CIFAR-style stem)" if "cifar" in tags
                else "ImageNet-size (224 px)" if "imagenet" in tags else "")
        family = ", ".join(sorted(tags - {"cifar", "imagenet"})) or "-"
        rows.append((name, family, size))
    return "models:\n" + format_table(("name", "family", "input"), rows)


def methods_table() -> str:
    """Registered rules (yours too), what a modifier can wrap, and each rule's one-line ``summary``."""
    rows = []
    for name in list_rules():
        cls = get_rule_class(name)
        bases = getattr(cls, "bases", None) or list_base_rules()  # a modifier may take only some bases
        takes = "base=" + "|".join(bases) if cls.modifier else ""
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append((name, takes, cls.summary or (doc[0].replace("``", "") if doc else "")))
    return "methods:\n" + format_table(("name", "takes", "what"), rows)


def datasets_table() -> str:
    """Classification datasets: classes, the tensor the model sees, and the files looked for."""
    rows = []
    for name in list_datasets():
        info = get_dataset_info(name)
        classes = info.num_classes or "from folder"
        files = dataset_files(name, "train")
        shown = files[0] + (f" (+{len(files) - 1})" if len(files) > 1 else "")
        rows.append((name, classes, f"{info.in_channels}x{info.image_size}x{info.image_size}", shown))
    note = ("  (files are found via data_dir=, $MANLEARN_DATA or a default folder; detection/segmentation "
            "data: COCO json or mask folders, e.g. `manlearn data make-mosaic`)")
    return "datasets:\n" + format_table(("name", "classes", "model input", "train files"), rows) + "\n" + note


def _recipe_data(info: RecipeInfo) -> str:
    """Dataset and where it is read from: the recipe's data_dir, else the dataset's default folder, else
    a reminder that it must be given (ImageNet, CIFAR... are never downloaded)."""
    if info.data_dir:
        where = f"data_dir={info.data_dir}"
    else:
        default = [d for d in candidate_dirs(info.dataset, None)] if info.dataset in list_datasets() else []
        where = default[0] if default else "set data_dir= or $MANLEARN_DATA"
        if info.dataset == "digits":
            where = "bundled with scikit-learn"
    return f"{info.dataset} ({where})" if info.dataset else where


def recipe_label(info: RecipeInfo) -> tuple[str, int | None]:
    """(method, K) as the recipe trains them: the config's defaults for what it leaves out, a modifier with the
    base it wraps (a dense task's: the task's local head, ``greedy``, unless it names another)."""
    from manlearn.config import TrainConfig

    defaults = TrainConfig.model_fields
    method = info.method or defaults["method"].default
    base = info.base or defaults["base"].default
    if info.task not in ("", "classification") and base == defaults["base"].default:
        base = "greedy"
    wrapped = modifier_base(method, base)  # a rule of a file not imported: shown as written
    K = 1 if method == "e2e" else (info.K if info.K is not None else defaults["K"].default)
    return (f"{wrapped}+{method}" if wrapped else method), K


def recipes_table() -> str:
    """Every recipe found (``./configs`` first, then the packaged ones): task, model, method, K, budget, data."""
    infos = all_recipe_info()
    if not infos:
        return "recipes:\n  (none found)"
    show_source = any(i.source != PACKAGE_SOURCE for i in infos)
    rows = []
    for i in infos:
        if i.error:
            row: list[object] = [i.name, f"error: {i.error}", "", "", "", "", ""]
        else:
            row = [i.name, i.task, i.model, *recipe_label(i), i.budget, _recipe_data(i)]
        if show_source:
            row.append(i.source)
        rows.append(row)
    headers = ["name", "task", "model", "method", "K", "budget", "data"] + (["from"] if show_source else [])
    return "recipes:\n" + format_table(headers, rows)


#: ``manlearn list <kind>`` -> the table builder.
KINDS: dict[str, Callable[[], str]] = {
    "models": models_table,
    "methods": methods_table,
    "datasets": datasets_table,
    "recipes": recipes_table,
}


def render(kinds: Sequence[str] | None = None) -> str:
    """The tables of ``kinds`` (all four by default), separated by a blank line."""
    return "\n\n".join(KINDS[k]() for k in (kinds or list(KINDS)))
