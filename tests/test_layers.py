"""The layering of `redmap/`, checked from its source (docs/design/layers.md).

Two rules, both read with `ast` (nothing is imported, so a cycle hidden under
`TYPE_CHECKING` or inside a function counts as much as one at module level):

- no module below the Session uses a private name of `Session`: the layers below it
  receive its `redmap.orm.context.SessionContext` and use that context's public names;
- the import graph has no cycle beyond the mapping layer's own knot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "redmap"

# The modules allowed to use the Session's private names: the Session's own module and
# the layer above it (`AsyncSession` drives `sync_session._get_steps` and the like).
SESSION_MODULE = "redmap.orm.session"
ABOVE_SESSION = ("redmap.asyncio",)

# The mapping layer's knot (see the import-graph test for why these ten).
KNOT = frozenset(
    {
        "redmap.orm.attributes",
        "redmap.orm.collections",
        "redmap.orm.context",
        "redmap.query.expression",
        "redmap.orm.identity",
        "redmap.orm.mapper",
        "redmap.orm.registry",
        "redmap.orm.relationship_events",
        "redmap.orm.relationships",
        "redmap.orm.state",
    }
)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


# -- Session private names ---------------------------------------------------------------


def _private_names(classes: Iterator[ast.ClassDef]) -> set[str]:
    """Private (single underscore) names the classes define: methods, class attributes
    and the attributes their methods assign on `self`."""
    names: set[str] = set()
    for cls in classes:
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node in cls.body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _classes(tree: ast.Module, name: str | None = None) -> Iterator[ast.ClassDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (name is None or node.name == name):
            yield node


def session_names() -> set[str]:
    """The private names `Session` defines (methods and attributes)."""
    tree = _tree(_modules()[SESSION_MODULE])
    names = _private_names(_classes(tree, "Session"))
    assert {"_run", "_autoflush", "_context"} <= names, "Session's names were not read"
    return names


def private_uses(module: str, tree: ast.Module, names: set[str]) -> list[str]:
    """`module:line: expr._name` for every attribute access in `tree` to one of `names`
    that the module's own classes do not define (`UOWTransaction._run` is its own)."""
    suspect = names - _private_names(_classes(tree))
    return [
        f"{module}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in suspect
    ]


def test_no_layer_below_the_session_uses_its_private_names() -> None:
    """Modules below the Session use its context (`redmap.orm.context`), never `Session._x`
    (there were 81 such uses, of 21 names, in 9 modules)."""
    names = session_names()
    found = [
        use
        for module, path in _modules().items()
        if module != SESSION_MODULE and not module.startswith(ABOVE_SESSION)
        for use in private_uses(module, _tree(path), names)
    ]
    assert not found, "Session private names used below the session:\n" + "\n".join(found)


def test_the_private_name_check_reports_a_use() -> None:
    """The check is not vacuous: reaching into the Session is reported, a module's use of
    the same name on its own class is not."""
    names = session_names()
    reaching = ast.parse("def f(session):\n    return session._context, session._run\n")
    own = ast.parse("class Job:\n    def _run(self):\n        return self._run\n")
    assert private_uses("m", reaching, names) == [
        "m:2: session._context",
        "m:2: session._run",
    ]
    assert private_uses("m", own, names) == []


# -- the import graph ----------------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (module level,
    under `if TYPE_CHECKING:`, inside functions). `from . import x` names the module `x`
    when there is one; a submodule's implicit import of its parent packages is not an
    edge (it would join every module to `redmap/__init__`)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(_tree(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - node.level + 1]
                origin = ".".join(base) if node.level else ""
                if node.module:
                    origin = f"{origin}.{node.module}" if origin else node.module
                targets = [
                    f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph`, largest first."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def test_import_graph_has_no_cycle_beyond_the_mapping_knot() -> None:
    """The largest import cycle is the mapping layer's own knot; the session, the
    planning modules, the I/O-free core and the drivers are in no cycle.

    The limit, 10 modules, is the knot as measured (run with `-s` to print every
    cycle): descriptors (`attributes`) build query expressions (`expression`) and fire
    relationship events (`relationship_events`, fired by `collections` too); a mapper
    and its relationships point at each other and at the `registry` that configures
    them; an `InstanceState` has a mapper and points back at the context of the
    session holding it (`context`), whose `identity` map holds states. Each of these
    references is a type the other module needs, most under TYPE_CHECKING. Before the
    context existed the largest cycle had 22 modules: `state` and every lower layer
    imported `session`, which imports the engine, so the session, the planning
    modules, the core and the sync driver were one component. The two other cycles,
    `cli`/`migrate.cli` and `migrate.batch`/`migrate.impl`, have two modules each.
    """
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    for component in cycles:
        print(len(component), " ".join(component))
    assert cycles, "the graph was not read"
    assert len(cycles[0]) <= len(KNOT), f"a cycle larger than the mapping knot: {cycles[0]}"
    assert set(cycles[0]) <= KNOT, f"a cycle beyond the mapping knot: {cycles[0]}"


def test_nothing_below_the_session_imports_it() -> None:
    """Only the package's public API (`redmap/__init__`), the demo and the layer above the
    session (`redmap.asyncio`) import `redmap.orm.session`, even for type checking."""
    importers = {m for m, targets in import_graph().items() if SESSION_MODULE in targets}
    assert {m for m in importers if not m.startswith(ABOVE_SESSION)} <= {"redmap", "redmap.demo"}


def test_the_graph_sees_type_checking_and_function_imports() -> None:
    """Imports under TYPE_CHECKING and inside functions are edges too."""
    graph = import_graph()
    assert "redmap.orm.context" in graph["redmap.orm.state"]  # under TYPE_CHECKING
    assert "redmap.orm.relationship_events" in graph["redmap.orm.collections"]  # in a method
