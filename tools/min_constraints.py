"""The lowest versions imgtune declares, as pip constraints: `name==floor` for every `name>=floor` of the core
dependencies and the extras (not the dev tools, which float). `make test-min` installs with them and runs the
fast tests, so a floor in pyproject.toml is a version that was tested, not a guess.

    python tools/min_constraints.py            # print the constraints
    python tools/min_constraints.py --check    # exit 1 unless each installed version is its floor

It reads pyproject.toml with tomllib, so it (and make test-min) needs Python 3.11 or newer.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_FLOOR = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)")


def floors() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        if extra != "dev":
            requirements += items
    found = {}
    for requirement in requirements:
        match = _FLOOR.match(requirement)
        if match and not match.group(1).startswith("imgtune"):
            found[match.group(1).lower()] = match.group(2)
    return found


def main() -> int:
    wanted = floors()
    if "--check" not in sys.argv[1:]:
        print("\n".join(f"{name}=={version}" for name, version in wanted.items()))
        return 0
    from packaging.version import Version  # installed by then (pip's own copy is not importable)

    wrong = []
    for name, version in wanted.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        print(f"{name:36} floor {version:10} installed {installed}")
        if installed == "not installed" or Version(installed.split("+")[0]) != Version(version):
            wrong.append(name)
    if wrong:
        print(f"not at their floor: {', '.join(wrong)}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
