"""The package's shape: no import cycle anywhere, and the training core apart from the experiment tooling.

The import graph is read from the source (every ``import``, function-level ones included, relative ones
resolved), so an import hidden inside a function cannot close a cycle unnoticed.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parents[1] / "lightning_latent"
TOOLING = "lightning_latent.experiments"
# The one core module allowed to import the tooling: the command line adds the run's TensorBoard HParams
# callback and, in a sweep trial, the Optuna pruning callback.
CORE_USING_TOOLING = {"lightning_latent.cli"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from pkg import submodule`` resolves to the submodule)."""
    files = {_module_name(p): p for p in PKG_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for t in targets:
                while t and t not in files:  # `import lightning_latent.x.y` names x.y; a symbol's module
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("lightning_latent"):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    """The check can fail: a hand-made graph with a cycle through a function-level import."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    g = import_graph()
    assert "lightning_latent.rl.loss" in g["lightning_latent.rl.update"]  # from .loss import ...
    assert "lightning_latent.module" in g["lightning_latent.experiments.sweep.space"]  # inside a method
    assert "lightning_latent.quiet" in g["lightning_latent.cli"]  # from . import quiet


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_core_does_not_import_the_experiment_tooling():
    g = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith(TOOLING)) for m, ts in g.items()
                 if not m.startswith(TOOLING) and m not in CORE_USING_TOOLING}
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def test_every_package_folder_is_a_regular_package():
    """``setup.cfg``'s ``packages = find:`` installs only folders holding an ``__init__.py``: a plain
    (non-editable) install would silently lose a folder without one."""
    missing = [str(d.relative_to(PKG_DIR)) for d in PKG_DIR.rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []
