"""The packages' import graph has no circles.

Every import in a module counts, at module level or inside a function (a lazy import is still a
dependency a reader has to hold in mind). ``from pkg import sub`` where ``sub`` is a submodule is an
edge to ``pkg.sub`` only: Python runs ``pkg/__init__`` first for any submodule, which is no circle.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hetmm", "hetmm_kernels")


def modules() -> dict:
    """module name -> (file, whether it is a package's ``__init__``)"""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(found: dict) -> dict:
    """module name -> the names of this project's modules it imports"""

    def known(name):
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, (path, is_package) in found.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module] if node.level
                                else [node.module]) if node.module else ".".join(package[:len(package) - node.level + 1])
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                targets = submodules if all(s in found for s in submodules) else [base]
            else:
                continue
            edges |= {known(t) for t in targets} - {"", name}
        graph[name] = edges
    return graph


def circles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return result


def test_no_import_circles():
    graph = import_graph(modules())
    assert len(graph) > 30 and graph["hetmm.detector"], "the graph was not read"
    assert circles(graph) == [], "import circles (modules that import each other, directly or through others)"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert circles(graph) == expected


def test_a_lazy_import_is_an_edge(tmp_path, monkeypatch):
    package = tmp_path / "hetmm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("def f():\n    from .two import g\n")
    (package / "two.py").write_text("from . import one\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("hetmm",))
    assert circles(import_graph(modules())) == [["hetmm.one", "hetmm.two"]]


@pytest.mark.parametrize("before,environment,expected", [
    ("", {}, "10000"),                                  # hetmm first: set for the OpenMP runtime torch loads
    ("import torch; ", {}, None),                       # too late: libgomp read it already
    ("", {"GOMP_SPINCOUNT": "5"}, "5"),                 # the user's own setting stays
    ("", {"OMP_WAIT_POLICY": "PASSIVE"}, None),
])
def test_openmp_spinning_is_shortened_only_before_torch_loads(before, environment, expected):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = f"{before}import os, hetmm; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**env, **environment}, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    assert out == str(expected)
