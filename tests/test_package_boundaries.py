"""Package boundaries: no import-time cycles between the project's modules, and the report does not import the app.

The graph is read statically from module-level imports (imports inside functions run later, at call
time, and are how a registry loads its built-in entries on first use). Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those count as edges too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fqbench", "baselines")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules a module imports at import time (with the packages their import runs)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # A module's own packages are already being imported when it runs: importing a sibling through them is no
    # cycle. Any other package's __init__ runs (importing a.b.c runs a and a.b).
    own = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own:
                edges.add(prefix)
    return edges


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_no_import_time_cycles():
    edges = graph()
    found = cycles(edges)
    assert not found, "import-time cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_report_does_not_import_the_app():
    edges = graph()
    reachable, todo = set(), ["fqbench.report"]
    while todo:
        node = todo.pop()
        for nxt in edges.get(node, ()):
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert "fqbench.app" not in reachable and "fqbench.pipelines" not in reachable
