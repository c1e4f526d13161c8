"""The shape of the package: no import circles, kernels reached only from the model and the
optimizer, and every verb of the CLI a module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import ast
import importlib

import pytest

from mupfast.cli import VERBS, main
from tests.helpers import ROOT


def _modules() -> dict[str, object]:
    """Module name → parsed source, for mupfast/ and kernels/ (installed as mupfast.kernels)."""
    out = {}
    for path in sorted((ROOT / "mupfast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        out["mupfast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(modules: dict) -> dict[str, set[str]]:
    """Every mupfast module each module imports when it runs, at any depth (function bodies too)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_circle():
    graph = _imports(_modules())
    assert len(graph) > 40
    cycle = _cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_are_reached_only_through_ops_and_the_optimizer():
    graph = _imports(_modules())
    kernels = {m for m in graph if m.startswith("mupfast.kernels")}
    for m in kernels:  # kernels/ imports nothing from the rest of mupfast
        assert graph[m] <= kernels, (m, graph[m] - kernels)
    users = {m for m, deps in graph.items() if deps & kernels and m not in kernels}
    assert users and all(m.startswith(("mupfast.ops.", "mupfast.optim.")) for m in users), users


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_is_a_module_with_add_arguments_and_run(verb, capsys):
    module = importlib.import_module(VERBS[verb][0])
    assert callable(module.add_arguments) and callable(module.run)
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mupfast {verb}") and "--config" in out


def test_an_unknown_flag_is_a_one_line_error(capsys):
    assert main(["explain", "--no-such-flag"]) == 2
    assert capsys.readouterr().err.strip() == "error: unrecognised argument '--no-such-flag'"
