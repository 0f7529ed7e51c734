"""Recipes: packaged lookup, the naming scheme, old names, user ./configs, and the `manlearn list` tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import manlearn
from manlearn import cli
from manlearn.errors import ConfigError
from manlearn.listing import format_table
from manlearn.listing import recipe_label
from manlearn.recipes import (PACKAGE_SOURCE, all_recipe_info, list_recipes, packaged_recipes_dir, recipe_info,
                              resolve_recipe)

# Every recipe name before the renaming (as in users' scripts) -> its name now.
OLD_TO_NEW = {
    **{n: n for n in (
        "cifar10-resnet110-e2e", "cifar10-resnet110-k55-infopro-manpp", "cifar10-resnet32-e2e",
        "cifar10-resnet32-k16-dgl-manpp", "cifar10-resnet32-k16-infopro-manpp",
        "fm-r32-dgl-manpp", "fm-r32-dgl", "fm-r32-e2e", "fm-r32-infopro-manpp", "fm-r32-infopro",
        "imagenet-resnet101-e2e", "imagenet-resnet101-k2-infopro-manpp", "imagenet-resnet101-k4-infopro-manpp",
        "imagenet-resnet152-e2e", "imagenet-resnet152-k2-infopro-manpp", "imagenet-resnet152-k4-infopro-manpp",
        "imagenet-resnext101-e2e", "imagenet-resnext101-k2-infopro-manpp", "imagenet-resnext101-k4-infopro-manpp",
        "quickstart", "stl10-resnet32-e2e", "stl10-resnet32-k16-infopro-manpp", "svhn-resnet32-e2e",
        "svhn-resnet32-k16-infopro-manpp")},
    "coco_retinanet_r101_e2e": "coco-retinanet-r101-e2e",
    "coco_retinanet_r101_manpp_k4": "coco-retinanet-r101-k4-manpp",
    "coco_retinanet_r152_e2e": "coco-retinanet-r152-e2e",
    "coco_retinanet_r152_manpp_k4": "coco-retinanet-r152-k4-manpp",
    "coco_retinanet_r50_e2e": "coco-retinanet-r50-e2e",
    "coco_retinanet_r50_manpp_k4": "coco-retinanet-r50-k4-manpp",
    "mosaic_deeplab_r50_e2e": "mosaic-deeplab-r50-e2e",
    "mosaic_deeplab_r50_manpp_k4": "mosaic-deeplab-r50-k4-manpp",
    "mosaic_retinanet_r50_e2e": "mosaic-retinanet-r50-e2e",
    "mosaic_retinanet_r50_manpp_k4": "mosaic-retinanet-r50-k4-manpp",
}
DATA_WORDS = {"fm", "cifar10", "svhn", "stl10", "imagenet", "coco", "mosaic"}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder, so that no ./configs of the checkout is in the way."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_recipes_are_package_data():
    d = packaged_recipes_dir()
    assert d.resolve() == Path(manlearn.__file__).resolve().parent / "configs"
    assert len(list(d.glob("*.yaml"))) >= len(set(OLD_TO_NEW.values()))
    # no recipe left behind in (or merged into) the checkout's former configs/ folder
    assert not list((Path(manlearn.__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_every_old_name_still_resolves(old, elsewhere):
    new = OLD_TO_NEW[old]
    p = resolve_recipe(old)
    assert p == packaged_recipes_dir() / f"{new}.yaml"
    assert resolve_recipe(f"{old}.yaml") == p
    assert cli.resolve_recipe(old) == p  # the former home of the function still answers


def test_hyphen_underscore_and_word_order_spellings(elsewhere):
    p = packaged_recipes_dir() / "mosaic-retinanet-r50-k4-manpp.yaml"
    for spelling in ("mosaic-retinanet-r50-k4-manpp", "mosaic_retinanet_r50_k4_manpp", "mosaic-retinanet-r50-manpp-k4",
                     "MOSAIC_RETINANET_R50_MANPP_K4"):
        assert resolve_recipe(spelling) == p
    assert resolve_recipe("fm-r32-manpp-infopro") == packaged_recipes_dir() / "fm-r32-infopro-manpp.yaml"


def test_unknown_recipe_is_refused_with_a_suggestion(elsewhere):
    with pytest.raises(ConfigError, match="did you mean 'mosaic-retinanet-r50-k4-manpp'"):
        resolve_recipe("mosaic_retinanet_r50_manpp_k5")
    with pytest.raises(ConfigError, match="no config file or recipe named 'nothing-like-it'"):
        resolve_recipe("nothing-like-it")
    # a path that is not a file is not looked up by its stem
    with pytest.raises(ConfigError):
        resolve_recipe("some/dir/fm-r32-e2e.yaml")


def test_packaged_names_follow_the_scheme(elsewhere):
    """<data>-<model>[-k<K>]-<method>, hyphens, lower case; the K and method words say what the file trains."""
    infos = {i.name: i for i in all_recipe_info()}
    assert set(OLD_TO_NEW.values()) <= set(infos)
    for name, info in infos.items():
        assert info.error is None, (name, info.error)
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        if name == "quickstart":
            continue
        words = name.split("-")
        assert words[0] in DATA_WORDS, name
        method = info.method.split("+")  # "infopro+manpp" -> ["infopro", "manpp"]
        assert words[-len(method):] == method or words[-1] == method[-1] == "manpp", (name, info.method)
        ks = [w for w in words if re.fullmatch(r"k\d+", w)]
        if ks:
            assert int(ks[0][1:]) == info.K, (name, info.K)


def test_run_folders_are_distinct(elsewhere):
    import yaml

    out = {}
    for name, path in list_recipes().items():
        out_dir = (yaml.safe_load(path.read_text()) or {}).get("out_dir")
        if out_dir is not None:
            out.setdefault(out_dir, []).append(name)
    assert all(len(v) == 1 for v in out.values()), {k: v for k, v in out.items() if len(v) > 1}


def test_user_configs_folder_wins_and_explicit_paths_work(elsewhere, capsys):
    user = elsewhere / "configs"
    user.mkdir()
    (user / "fm-r32-e2e.yaml").write_text("method: e2e\nepochs: 1\n")
    (user / "my_own.yaml").write_text("method: dgl\nK: 3\nbatch_size: 8\n")
    assert resolve_recipe("fm-r32-e2e") == user / "fm-r32-e2e.yaml"
    assert resolve_recipe("my-own") == user / "my_own.yaml"  # _ and - are one spelling
    assert resolve_recipe("fm-r32-dgl") == packaged_recipes_dir() / "fm-r32-dgl.yaml"
    other = elsewhere / "x.yaml"
    other.write_text("method: e2e\n")
    assert resolve_recipe(str(other)) == other
    rows = {i.name: i for i in all_recipe_info()}
    assert rows["fm-r32-e2e"].source == "./configs" and rows["fm-r32-dgl"].source == PACKAGE_SOURCE
    assert cli.main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["my_own"])
    assert "dgl" in line and "3" in line.split() and "./configs" in line


def test_broken_user_recipe_is_a_row_not_a_crash(elsewhere, capsys):
    user = elsewhere / "configs"
    user.mkdir()
    (user / "broken.yaml").write_text("model: [unclosed\n")
    (user / "a-list.yaml").write_text("- 1\n- 2\n")
    (user / "latin1.yaml").write_bytes(b"model: r\xe9snet\n")
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("broken", "a-list", "latin1"):
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert "error:" in line, line
    assert "fm-r32-infopro-manpp" in out  # the packaged recipes are still listed


def test_recipe_info_reads_task_sections_generically(tmp_path):
    """task: may be a name or a mapping with a name (the dense config moving into TrainConfig)."""
    p = tmp_path / "r.yaml"
    p.write_text("task: {name: detection, data_format: coco, data_dir: d/coco}\nmodel: resnet50\nmethod: manpp\n"
                 "K: 4\niterations: 100\nbatch_size: 2\n")
    i = recipe_info("r", p)
    assert (i.task, i.model, i.method, i.K, i.budget, i.dataset, i.data_dir) == \
        ("detection", "resnet50", "manpp", 4, "100 it x 2", "coco", "d/coco")
    assert recipe_label(i) == ("greedy+manpp", 4)  # `manlearn list`: the base a dense run uses
    p.write_text("task: segmentation\nmethod: e2e\nK: 4\n")
    i = recipe_info("r", p)
    assert (i.task, i.method, i.K, i.budget) == ("segmentation", "e2e", 1, "default")
    p.write_text("method: manpp\nbase: dgl\nK: 8\nepochs: 3\nbatch_size: 64\ntrain_limit: 640\ndataset: svhn\n")
    i = recipe_info("r", p)
    assert (i.task, i.method, i.base, i.K, i.budget, i.dataset) == \
        ("classification", "manpp", "dgl", 8, "3 ep x 64 (first 640 images)", "svhn")
    assert recipe_label(i) == ("dgl+manpp", 8)
    p.write_text("")
    assert recipe_info("r", p).error is None
    # the config's defaults for what a recipe leaves out (was a blank method and K); every modifier names its base
    assert recipe_label(recipe_info("r", p)) == ("infopro+manpp", 16)
    p.write_text("method: hpff\nbase: dgl\n")
    assert recipe_label(recipe_info("r", p)) == ("dgl+hpff", 16)


def test_format_table_aligns_columns():
    text = format_table(("a", "long header"), [("xyz", 1), ("q", None)], indent="")
    lines = text.splitlines()
    assert lines == ["a    long header", "---  -----------", "xyz  1", "q"]


def test_list_prints_one_table_per_kind(elsewhere, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    titles = [ln for ln in out.splitlines() if ln and not ln.startswith(" ")]
    assert titles == ["models:", "methods:", "datasets:", "recipes:"]
    man = next(ln for ln in out.splitlines() if ln.split()[:1] == ["manpp"])
    assert "base=" in man and "infopro" in man
    e2e = next(ln for ln in out.splitlines() if ln.split()[:1] == ["e2e"])
    assert "base=" not in e2e and len(e2e.split()) > 1  # described
    q = next(ln for ln in out.splitlines() if ln.split()[:1] == ["quickstart"])
    assert "infopro+manpp" in q and "16" in q.split() and "1 ep x 128" in q and "fashion-mnist" in q
    d = next(ln for ln in out.splitlines() if ln.split()[:1] == ["mosaic-retinanet-r50-k4-manpp"])
    assert "detection" in d and "1500 it x 16" in d
    assert cli.main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "models:" and "recipes:" not in out and "vit_tiny" in out
    with pytest.raises(SystemExit):
        cli.main(["list", "nonsense"])
