"""The package's layering (docs/architecture.md): no import cycle between modules, and none of the imports that must
never exist. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onestep_cli"

# (importer, imported, why): module-name prefixes under onestep_cli.
NEVER = [
    ("eval", "engine", "evaluation takes sources, it does not reach into training"),
    ("eval", "digits", "metrics plug in; the registry does not import them"),
    ("denoisers", "engine", "a denoiser knows nothing of the loop"),
    ("denoisers", "eval", "a denoiser knows nothing of metrics"),
    ("objectives", "engine", "a loss is a pure function of denoisers"),
    ("sampling", "eval", "generation does not measure"),
    ("sample_io", "eval", "generation does not measure"),
    ("sampling", "engine", "generation loads a run through runs/"),
    ("sample_io", "engine", "generation loads a run through runs/"),
    ("sampling", "report", "generation does not report"),
    ("engine", "report", "training does not draw reports"),
    ("report", "engine", "compare reads runs through runs/, never the training code"),
    ("export", "engine", "export reads a run through runs/"),
    ("runs", "engine", "the run format sits below the engine"),
    ("runs", "eval", "the run format sits below evaluation"),
    ("runtime", "engine", "process-group helpers sit below the engine"),
    ("runtime", "runs", "process-group helpers sit below the run format"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules of the package that `path` imports (relative to onestep_cli; "" is the package itself)."""
    here = module_name(path).split(".") if module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("onestep_cli"):
                target = node.module.removeprefix("onestep_cli").lstrip(".")
            else:
                continue
            names = [f"{target}.{alias.name}" if target else alias.name for alias in node.names]
            found |= {name for name in names if _exists(name)} or {target}
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("onestep_cli").lstrip(".") for alias in node.names
                      if alias.name.startswith("onestep_cli.")}
    return {name for name in found if _exists(name)}


def _exists(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_module_imports_one_it_must_never_import(graph):
    broken = [f"{importer} -> {imported} ({why})" for importer, targets in graph.items() for imported in targets
              for low, high, why in NEVER if _is_under(importer, low) and _is_under(imported, high)]
    assert not broken, "\n".join(broken)


def test_no_import_cycles(graph):
    cycle = _find_cycle({module: {t for t in targets if t} for module, targets in graph.items() if module})
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checks_see_a_forbidden_import_and_a_cycle(tmp_path):
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    loop = PACKAGE / "eval" / "evaluate.py"
    assert "runs.loading" in imports_of(loop) and "runtime.distributed" in imports_of(loop)
