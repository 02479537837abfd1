"""The packages import one way, bottom to top, and no module imports itself back through others.

Layers (docs/architecture.md): trainers (1) <- callbacks (2) <- the run layer of orchestrator and
infra (3) <- sweeps (4) <- the user-facing modules of orchestrator (5). Every import counts, also
one inside a function.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainers", "callbacks", "orchestrator", "infra", "sweeps")
USER_FACING = {"orchestrator", "orchestrator.__main__", "orchestrator.cli", "orchestrator.commands",
               "orchestrator.model"}
LAYER = {"trainers": 1, "callbacks": 2, "orchestrator": 3, "infra": 3, "sweeps": 4}
# Each keeps importing a submodule from loading torch (start-up time): `import trainers.utils`, and
# the callback actor's unpickling of `orchestrator.results` (the package's `Model`).
LAZY_GETATTR_OK = {"trainers", "orchestrator"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    if module in USER_FACING:
        return 5
    return LAYER.get(module.split(".")[0])


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (the most specific name:
    ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}
            found.update(subs & known or {base})
    return {name for name in found if name in known and name != module}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_only_user_facing_modules_import_sweeps():
    outside = [f"{a} imports {b}" for a, targets in graph().items() for b in targets
               if b.split(".")[0] == "sweeps" and a.split(".")[0] != "sweeps" and a not in USER_FACING]
    assert outside == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_module_level_getattr_dodges_an_import():
    found = [name for name, path in project_modules().items() if name not in LAZY_GETATTR_OK
             and any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(path.read_text()).body)]
    assert found == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    edges = {"trainers.a": {"callbacks.b"}, "callbacks.b": {"trainers.a"}}
    assert cycles(edges) == [["callbacks.b", "trainers.a"]]
    assert layer("trainers.a") < layer("callbacks.b") < layer("orchestrator.run_setup") < layer("sweeps.x") \
        < layer("orchestrator.model")
