"""The wheel works outside the checkout: built, installed into a fresh venv, run from an unrelated folder.

Catches what the source-tree tests cannot: a module or a recipe missing from the wheel (package data),
a path computed relative to the checkout, a console script that does not start.  The fresh venv reuses
the dependencies of the running environment through a ``.pth`` line (torch is not installed twice) but
gets manlearn only from the wheel; every command runs with a clean environment (no ``PYTHONPATH``) and
the test checks that the imported ``manlearn`` is the installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FM_FILE = "train-images-idx3-ubyte.gz"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _dependency_paths() -> list[str]:
    """Where the running interpreter finds torch & co: its ``sys.path`` (site folders and whatever their
    ``.pth`` files added) without the standard library, the checkout's own folder and src/, or any other source tree of manlearn (the
    project's .venv may live inside the checkout: its site-packages stay)."""
    import sysconfig

    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sys.path:
        real = os.path.realpath(p) if p else ""
        if not p or not os.path.isdir(p) or real == stdlib or real.startswith(stdlib + os.sep) \
                or real == os.path.realpath(ROOT) or Path(real).is_relative_to(ROOT / "src"):
            continue
        if os.path.isfile(os.path.join(p, "manlearn", "__init__.py")) and not p.endswith("-packages"):
            continue  # another checkout's src/ (an editable install): the wheel must not compete with it
        out.append(p)
    return list(dict.fromkeys(out))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the checkout, install it (no deps) into a fresh venv."""
    tmp = tmp_path_factory.mktemp("packaging")
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install -e '.[test]')")
    tree = tmp / "tree"  # a copy, so that the build leaves no build/ or egg-info in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(tree)], cwd=tmp, timeout=180)
    wheels = list(dist.glob("manlearn-*.whl"))
    assert len(wheels) == 1, wheels

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    # Installed before the dependency path is added, so pip sees a venv without any manlearn in it.
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          str(wheels[0])], cwd=tmp, timeout=180)
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    (purelib / "_manlearn_test_deps.pth").write_text("\n".join(_dependency_paths()) + "\n")

    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.defpath}", "HOME": str(tmp), "OMP_NUM_THREADS": "1",
           "LC_ALL": "C.UTF-8"}
    if os.environ.get("MANLEARN_DATA"):
        env["MANLEARN_DATA"] = os.environ["MANLEARN_DATA"]
    cwd = tmp / "elsewhere"  # no configs/ here, nothing of the checkout
    cwd.mkdir()
    return {"venv": venv, "py": py, "env": env, "cwd": cwd, "tmp": tmp, "wheel": wheels[0]}


def test_wheel_ships_the_recipes_and_runs_from_its_own_install(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    packaged = {Path(n).stem for n in names if n.startswith("manlearn/configs/") and n.endswith(".yaml")}
    in_tree = {p.stem for p in (ROOT / "src" / "manlearn" / "configs").glob("*.yaml")}
    assert packaged == in_tree and "quickstart" in packaged

    env, cwd, venv = installed["env"], installed["cwd"], installed["venv"]
    # one interpreter start for three questions: which manlearn, which recipes, and an old recipe name
    where = _run([str(installed["py"]), "-c", "import manlearn, manlearn.recipes as r; print(manlearn.__file__); "
                  "print(r.packaged_recipes_dir()); print(r.resolve_recipe('mosaic_retinanet_r50_manpp_k4'))"],
                 cwd=cwd, env=env)
    module, recipes_dir, old_name = where.split()
    assert Path(module).resolve().is_relative_to(venv.resolve()), f"imported {module}, not the installed copy"
    assert not Path(module).resolve().is_relative_to(ROOT)
    assert Path(recipes_dir).resolve().is_relative_to(venv.resolve())
    assert Path(old_name) == Path(recipes_dir) / "mosaic-retinanet-r50-k4-manpp.yaml"

    out = _run([str(venv / "bin" / "manlearn"), "list"], cwd=cwd, env=env)
    for name in ("quickstart", "fm-r32-infopro-manpp", "mosaic-retinanet-r50-k4-manpp", "imagenet-vit-tiny-k4-manpp"):
        assert name in out


def _fashion_mnist_found() -> bool:
    roots = [os.environ.get("MANLEARN_DATA")] if os.environ.get("MANLEARN_DATA") else []
    dirs = [d for r in roots for d in (os.path.join(r, "fashion-mnist"), r)] + ["/usr/share/datasets/fashion-mnist"]
    return any(os.path.isfile(os.path.join(d, FM_FILE)) for d in dirs)


def test_quickstart_trains_and_evaluates_from_the_wheel(installed):
    if not _fashion_mnist_found():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist or set $MANLEARN_DATA)")
    env, cwd, manlearn = installed["env"], installed["cwd"], str(installed["venv"] / "bin" / "manlearn")
    out_dir = installed["tmp"] / "quickstart"
    out = _run([manlearn, "train", "quickstart", "max_steps=2", "train_limit=256", "eval_limit=64",
                f"out_dir={out_dir}", "progress=false"], cwd=cwd, env=env, timeout=300)
    assert "test accuracy:" in out and "steps: 2" in out
    assert (out_dir / "last.pt").is_file()
    out = _run([manlearn, "eval", str(out_dir / "last.pt"), "eval_limit=64"], cwd=cwd, env=env)
    assert out.startswith("test accuracy:") and "step 2" in out
