"""The package's floors: a folder is a floor, and imports run only down (docs/design.md).

Checked on the source, so a new module that reaches up (``core`` importing ``runtime``, a
library module importing the command line) fails here, not in a reviewer's head; and every
import of the package's own modules inside a function says why it is not at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm"
# Bottom to top. errors.py is the ground: every floor may raise the package's error.
FLOORS = ["errors", "core", "runtime", "files", "data", "run", "sample", "scoring", "train", "interop", "cli"]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py" and p.parent != PACKAGE or
                  p.name == "errors.py")


def _floor(parts: tuple[str, ...]) -> int | None:
    """The floor of a module given as its dotted parts below ``ddpm`` (None: the package root)."""
    if not parts:
        return None
    head = parts[0].removesuffix(".py")
    return FLOORS.index(head) if head in FLOORS else None


def _imports(path: Path) -> list[tuple[tuple[str, ...], ast.ImportFrom, bool]]:
    """(target parts below ddpm, node, inside a function) for each import of the package's own modules."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parent.parts
    out = []
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            target = tuple(base) + tuple((node.module or "").split(".") if node.module else ())
            targets = [target] if node.module else [target + (a.name,) for a in node.names]
            out += [(t, node, id(node) in inner) for t in targets]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddpm."):
            out.append((tuple(node.module.split(".")[1:]), node, id(node) in inner))
    return out


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_only_down(path: Path) -> None:
    mine = _floor(path.relative_to(PACKAGE).parts)
    assert mine is not None, f"{path} is in no floor; add its folder to FLOORS and docs/design.md"
    for target, node, _ in _imports(path):
        theirs = _floor(target)
        if theirs is None:  # the package root: its version string
            assert [a.name for a in node.names] == ["__version__"], f"{path}:{node.lineno} imports the package root"
            continue
        assert theirs <= mine, (f"{path.relative_to(PACKAGE)}:{node.lineno} imports {'.'.join(target)}, "
                                f"a floor above its own ({FLOORS[mine]} < {FLOORS[theirs]})")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_in_function_imports_of_the_package_say_why(path: Path) -> None:
    lines = path.read_text().splitlines()
    for target, node, inside in _imports(path):
        if inside:
            assert "# local:" in lines[node.lineno - 1] or "# local:" in lines[node.lineno - 2], (
                f"{path.relative_to(PACKAGE)}:{node.lineno} imports {'.'.join(target)} inside a function without "
                "a '# local: <the cost or cycle>' comment; import it at the top")


def test_every_module_is_in_the_readme_table() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = [".".join(("ddpm",) + p.relative_to(PACKAGE).with_suffix("").parts) for p in _modules()
               if p.name != "__init__.py"
               and f"`{'.'.join(('ddpm',) + p.relative_to(PACKAGE).with_suffix('').parts)}`" not in readme]
    assert not missing, f"modules missing from the README's module table: {', '.join(missing)}"
