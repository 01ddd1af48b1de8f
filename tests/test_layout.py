"""shared/ is split by concern and its imports go one way: each package imports only the packages below it (its
own modules too), so there is no import circle, and each package's docstring says what it owns. Read from the
source: every `import`/`from ... import` of shared, at module level or inside a function (a deferred import is
still a circle), except those only type checkers run (`if TYPE_CHECKING:`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent.parent / "shared"
# Lowest first: a module may import from its own layer and the layers before it.
LAYERS = ("runtime", "source", "state", "destinations", "services", "pipeline", "http_api")
# Top-level modules that belong to a layer of another name.
PLACE = {"api_answers": "http_api", "api_roles": "http_api", "console": "http_api", "connection_check": "http_api",
         "definitions_edit": "http_api", "source_browse": "http_api"}


def shared_imports(tree: ast.AST, package: str) -> set[str]:
    """The shared.* modules a module's code imports (dotted, without `shared.`), type-checking-only ones left out."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.removeprefix("shared.") for a in node.names if a.name.startswith("shared."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "shared" or node.module.startswith("shared."):
                base = node.module.removeprefix("shared").lstrip(".")
                for alias in node.names:  # `from shared.pkg import module` names a module; else a name in it
                    name = f"{base}.{alias.name}" if base else alias.name
                    found.add(name if (SHARED / f"{name.replace('.', '/')}.py").exists() else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard("")
    return found


def modules() -> dict[str, set[str]]:
    """Every module of shared/ (dotted, without `shared.`) and the shared modules it imports."""
    graph = {}
    for path in SHARED.rglob("*.py"):
        name = ".".join(path.relative_to(SHARED).with_suffix("").parts)
        graph[name] = shared_imports(ast.parse(path.read_text()), name.rpartition(".")[0])
    return graph


def layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(PLACE.get(top, top))


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is any (a path that comes back to where it started)."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for target in sorted(graph.get(node, ())):
            if target in graph and (found := walk(target, [*path, node])):
                return found
        done.add(node)
        return None

    return next((c for n in sorted(graph) if (c := walk(n, []))), None)


def test_the_checks_find_a_circle_and_an_upward_import():
    """The checks themselves can fail."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shared.pipeline import runs\n"
                     "def f():\n    from shared.source import contacts\nfrom shared.runtime.settings import X\n")
    assert shared_imports(tree, "x") == {"source.contacts", "runtime.settings"}
    assert layer("pipeline.runs") > layer("services") > layer("destinations.rate_budget") > layer("runtime.blocking")


def test_shared_has_no_import_circle():
    assert cycle(modules()) is None


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_only_go_down(module):
    upward = sorted(target for target in modules()[module] if layer(target) > layer(module))
    assert not upward, f"shared.{module} imports from a layer above it: {upward}"


def test_each_package_says_what_it_owns():
    packages = [p.parent for p in SHARED.rglob("__init__.py") if p.parent != SHARED]
    assert {p.name for p in packages} == set(LAYERS) - {"services", "http_api"}
    for package in packages:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc) > 60, f"shared/{package.name} has no docstring saying what it owns"
