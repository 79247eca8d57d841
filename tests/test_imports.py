# python -m pytest -p no:cacheprovider tests/test_imports.py      (part of `make test-serial`)
"""minipar's modules import one way: no cycle, and every import of minipar at module level.

The graph is read from the source with `ast`, not by importing: an edge M -> N for each
`import minipar.N` / `from minipar.N import x` (and `from minipar.P import N` where N is a
module) anywhere in M, plus an edge to every package above N that is not also above M
(Python runs those packages' __init__ first). A cycle fails with the cycle printed, lazy
imports included (that is how autograd -> ops -> transformer_ops -> autograd once hid); so
does an import of minipar inside a function, a class or an `if` (a dependency nobody sees
at the top of the file), and of anything else but the optional dependencies (CuPy,
matplotlib), which may be imported where they are used, when installed.
"""
import ast
import pathlib

import pytest

pytestmark = pytest.mark.core

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "minipar"
OPTIONAL = {"cupy", "cupyx", "matplotlib"}   # optional extras: imported where used, if installed


def module_name(path, root):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root=PACKAGE):
    """{dotted name: path} of every module and package under root."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def targets(node, here, known):
    """The minipar modules an Import / ImportFrom node names (`here`: the importing module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:                                   # relative: resolve against `here`
            package = here if known[here].name == "__init__.py" else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known] or [base]
    return [n for n in names if n in known]


def ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(root=PACKAGE):
    """({module: set of modules it imports}, sorted [(module, line, target) imported late])."""
    known = modules(root)
    graph, late = {name: set() for name in known}, []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            found = targets(node, name, known)
            if id(node) not in top:
                late += [(name, node.lineno, t) for t in found]
            for t in found:                    # a late import is still an edge: it cannot hide a cycle
                graph[name] |= ({t} | ancestors(t)) - ancestors(name) - {name}
    return graph, sorted(late)


def find_cycle(graph):
    """One cycle as a list of modules [a, b, ..., a], or None (depth-first, colouring)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_the_module_graph_has_no_cycle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_minipar_is_imported_only_at_module_level():
    _, late = import_graph()
    assert not late, "minipar imported inside a function, class or if (move it to the top):\n" + "\n".join(
        f"  {m} line {line}: {t}" for m, line, t in late)


def test_the_checks_see_a_planted_cycle_and_a_late_import(tmp_path):
    root = tmp_path / "minipar"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from minipar.sub import b\n")
    (root / "a.py").write_text("from minipar.sub.b import f\n")
    (root / "c.py").write_text("")
    (root / "sub" / "b.py").write_text("def f():\n    from minipar import c\n")
    graph, late = import_graph(root)
    assert find_cycle(graph) is None and late == [("minipar.sub.b", 2, "minipar.c")]
    (root / "sub" / "b.py").write_text("def f():\n    from minipar import a\n")   # lazy: still a cycle
    cycle = find_cycle(import_graph(root)[0])                 # a -> sub (its __init__) -> b -> a
    assert cycle is not None and cycle[0] == cycle[-1] and "minipar.a" in cycle


def late_imports(root=PACKAGE):
    """[(module, line, top-level name)] of every import not at module level, minipar or not."""
    out = []
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(), str(path))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                out += [(name, node.lineno, n.split(".")[0]) for n in names]
    return sorted(out)


def test_only_optional_dependencies_are_imported_late():
    late = [row for row in late_imports() if row[2] not in OPTIONAL]
    assert not late, "imported inside a function, class or if, but not optional (move it to the top):\n" + \
        "\n".join(f"  {m} line {line}: {n}" for m, line, n in late)
