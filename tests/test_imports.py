"""The import graph of `vlm_rl`: no cycles, and no import hidden in a function to dodge one.

Read from the source with `ast`, nothing imported. The rule (also in docs/models.md, "Adding a family"):

- Every `vlm_rl` import counts, at module level or inside a function, except those under
  `if TYPE_CHECKING:` (they never run). Importing `a.b.c` from outside package `a.b` also runs
  `a/b/__init__.py`, so it counts as importing that package too.
- The graph of those imports has no cycle.
- An import inside a function is allowed only to keep start-up fast (`vlm-rl --help` should not load torch),
  and says so with a comment containing "lazy" on the line of the import or the line above it. It still
  counts in the graph, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import vlm_rl

ROOT = Path(vlm_rl.__file__).resolve().parent


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    in_function: bool
    lazy: bool


def modules(root: Path = ROOT, package: str = "vlm_rl") -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their `__init__.py`)."""
    found = {package: root / "__init__.py"}
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path / "__init__.py").exists():
            found.update(modules(path, f"{package}.{path.name}"))
        elif path.suffix == ".py" and path.name != "__init__.py":
            found[f"{package}.{path.stem}"] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules an import statement names (for `from x import y`: `x`, and `x.y` should `y` be a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """The `vlm_rl` imports one module makes, each with where it is and whether it is marked lazy."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[Import] = []

    def marked_lazy(line: int) -> bool:
        _, _, comment = lines[line - 1].partition("#")
        return "lazy" in comment.lower()

    def visit(node: ast.AST, in_function: bool) -> None:
        lazy = False  # a run of import statements shares the mark of its first one
        previous: ast.AST | None = None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for branch in child.orelse:
                    visit(branch, in_function)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                follows_import = isinstance(previous, ast.Import | ast.ImportFrom)
                lazy = (follows_import and lazy) or marked_lazy(child.lineno) or marked_lazy(child.lineno - 1)
                for target in _imported_names(child, module, path.name == "__init__.py"):
                    if target in known:
                        found.append(Import(module, target, child.lineno, in_function, lazy))
            else:
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))
            previous = child

    visit(ast.parse(source), False)
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(found: dict[str, Path] | None = None) -> dict[str, dict[str, Import]]:
    """importer -> {module it causes to run -> the import statement responsible}."""
    found = found or modules()
    graph: dict[str, dict[str, Import]] = {module: {} for module in found}
    for module, path in found.items():
        own_packages = {*_ancestors(module), module}
        for imp in imports_of(module, path, set(found)):
            for target in [*_ancestors(imp.target), imp.target]:
                if target not in own_packages:
                    graph[module].setdefault(target, imp)
    return graph


def cycles(graph: dict[str, dict[str, Import]]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan): one cycle through it, as a path, and
    all its modules (every one of them is on some cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(_cycle_in(graph, component), sorted(component)) for component in components]


def _cycle_in(graph: dict[str, dict[str, Import]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, inside the component)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in component or target in previous:
                    continue
                previous[target] = node
                if target == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    steps = []
    for importer, target in zip(cycle, cycle[1:], strict=False):
        imp = graph[importer][target]
        where = "in a function" if imp.in_function else "at module level"
        steps.append(f"{importer} -> {target} ({importer}:{imp.line}, {where})")
    return "\n    ".join(steps)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    report = "\n".join(
        f"  cycle {i + 1} (its modules: {', '.join(members)}):\n    {describe(cycle, graph)}"
        for i, (cycle, members) in enumerate(found)
    )
    assert not found, f"{len(found)} import cycle(s) in vlm_rl:\n{report}"


def test_the_family_registry_is_one_way():
    """Families import the adapter base; the base imports no family (the registry in `families/` maps to them)."""
    graph = import_graph()
    assert not [target for target in graph["vlm_rl.models.adapters"] if target.startswith("vlm_rl.models.families")]
    assert "vlm_rl.models.adapters" in graph["vlm_rl.models.families.qwen_vl"]


def test_function_level_imports_are_marked_lazy():
    found = modules()
    unmarked = [
        f"{module}:{imp.line} imports {imp.target}"
        for module, path in found.items()
        for imp in imports_of(module, path, set(found))
        if imp.in_function and not imp.lazy
    ]
    assert not unmarked, (
        "Imports inside functions must be lazy imports for start-up speed, marked with a comment containing 'lazy'; "
        "move these to the top of the module (and break any cycle they dodge):\n  "
        + "\n  ".join(sorted(set(unmarked)))
    )


def test_the_checker_finds_a_cycle_through_a_package_init_and_a_function(tmp_path):
    # A synthetic package: `pkg.a` imports `pkg.sub.b` (which runs `pkg/sub/__init__.py`, which imports `pkg.sub.c`),
    # and `pkg.sub.c` imports `pkg.a` inside a function, unmarked; a TYPE_CHECKING import does not count.
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.sub.b import thing\n",
        "pkg/sub/__init__.py": "from . import c\n",
        "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nthing = 1\n",
        "pkg/sub/c.py": (
            "def f():\n    from pkg import a\n\n\n"
            "def g():\n    # lazy: start-up speed\n    import pkg.sub.b\n    import pkg.sub\n"
            "    x = 1\n    import pkg\n"
        ),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = modules(tmp_path / "pkg", "pkg")
    graph = import_graph(found)
    assert cycles(graph) == [(["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"], ["pkg.a", "pkg.sub", "pkg.sub.c"])]
    assert "pkg.a" not in graph["pkg.sub.b"]
    marks = {(imp.target, imp.lazy) for imp in imports_of("pkg.sub.c", found["pkg.sub.c"], set(found))}
    # The mark covers the run of imports under it, not an import after other statements.
    assert marks == {("pkg", False), ("pkg.a", False), ("pkg.sub.b", True), ("pkg.sub", True)}
