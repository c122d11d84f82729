"""Imports go one way: no cycle among the project's packages, and the protocol (tasks/) and the
frontend (app/) stay clear of the roles' code.

Every import counts, at module level or inside a function: a lazy import is still a dependency,
only a later one. The graph is read from the source with ``ast``, so nothing is imported here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("app", "tasks", "workers", "router", "kvtransfer", "launcher", "config", "bench", "scripts")
# The roles' code: what the protocol and the frontend must never reach.
ROLES = {"workers", "router", "launcher", "app"}


def _sources(package: str) -> list[Path]:
    path = ROOT / package
    if path.is_dir():
        return sorted(p for p in path.rglob("*.py") if "results" not in p.relative_to(path).parts)
    return [ROOT / f"{package}.py"]


def _imported_packages(source: Path, package: str) -> set[str]:
    """The project packages a module imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found & set(PACKAGES)


def import_graph() -> dict[str, dict[str, list[str]]]:
    """package -> {imported package -> the modules that import it}, without self-imports."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in PACKAGES}
    for package in PACKAGES:
        for source in _sources(package):
            for target in _imported_packages(source, package) - {package}:
                graph[package].setdefault(target, []).append(str(source.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of packages (first repeated at the end), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_packages_import_each_other_without_a_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle) + "; by: " + "; ".join(
        f"{a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


def test_the_protocol_imports_no_role():
    reached = {p: modules for p, modules in import_graph()["tasks"].items() if p in ROLES}
    assert reached == {}


def test_the_frontend_imports_no_worker_or_router():
    reached = {p: modules for p, modules in import_graph()["app"].items() if p in {"workers", "router"}}
    assert reached == {}


def test_the_finder_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import sibling\ndef f():\n    from workers.runtime import X\n    import router.index\n")
    assert _imported_packages(source, "tasks") == {"tasks", "workers", "router"}
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def test_the_celery_app_and_flower_load_no_role_runtime_and_no_engine():
    """`celery -A tasks ...` builds ``tasks.app``; Flower then imports the app's default modules
    (its ``include``: the roles' lifecycle modules, which connect worker signals and nothing
    else). None of that may load a runtime, an engine or vLLM."""
    probe = ("import sys, tasks; tasks.app.loader.import_default_modules(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'vllm', 'torch', 'app', 'launcher'} "
             "or m in {'workers.runtime', 'workers.engine', 'router.runtime', 'router.service'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, LLMQ_CONFIG="configs/agg.yaml"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "[]"
