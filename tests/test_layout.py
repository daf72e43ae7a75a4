"""The repository's layout: the library and the run at the top, the experiments in experiments/; every
source file has its test file; every name has one home (no re-export tables, no module __getattr__);
the import graph, lazy imports inside functions included, has no circles."""
import ast

from conftest import ROOT


def sources() -> dict:
    """{module name: path} of every source file: the top level and experiments/."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"experiments.{p.stem}": p for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__"})
    return found


def imports(path, known) -> set:
    """The project modules a file imports, anywhere in it (a lazy import inside a function counts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in known:
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return out


def test_every_source_file_has_its_test_file():
    missing = [name for name, p in sources().items()
               if not (ROOT / "tests" / p.relative_to(ROOT).parent / f"test_{p.name}").exists()]
    assert not missing, f"no test file (tests/test_<file>.py, tests/experiments/test_<file>.py) for {missing}"


def test_every_name_has_one_home():
    """No module re-exports names that live elsewhere through a table or a module-level __getattr__."""
    for name, path in sources().items():
        tree = ast.parse(path.read_text())
        top = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        top |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert "__getattr__" not in top and "_MOVED" not in top, name


def test_no_import_circles():
    known = sources()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert graph["train"] and graph["experiments.claims"]  # the walk sees imports at all
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)
