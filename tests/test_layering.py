"""The packages import one way (train -> reparam -> models) and no module imports itself through others.

Every ``import`` is counted, at module level or inside a function, and importing ``a.b`` also runs ``a``'s
``__init__``, so an import of another package counts as an import of its ``__init__`` too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from _shared import ROOT

#: Lowest first: a package may import only itself and the packages before it.
LAYERS = ("models", "reparam", "train")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """``{module: modules of ``packages`` it imports}`` for every ``.py`` file of ``packages`` under ``root``."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c also runs a and a.b
                    candidate = ".".join(parts[:i])
                    if candidate in files and candidate != name and not name.startswith(candidate + "."):
                        edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]], layers: tuple[str, ...]) -> list[str]:
    rank = {pkg: i for i, pkg in enumerate(layers)}
    return [f"{a} imports {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
            if rank[b.split(".")[0]] > rank[a.split(".")[0]]]


def test_packages_import_downwards_only():
    graph = import_graph(ROOT, LAYERS)
    assert len(graph) > 20 and graph["reparam.fusion"] >= {"models.layers"}  # the graph is really read
    assert layer_violations(graph, LAYERS) == []


def test_no_module_imports_itself_through_others():
    assert find_cycle(import_graph(ROOT, LAYERS)) is None


def defines_main(path: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


def test_only_the_commands_import_the_option_parser():
    """train.cli parses argv; what the options build (data, run directory, teacher, losses) is train.assemble's, so
    the pipeline and everything under it never see argparse."""
    graph = import_graph(ROOT, LAYERS)
    importers = sorted(m for m, targets in graph.items() if "train.cli" in targets)
    assert "train.stage1" in importers and "train.evaluate" in importers  # the graph is really read
    path = {m: ROOT.joinpath(*m.split(".")).with_suffix(".py") for m in importers}
    path = {m: p if p.exists() else p.with_suffix("") / "__init__.py" for m, p in path.items()}
    assert [m for m in importers if not defines_main(path[m])] == []
    assert "train.cli" not in graph["train.pipeline"] and "argparse" not in (ROOT / "train/assemble.py").read_text()


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The old layout: models.layers imported reparam.transforms while reparam's __init__ imported its fusion,
    which imported models inside a function."""
    (tmp_path / "models").mkdir()
    (tmp_path / "reparam").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("from .layers import ConvBN\n")
    (tmp_path / "models" / "layers.py").write_text("from reparam import transforms as T\nclass ConvBN: ...\n")
    (tmp_path / "reparam" / "__init__.py").write_text("from . import transforms\nfrom .fusion import fuse_model\n")
    (tmp_path / "reparam" / "transforms.py").write_text("def fold_bn(): ...\n")
    (tmp_path / "reparam" / "fusion.py").write_text("def fuse_model(m):\n    from models.layers import ConvBN\n")
    graph = import_graph(tmp_path, ("models", "reparam"))
    cycle = find_cycle(graph)
    assert cycle is not None and "models.layers" in cycle and "reparam" in cycle, cycle
    assert layer_violations(graph, ("models", "reparam")) == ["models.layers imports reparam",
                                                               "models.layers imports reparam.transforms"]


@pytest.mark.parametrize("source, expected", [
    ("from .. import stage1\n", {"train.stage1"}),
    ("from ..engine import hardware\n", {"train.engine"}),
    ("import models.layers\n", {"models", "models.layers"}),
    ("def f():\n    from reparam.fusion import fuse_model\n", {"reparam", "reparam.fusion"}),
])
def test_imports_are_resolved(tmp_path, source, expected):
    for pkg in ("models", "reparam", "train", "train/reproduce"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    for mod in ("models/layers", "reparam/fusion", "train/stage1", "train/engine"):
        (tmp_path / f"{mod}.py").write_text("")
    (tmp_path / "train" / "reproduce" / "specs.py").write_text(source)
    graph = import_graph(tmp_path, ("models", "reparam", "train"))
    # a module of train.reproduce imports train.reproduce's parents implicitly, which are not edges
    assert graph["train.reproduce.specs"] == expected


#: A model's identity: written only by models.identity.set_card (a model class declares its own arguments).
IDENTITY_VIEWS = ("card", "config", "preprocess", "num_classes", "checkpoint_metadata")


def identity_writes(root: Path, packages: tuple[str, ...]) -> list[str]:
    """``file:line attribute`` of every assignment to a model's identity attribute outside models/identity.py,
    except ``self.config`` / ``self.num_classes`` in a class's ``__init__`` (the model declaring its arguments)."""
    out = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if path.relative_to(root).as_posix() == "models/identity.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            own = {id(t) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                   for n in ast.walk(f) if isinstance(n, (ast.Assign, ast.AnnAssign)) for t in
                   (n.targets if isinstance(n, ast.Assign) else [n.target])
                   if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                   and t.attr in ("config", "num_classes")}
            for node in ast.walk(tree):
                targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                           if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                        and node.args[1].value in IDENTITY_VIEWS:
                    out.append(f"{path.relative_to(root)}:{node.lineno} setattr {node.args[1].value}")
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr in IDENTITY_VIEWS and id(t) not in own:
                        out.append(f"{path.relative_to(root)}:{t.lineno} .{t.attr}")
    return out


def test_a_models_identity_is_written_in_one_place():
    assert identity_writes(ROOT, LAYERS) == []


def test_the_identity_check_catches_a_write(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.py").write_text(
        "class M:\n    def __init__(self):\n        self.config = {}\n\n"
        "def f(model, student):\n    model.preprocess = None\n    setattr(student, 'config', {})\n")
    assert identity_writes(tmp_path, ("models",)) == ["models/x.py:6 .preprocess", "models/x.py:7 setattr config"]
