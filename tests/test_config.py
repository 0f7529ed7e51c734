"""TrainConfig: defaults, key=value overrides, the task section, type and value checks, YAML files, every recipe."""

from __future__ import annotations

import pytest
import yaml

from manlearn.config import (DetectionTask, SegmentationTask, TrainConfig, apply_overrides, config_from_dict,
                             config_keys, config_to_dict, load_config, task_keys, validate)
from manlearn.errors import ConfigError
from manlearn.recipes import packaged_recipes_dir, resolve_recipe

CONFIGS = packaged_recipes_dir()  # src/manlearn/configs, shipped in the wheel
# Classification recipes; dense (detection / segmentation) recipes carry a `task:` section and are
# built and run by tests/test_dense_train.py.
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if "task" not in (yaml.safe_load(p.read_text()) or {}))

REQUIRED_RECIPES = {
    "cifar10-resnet32-k16-infopro-manpp", "cifar10-resnet32-k16-dgl-manpp", "cifar10-resnet32-e2e",
    "cifar10-resnet110-k55-infopro-manpp", "cifar10-resnet110-e2e",
    "svhn-resnet32-k16-infopro-manpp", "svhn-resnet32-e2e",
    "stl10-resnet32-k16-infopro-manpp", "stl10-resnet32-e2e",
    "fm-r32-e2e", "fm-r32-dgl-manpp", "fm-r32-infopro-manpp", "fm-r32-dgl", "fm-r32-infopro",
}


def test_defaults_are_the_main_job_and_valid():
    cfg = validate(TrainConfig())
    # stem_module unset: the learner decides (True, the MAN++ stem piece, except for ViTs and dense tasks)
    assert (cfg.model, cfg.method, cfg.base, cfg.K, cfg.stem_module) == ("resnet32", "manpp", "infopro", 16, None)
    assert cfg.dataset == "fashion-mnist"
    assert cfg.momentum == 0.995  # never the authors' CLI default of 1.0 (frozen EMA)
    # FM-R32 optimisation (SPEC §8)
    assert (cfg.batch_size, cfg.optimizer, cfg.lr, cfg.sgd_momentum, cfg.nesterov, cfg.weight_decay,
            cfg.schedule) == (128, "sgd", 0.1, 0.9, True, 1e-4, "cosine-iter")


def test_overrides_parse_to_the_field_type():
    cfg = apply_overrides(TrainConfig(), [
        "lr=0.2", "K=8", "nesterov=no", "stem_module=0", "channels_last=YES", "train_limit=100",
        "eval_limit=none", "data_dir=/x/y", "weight_decay=5e-4", "momentum=1", "max_steps=1_000",
    ])
    assert cfg.lr == 0.2 and isinstance(cfg.lr, float)
    assert cfg.K == 8 and isinstance(cfg.K, int)
    assert cfg.nesterov is False and cfg.stem_module is False and cfg.channels_last is True
    assert cfg.train_limit == 100 and cfg.eval_limit is None and cfg.data_dir == "/x/y"
    assert cfg.weight_decay == 5e-4 and cfg.momentum == 1.0 and isinstance(cfg.momentum, float)
    assert cfg.max_steps == 1000
    # the input object is not modified
    assert TrainConfig().lr == 0.1


def test_split_override_accepts_names_and_yaml_lists():
    assert apply_overrides(TrainConfig(), ["split=uniform"]).split == "uniform"
    pairs = apply_overrides(TrainConfig(), ["split=[[1,0],[2,3],[3,4]]"]).split
    assert pairs == [(1, 0), (2, 3), (3, 4)]
    counts = apply_overrides(TrainConfig(), ["split=[3, 8, 15]"]).split
    assert counts == [3, 8, 15]


@pytest.mark.parametrize("item, key, expected", [
    ("K=1.5", "K", "int"),
    ("lr=abc", "lr", "float"),
    ("nesterov=maybe", "nesterov", "bool"),
    ("epochs=true", "epochs", "int"),
    ("train_limit=lots", "train_limit", "int or none"),
])
def test_wrong_type_names_key_type_and_value(item, key, expected):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [item])
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg and repr(item.split("=", 1)[1]) in msg


def test_unknown_key_suggests_closest_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["lrr=0.1"])
    msg = str(e.value)
    assert "'lrr'" in msg and "did you mean 'lr'" in msg
    for key in config_keys():
        assert key in msg


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(TrainConfig(), ["lr"])


@pytest.mark.parametrize("item, needle", [
    ("method=bogus", "method"),
    ("model=resnet7", "model"),
    ("dataset=imagenet-22k", "dataset"),
    ("base=gredy", "did you mean 'greedy'"),
    ("K=0", "K must be >= 1"),
    ("lr=0", "lr must be > 0"),
    ("lr=-1", "lr must be > 0"),
    ("momentum=1.5", "momentum"),
    ("momentum=-0.1", "momentum"),
    ("sgd_momentum=1.0", "sgd_momentum"),
    ("weight_decay=-1e-4", "weight_decay"),
    ("optimizer=adam", "did you mean 'adamw'"),
    ("schedule=step", "schedule"),
    ("amp=fp8", "amp"),
    ("device=gpu", "device"),
    ("init=zeros", "init"),
    ("lambda_schedule=cosine", "lambda_schedule"),
    ("epochs=0", "epochs"),
    ("batch_size=0", "batch_size"),
    ("train_limit=0", "train_limit"),
    ("max_steps=-1", "max_steps"),
    ("out_dir=", "out_dir"),
])
def test_invalid_values_are_refused(item, needle):
    with pytest.raises(ConfigError, match="invalid config") as e:
        apply_overrides(TrainConfig(), [item])
    assert needle in str(e.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="nesterov"):
        apply_overrides(TrainConfig(), ["sgd_momentum=0"])
    assert apply_overrides(TrainConfig(), ["sgd_momentum=0", "nesterov=false"]).sgd_momentum == 0
    with pytest.raises(ConfigError, match="warmup_epochs"):
        apply_overrides(TrainConfig(), ["schedule=cosine-warmup", "warmup_epochs=10", "epochs=10"])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["K=0", "lr=0"])
    assert "K must be" in str(e.value) and "lr must be" in str(e.value)


def test_yaml_loading(tmp_path):
    p = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-4 (no dot) as a string: it must still become a float.
    p.write_text("lr: 0.05\nweight_decay: 1e-4\nK: 8\nnesterov: no\nsplit: [[1, 0], [3, 4]]\n")
    cfg = load_config(p, check=False)
    assert cfg.lr == 0.05 and cfg.weight_decay == 1e-4 and cfg.K == 8 and cfg.nesterov is False
    assert cfg.split == [(1, 0), (3, 4)]
    # everything not in the file keeps its default
    assert cfg.model == TrainConfig().model


def test_yaml_empty_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == TrainConfig()


@pytest.mark.parametrize("text, needle", [
    ("lrr: 0.1\n", "did you mean 'lr'"),
    ("K: eight\n", "expects int"),
    ("- lr\n- K\n", "mapping"),
    ("lr: [0.1\n", "not valid YAML"),
    ("method: nope\n", "method"),
])
def test_yaml_errors(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/recipe.yaml")


def test_dict_round_trip():
    cfg = apply_overrides(TrainConfig(), ["split=[[1,0],[3,4]]", "K=3", "lr=0.3"], check=False)
    assert config_from_dict(config_to_dict(cfg), check=False) == cfg
    assert cfg.model_dump() == config_to_dict(cfg)


def test_required_recipes_exist():
    assert REQUIRED_RECIPES <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_validates_and_builds(path):
    """A recipe must load, pass validation, and describe a learner that can really be built."""
    from manlearn.data import get_dataset_info
    from manlearn.train import build_learner

    cfg = load_config(path)
    # one run folder per recipe, named after it (its current or its former name): no clobbering
    assert cfg.out_dir.startswith("runs/") and resolve_recipe(cfg.out_dir[5:]) == path
    learner = build_learner(cfg, get_dataset_info(cfg.dataset))
    assert learner.K == (1 if cfg.method == "e2e" else cfg.K)


def test_recipes_follow_the_papers():
    fm = load_config(CONFIGS / "fm-r32-infopro-manpp.yaml")
    assert (fm.dataset, fm.model, fm.method, fm.base, fm.K, fm.stem_module, fm.batch_size, fm.lr,
            fm.schedule, fm.momentum) == ("fashion-mnist", "resnet32", "manpp", "infopro", 16, True, 128,
                                           0.1, "cosine-iter", 0.995)
    c = load_config(CONFIGS / "cifar10-resnet32-k16-infopro-manpp.yaml")
    assert (c.epochs, c.batch_size, c.lr, c.schedule, c.warmup_epochs, c.warmup_lr, c.nesterov,
            c.weight_decay) == (400, 1024, 0.8, "cosine-warmup", 10, 0.01, True, 1e-4)
    s = load_config(CONFIGS / "stl10-resnet32-k16-infopro-manpp.yaml")
    assert (s.batch_size, s.lr) == (128, 0.1)
    assert load_config(CONFIGS / "cifar10-resnet110-k55-infopro-manpp.yaml").K == 55
    assert load_config(CONFIGS / "fm-r32-dgl-manpp.yaml").base == "dgl"


def test_bases_come_from_the_library():
    """man/manpp accept every base rule the library does (not a list of config.py's own)."""
    from manlearn.rules import list_base_rules

    for base in list_base_rules():
        assert apply_overrides(TrainConfig(), [f"base={base}"]).base == base
    assert {"greedy", "infopro-contrast"} <= set(list_base_rules())


def test_length_iterations_win_over_epochs():
    from manlearn.train import lr_at, total_epochs, total_steps

    cfg = TrainConfig(epochs=3)
    assert total_steps(cfg, 10) == 30 and total_epochs(cfg, 10) == 3
    cfg = TrainConfig(epochs=3, iterations=25)  # iterations > 0 wins
    assert total_steps(cfg, 10) == 25 and total_epochs(cfg, 10) == 3
    assert lr_at(cfg, 25, 10) == pytest.approx(0.0, abs=1e-12)  # cosine-iter spans the 25 steps


# ---------------------------------------------------------------------------- the task section


def test_classification_is_the_default_task():
    cfg = TrainConfig()
    assert cfg.task.name == "classification"
    assert "task" in config_keys() and "fpn_channels" not in config_keys()
    assert "task.fpn_channels" in task_keys("detection") and "task.aspp_channels" in task_keys("segmentation")
    assert "task.fpn_channels" not in task_keys("segmentation")
    # from Python, a task name or mapping is turned into its section
    assert TrainConfig(task="detection").task == DetectionTask()
    assert TrainConfig(task={"name": "segmentation", "aspp_channels": 8}).task == SegmentationTask(aspp_channels=8)


DET = ["model=resnet50", "K=4", "data_dir=data/mosaic"]


def test_task_section_from_yaml_and_overrides(tmp_path):
    p = tmp_path / "det.yaml"
    p.write_text("task:\n  name: detection\n  fpn_channels: 64\n  min_size: 128\n  max_size: 128\n"
                 "model: resnet50\nK: 4\ndata_dir: data/mosaic\n")
    cfg = load_config(p)
    assert isinstance(cfg.task, DetectionTask) and cfg.task.fpn_channels == 64 and cfg.task.min_size == 128
    assert cfg.task.head_convs == 4  # the section's defaults fill the rest
    cfg2 = apply_overrides(cfg, ["task.fpn_channels=128", "task.hflip=no", "task.model_widths=[8,8,8,8]"])
    assert (cfg2.task.fpn_channels, cfg2.task.hflip, cfg2.task.model_widths) == (128, False, [8, 8, 8, 8])
    assert cfg.task.fpn_channels == 64  # the input is not modified
    # task.name switches the section (to that task's defaults), applied before the other task keys
    seg = apply_overrides(cfg, ["task.aspp_channels=32", "task.name=segmentation"])
    assert isinstance(seg.task, SegmentationTask) and seg.task.aspp_channels == 32
    assert seg.task.data_format == "mask-folder"
    assert apply_overrides(TrainConfig(), ["task=detection", *DET]).task == DetectionTask()
    # round trip through the checkpoint form (a nested dict)
    assert config_to_dict(cfg2)["task"]["fpn_channels"] == 128
    assert config_from_dict(config_to_dict(cfg2)) == cfg2


@pytest.mark.parametrize("items, needle", [
    (["task.name=detection", *DET, "task.fpn_channel=3"], "unknown config key 'task.fpn_channel'"),
    (["task.name=detection", *DET, "task.fpn_channel=3"], "did you mean 'task.fpn_channels'"),
    (["fpn_channels=3"], "did you mean 'task.fpn_channels'"),
    (["task.fpn_channels=3"], "unknown config key 'task.fpn_channels'"),  # not a classification key
    (["task.name=detecton"], "did you mean 'detection'"),
    (["task.name=detection", *DET, "task.fpn_channels=wide"], "config key 'task.fpn_channels' (command line) "
                                                              "expects int, got 'wide'"),
    (["task.name=segmentation", *DET, "task.seg_scale=[2, 1]"], "task.seg_scale must be [low, high]"),
    (["task.name=detection", *DET, "model=resnet32"], "model='resnet32'"),
    (["task.name=detection", *DET, "K=7"], "K must be in 1..4"),
    (["task.name=detection", *DET, "method=dgll"], "method='dgll'"),
    (["task.name=detection", "model=resnet50", "K=4"], "needs data_dir"),
    (["task.name=segmentation", *DET, "task.data_format=coco"], "task.data_format='coco'"),
    (["task.name=detection", *DET, "pipeline_workers=2"], "pipeline_workers is for classification"),
    # recorded in config.yaml but not applied (the run was cut between stages, at its own sizes): refused
    (["task.name=detection", *DET, "split=uniform"], "split=uniform does not apply to a detection run: "
                                                     "its blocks are cut between stages; choose the stages with "
                                                     "task.stage_cuts"),
    (["task.name=segmentation", *DET, "stem_module=true"], "stem_module does not apply to a segmentation run"),
    (["task.name=detection", *DET, "image_size=16"], "image_size does not apply to a detection run: "
                                                     "task.min_size / task.max_size resize its images"),
    (["task.name=segmentation", *DET, "image_size=16"], "task.seg_size resizes its images"),
    (["schedule=step-warmup", "lr_steps=[500, 100]"], "lr_steps must be strictly increasing"),
    (["eval_every=3"], "unknown config key 'eval_every' in command line (did you mean 'eval_every_"),
])
def test_task_section_errors(items, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), items)
    assert needle in str(e.value)


def test_a_rule_that_cannot_train_the_task_is_refused_when_the_learner_is_built():
    """Every registered rule is a valid name for a dense run; one whose heads classify whole images
    refuses the detection task itself, with the reason."""
    from manlearn.train import build_learner

    cfg = apply_overrides(TrainConfig(), ["task.name=detection", *DET, "method=dgl", "task.model_widths=[8,8,8,8]",
                                          "task.stem_width=8", "task.fpn_channels=8"])
    with pytest.raises(ConfigError, match="per-image class labels"):
        build_learner(cfg, type("Info", (), {"num_classes": 3})())


def test_keys_of_earlier_versions_are_unknown_keys_with_a_hint():
    """0.x keeps no aliases: a key of an earlier version is an unknown key, with did-you-mean."""
    with pytest.raises(ConfigError, match=r"unknown config key 'ckpt_every' in command line \(did you mean 'ckpt_every_steps'"):
        apply_overrides(TrainConfig(), ["ckpt_every=7"])
    with pytest.raises(ConfigError, match="unknown config key 'test_limit'"):
        apply_overrides(TrainConfig(), ["test_limit=3"])


def test_task_section_errors_in_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: {name: detection, fpn_channel: 64}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'task.fpn_channel' in .*r\.yaml "
                                          r"\(did you mean 'task.fpn_channels'"):
        load_config(p)
    p.write_text("task: [detection]\n")
    with pytest.raises(ConfigError, match="task section"):
        load_config(p)


@pytest.mark.parametrize("key,owner,name", [
    ("lambda_schedule", "manlearn.rules.infopro", "LAMBDA_SCHEDULES"),
    ("infopro_heads", "manlearn.rules.infopro", "INFOPRO_HEADS"),
    ("init", "manlearn.rules.momentum", "INITS"),
    ("fidelity", "manlearn.rules.momentum", "FIDELITIES"),
])
def test_a_rules_choices_are_written_once_beside_the_rule(key, owner, name):
    """Config keeps no copy of a rule's choice list: it validates by asking the rule's module."""
    import importlib

    import manlearn.config as config

    assert not hasattr(config, name)
    choices = getattr(importlib.import_module(owner), name)
    for good in choices:
        apply_overrides(TrainConfig(), [f"{key}={good}"])
    with pytest.raises(ConfigError, match=f"{key}='bogus'.*{choices[-1]}"):
        apply_overrides(TrainConfig(), [f"{key}=bogus"])


def test_fidelity_and_authors_init_reach_the_learner():
    """`fidelity=authors` in a config builds the authors' computation (their stem head: 1c2f SupCon)."""
    from manlearn.train import build_learner

    info = type("Info", (), {"num_classes": 10, "in_channels": 3, "image_size": 32, "mean": (0.5,) * 3,
                             "std": (0.5,) * 3})()
    plain = build_learner(apply_overrides(TrainConfig(), ["K=16"]), info)
    authors = build_learner(apply_overrides(TrainConfig(), ["K=16", "fidelity=authors"]), info)
    assert plain.auxes[0].heads.contrast is False and authors.auxes[0].heads.contrast is True
    with pytest.raises(ConfigError, match="fidelity"):
        apply_overrides(TrainConfig(), ["fidelity=paper"])


def test_rule_options_from_the_command_line_reach_the_rule():
    from manlearn.train import build_learner

    cfg = apply_overrides(TrainConfig(), ["method=auglocal", "K=4", "rule_options={depth: 3}"])
    assert cfg.rule_options == {"depth": 3}
    info = type("Info", (), {"num_classes": 10, "in_channels": 3, "image_size": 32, "mean": (0.5,) * 3,
                             "std": (0.5,) * 3})()
    assert build_learner(cfg, info).rule.depth == 3
    with pytest.raises(ConfigError, match="takes no option 'dept'"):
        build_learner(apply_overrides(TrainConfig(), ["method=auglocal", "K=4", "rule_options={dept: 3}"]), info)
    with pytest.raises(ConfigError, match="rule_options.*mapping"):
        apply_overrides(TrainConfig(), ["rule_options=[1, 2]"])
    # a config key's option given in rule_options: it overrode the config key silently (momentum) or made
    # the base's options fail ("takes no option 'heads'"); one line naming the config key instead
    for items, key in ((["momentum=0.5", "rule_options={momentum: 0.9}"], "momentum"),
                       (["rule_options={base: dgl}"], "base"), (["rule_options={heads: cifar}"], "infopro_heads")):
        with pytest.raises(ConfigError, match=rf"^rule_options sets '\w+', which the config key '{key}' sets: "
                                              rf"give {key}=\.\.\. instead"):
            build_learner(apply_overrides(TrainConfig(), ["method=manpp", "K=4", *items]), info)


@pytest.mark.parametrize("text,value", [("unit", "unit"), ("sqrt", "sqrt"), ("stage", "stage"), ("true", True),
                                        ("off", False), ("false", False)])
def test_grad_checkpoint_takes_a_granularity_or_a_bool(text, value):
    from manlearn.config import TrainConfig, apply_overrides, validate

    assert validate(apply_overrides(TrainConfig(), [f"grad_checkpoint={text}"])).grad_checkpoint == value


def test_unknown_checkpoint_granularity_is_refused_by_the_config():
    from manlearn.config import TrainConfig, apply_overrides, validate

    with pytest.raises(ConfigError, match="grad_checkpoint must be off, true or a granularity"):
        validate(apply_overrides(TrainConfig(), ["grad_checkpoint=layer"]))
