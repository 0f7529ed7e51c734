"""The package's import graph: no circles, and every import points down the layers of the README's
Architecture section (cli -> train -> learner -> rules / tasks -> models; leaves below).

Imports inside functions count too: a circle hidden in a function is still a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "manlearn"

#: Higher layers may import lower ones only. Components on one line (same rank) may not import each other.
LAYERS = [
    ["__main__"],
    ["cli"],
    ["bench", "listing"],
    ["train"],
    ["config"],  # typed config; checks names against the rule/model/data registries below it
    ["learner"],
    ["planning"],  # memory plans and the build-time check: runs the learner's parts, built by the learner
    ["rules", "tasks"],
    ["detection", "segmentation"],
    ["models", "split", "recompute", "memory", "distributed", "concurrency"],
    ["data", "plugins", "recipes"],
    ["runtime", "files"],  # files: writes that fail in one line and leave nothing torn
    ["errors"],
]
RANK = {c: r for r, comps in enumerate(LAYERS) for c in comps}


def component(path: Path) -> str:
    rel = path.relative_to(PKG)
    return "__init__" if rel.parts == ("__init__.py",) else rel.parts[0].removesuffix(".py")


def imported_components(path: Path) -> set[str]:
    """Components of manlearn imported anywhere in ``path`` (absolute or relative imports)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = path.relative_to(PKG).parts[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = base + (node.module.split(".") if node.module else [])
                if not mod:  # "from . import x" at the package root
                    out.update(a.name for a in node.names)
                    continue
                names = ["manlearn." + ".".join(mod)]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "manlearn" and len(parts) > 1:
                out.add(parts[1])
            elif parts[0] == "manlearn" and isinstance(node, ast.ImportFrom) and not node.level:
                out.update(a.name for a in node.names)  # from manlearn import x
    return out


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        comp = component(path)
        if comp == "__init__":
            continue  # the package root re-exports the public API
        targets = {t for t in imported_components(path) if t in RANK and t != comp}
        graph.setdefault(comp, set()).update(targets)
    return graph


def test_every_component_has_a_layer():
    comps = {component(p) for p in PKG.rglob("*.py")} - {"__init__"}
    assert comps <= set(RANK), f"add {sorted(comps - set(RANK))} to LAYERS"


def test_imports_point_down_the_layers():
    wrong = sorted(f"{a} -> {b}" for a, bs in edges().items() for b in bs if RANK[b] <= RANK[a])
    assert not wrong, "imports that go up or sideways: " + ", ".join(wrong)


def test_no_import_cycle_between_modules():
    """Module-level graph inside the package (finer than components): no cycle anywhere."""
    mods: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = set()
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        pkg_parts = path.relative_to(PKG).parts[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(pkg_parts[: len(pkg_parts) - node.level + 1]) + (node.module.split(".") if node.module else [])
                else:
                    if not (node.module or "").startswith("manlearn"):
                        continue
                    base = node.module.split(".")[1:]
                cands = [".".join(base + [a.name]) for a in node.names] + [".".join(base)]
            elif isinstance(node, ast.Import):
                cands = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("manlearn.")]
            else:
                continue
            for c in cands:
                if c in mods and c != name and c != "":
                    mods[name].add(c)
    # a package's __init__ importing its own submodules is not a cycle with them
    def is_parent(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a == ""
    graph = {a: {b for b in bs if not is_parent(a, b)} for a, bs in mods.items()}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if seen.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in seen:
                visit(m)
        stack.pop()
        seen[n] = 2

    for n in sorted(graph):
        if n not in seen:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(cycles[:10])
