"""The shape of the package: no import circles, a core that imports no feature, kernels reached only
through ops/ and the optimizer, a root that shows the architecture, short functions, and every verb
of the CLI a module named after it with ``add_arguments`` and ``run``."""

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


def _imports(modules: dict) -> dict[str, set[str]]:
    """Every mupfast module each module imports, at any depth: function bodies and ``if TYPE_CHECKING:``
    blocks too (an import for annotations only is still a dependency between the two files)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
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


#: The features: they plug into the core through mupfast.plugins and are never imported by it.
FEATURES = ("mupfast.finetune", "mupfast.tuning", "mupfast.checks")
#: The entry layer: the CLI maps every verb, features' too, to its module.
ENTRY = ("mupfast.cli",)


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_core_module_imports_a_feature():
    graph = _imports(_modules())
    core = [m for m in graph if not _in(m, FEATURES + ENTRY)]
    assert len(core) > 30
    offenders = {m: sorted(d for d in graph[m] if _in(d, FEATURES)) for m in core}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_core_module_names_a_feature_module_to_import():
    """Nor by a string (importlib.import_module, a subprocess's ``-m``): features are found as plugins."""
    for name, path in _modules().items():
        if _in(name, FEATURES + ENTRY):
            continue
        strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)]
        named = [s for s in strings if isinstance(s, str) and s.startswith(tuple(f + "." for f in FEATURES))]
        assert not named, (name, named)


def test_fine_tuning_is_a_registered_feature():
    from mupfast.plugins import features

    assert "finetune" in {f.name for f in features()}


def test_the_root_holds_at_most_12_modules():
    root = sorted(p.name for p in (ROOT / "mupfast").glob("*.py"))
    assert len(root) <= 12, root


def test_every_function_is_at_most_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_module_docstrings_say_what_the_module_is_not_essays():
    """The why of a design belongs on a docs/ page; a module's docstring stays at most 25 lines."""
    long = {}
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        if doc.count("\n") + 1 > 25:
            long[name] = doc.count("\n") + 1
    assert not long, long


def test_docstrings_cite_no_file_outside_the_repository():
    """The project's research notes are not in the repository: cite the papers and projects themselves."""
    cites = {name for name, path in _modules().items() if "research/" in path.read_text()}
    assert not cites, cites


def test_no_file_outside_the_tests_reads_as_a_test():
    """pytest's own patterns (test_*.py, *_test.py) name test files only; benchmarks/suite is the
    pytest-benchmark suite that ``make bench`` runs."""
    # installed environments (.preflight/: the GPU image's Triton and torch, side-installed by make preflight)
    installed = {".venv", ".venv-latest", ".preflight"}
    files = [p.relative_to(ROOT) for p in ROOT.rglob("*.py") if not installed & set(p.parts)]
    looks = [
        f
        for f in files
        if (f.name.startswith("test_") or f.stem.endswith("_test"))
        and f.parts[0] != "tests"
        and f.parts[:2] != ("benchmarks", "suite")
    ]
    assert not looks, looks


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_lives_in_a_module_named_after_it(verb):
    """``transfer-compare`` in ``…transfer_compare``; a ``-test`` verb in ``checks/<what>_check``;
    ``prepare-data`` in ``data/prepare`` (its package and module spell the verb)."""
    *_, package, module = VERBS[verb][0].split(".")
    expected = verb.replace("-", "_")
    if verb.endswith("-test"):
        expected = verb.removesuffix("-test").replace("-", "_") + "_check"
    assert module == expected or {package, module} == set(verb.split("-")), (verb, VERBS[verb][0])
