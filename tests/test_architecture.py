"""The code's shape, checked: no import circles, one base class for the user's errors."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import imgtune
from imgtune.errors import UserError

SRC = Path(imgtune.__file__).parent


def _imports(path: Path) -> set[str]:
    """The imgtune modules a module imports, anywhere in it (functions and TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "imgtune":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("imgtune.")}
    return found - {path.stem}


def test_no_import_circles() -> None:
    graph = {p.stem: _imports(p) for p in SRC.glob("*.py") if p.stem != "__init__"}
    circles = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                circles.append(" -> ".join([*path, start]))
            elif nxt not in path and nxt > start:  # each circle once, from its smallest module
                walk(start, nxt, [*path, nxt])

    for module in sorted(graph):
        walk(module, module, [module])
    assert circles == []


def test_every_error_of_the_package_is_a_user_error() -> None:
    """The CLI prints a UserError in one line (exit 2); an error class outside it would print a traceback."""
    errors = []
    for info in pkgutil.iter_modules([str(SRC)]):
        if info.name == "__main__":  # importing it runs the CLI
            continue
        module = importlib.import_module(f"imgtune.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception):
                errors.append((name, issubclass(cls, UserError)))
    assert len(errors) >= 12
    assert [name for name, ok in errors if not ok] == []


def test_functions_are_short_or_say_why() -> None:
    """Over 60 lines, a function carries a `# long: <reason>` comment; the loop itself stays readable."""
    long = []
    for path in SRC.glob("*.py"):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                body = source[node.lineno - 2 : node.end_lineno]  # the line above it too
                if node.end_lineno - node.lineno >= 60 and not any("# long:" in line for line in body):
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert long == []
    assert len((SRC / "engine.py").read_text().splitlines()) <= 300


def test_the_package_imports_what_it_uses_when_it_uses_it() -> None:
    """`import imgtune.files` needs no torch (child processes of the tests start in milliseconds); the API
    names that are also submodule names (predict, compare) stay the API's functions once the submodules load."""
    import subprocess
    import sys

    probe = "import sys, imgtune.files, imgtune.errors; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
    import imgtune.compare
    import imgtune.predict  # the submodules, as any internal import loads them

    assert callable(imgtune.predict) and imgtune.predict.__module__ == "imgtune.api"
    assert callable(imgtune.compare) and imgtune.compare.__name__ == "compare"
