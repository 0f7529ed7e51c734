"""A user's own rule, written outside manlearn, plugs in as method= and as base= (README example)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import manlearn
from manlearn import ConfigError
from manlearn.plugins import import_user_code
from manlearn.rules import base as rules_base

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_user_rule() -> str:
    text = README.read_text()
    m = re.search(r"<!-- the test suite runs this block \(tests/test_user_code.py\) -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its tested user-rule example"
    return m.group(1)


@pytest.fixture
def clean_registry():
    saved = dict(rules_base._RULES)
    yield
    rules_base._RULES.clear()
    rules_base._RULES.update(saved)


def test_readme_user_rule_runs_as_method_and_as_base(clean_registry, capsys):
    code = readme_user_rule()
    assert len(code.strip().splitlines()) <= 26
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "probe-l2" in manlearn.list_rules() and "probe-l2" in manlearn.list_base_rules()
    printed = capsys.readouterr().out
    assert printed.count("[") == 2  # both loss lists printed
    mine = manlearn.LocalLearner("resnet20", method="probe-l2", K=4, **{"weight": 0.5})
    assert all(aux.weight == 0.5 for aux in mine.auxes)
    ours = manlearn.LocalLearner("resnet20", method="manpp", base="probe-l2", K=4)
    assert ours.base == "probe-l2" and type(ours.auxes[0].heads).__name__ == "ProbeL2"
    with pytest.raises(ConfigError, match="takes no option 'wieght'"):
        manlearn.LocalLearner("resnet20", method="probe-l2", K=4, **{"wieght": 0.5})


def test_import_user_code_from_a_file(tmp_path, clean_registry):
    f = tmp_path / "my_rule.py"
    f.write_text(readme_user_rule().split("x, y =")[0])
    import_user_code([str(f)])
    assert "probe-l2" in manlearn.list_rules()
    with pytest.raises(ConfigError, match="no such file"):
        import_user_code([str(tmp_path / "missing.py")])
    with pytest.raises(ConfigError, match="no module named 'no_such_module_xyz'"):
        import_user_code(["no_such_module_xyz"])


def test_register_rule_refuses_what_is_not_a_rule():
    with pytest.raises(ConfigError, match="subclass of manlearn.Rule"):
        manlearn.register_rule(object)

    class Nameless(manlearn.Rule):
        def build_aux(self, ctx, h_shape=None):
            return torch.nn.Identity()

    with pytest.raises(ConfigError, match="needs a class attribute `name`"):
        manlearn.register_rule(Nameless)


def test_cli_trains_a_user_rule_imported_from_a_file(tmp_path, clean_registry, capsys):
    """`manlearn --import my_rule.py train method=probe-l2`: the rule trains, the run records the import,
    and `manlearn eval` of its checkpoint (a fresh registry) imports it again."""
    from manlearn import cli

    f = tmp_path / "my_rule.py"
    f.write_text(readme_user_rule().split("x, y =")[0])
    out = tmp_path / "run"
    rc = cli.main(["--import", str(f), "train", "dataset=digits", "model=resnet20", "method=manpp", "base=probe-l2",
                   "K=3", "epochs=1", "max_steps=2", "batch_size=32", "eval_limit=64", "progress=false",
                   "device=cpu", f"out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["config"]["imports"] == [str(f)] and ckpt["config"]["base"] == "probe-l2"
    rules_base._RULES.pop("probe-l2")  # as in a fresh process: neither the rule nor its module is loaded
    for name in [m for m in sys.modules if m.startswith("manlearn_user_my_rule")]:
        del sys.modules[name]
    assert cli.main(["eval", str(out / "last.pt"), "eval_limit=32"]) == 0
    assert cli.main(["train", "dataset=digits", "method=no-such-rule", f"out_dir={tmp_path / 'x'}"]) == 2


def test_a_registration_under_a_built_in_name_is_refused_unless_asked(tmp_path):
    import torch
    from torch import nn

    import manlearn
    from manlearn.errors import ConfigError
    from manlearn.rules import get_rule_class

    builtin = get_rule_class("manpp")

    class Mine(manlearn.Rule):
        name = "manpp"

        def build_aux(self, ctx, h_shape=None):
            return nn.Identity()

    with pytest.raises(ConfigError, match="'manpp' is built into manlearn .*override=True"):
        manlearn.register_rule(Mine)
    assert get_rule_class("manpp") is builtin

    def resnet20(**kw):
        return manlearn.create_model("resnet32", **kw)

    with pytest.raises(ConfigError, match="model 'resnet20' is built into manlearn"):
        manlearn.register_model(resnet20)
    try:
        manlearn.register_rule(override=True)(Mine)
        assert get_rule_class("manpp") is Mine
    finally:
        manlearn.register_rule(builtin)  # (the built-in's own module: accepted back)
    assert get_rule_class("manpp") is builtin


def test_a_run_records_where_its_names_came_from(tmp_path):
    from manlearn.config import TrainConfig
    from manlearn.train import Trainer, load_checkpoint

    cfg = TrainConfig(dataset="digits", model="resnet20", method="dgl", K=3, train_limit=64, eval_limit=32,
                      batch_size=32, max_steps=1, device="cpu", progress=False, out_dir=str(tmp_path))
    Trainer.from_config(cfg).fit()
    sources = load_checkpoint(tmp_path / "last.pt")["sources"]
    assert sources == {"method": "manlearn.rules.greedy", "task": "manlearn.tasks.classification",
                       "model": "manlearn.models.resnet_cifar"}
