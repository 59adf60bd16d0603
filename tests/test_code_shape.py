"""The code stays readable in one screen: no function or method in ``msc3870/`` or
``mediarepo/`` (migrations aside: Django writes them) longer than 50 lines, or taking more
than 5 keyword-only parameters (flags that travel together belong in a value object)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("msc3870", "mediarepo")
MAX_LINES = 50
MAX_KEYWORD_ONLY = 5

Function = ast.FunctionDef | ast.AsyncFunctionDef


def sources() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in path.relative_to(ROOT).parts:
                yield path


def functions(path: Path) -> Iterator[tuple[str, Function]]:
    """Every function and method of ``path``, nested ones included, with its dotted name
    (``Class.method``, ``outer.inner``)."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, Function]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def lines(function: Function) -> int:
    """From ``def`` to the last line of the body (decorators not counted)."""
    assert function.end_lineno is not None
    return function.end_lineno - function.lineno + 1


def offenders() -> tuple[list[str], list[str]]:
    long, flagged = [], []
    for path in sources():
        where = path.relative_to(ROOT).as_posix()
        for name, function in functions(path):
            if lines(function) > MAX_LINES:
                long.append(f"{where}:{name}:{lines(function)}")
            keyword_only = len(function.args.kwonlyargs)
            if keyword_only > MAX_KEYWORD_ONLY:
                flagged.append(f"{where}:{name}:{keyword_only} keyword-only")
    return long, flagged


def test_the_scan_sees_the_code() -> None:
    """A scan that found nothing would pass whatever the code looked like."""
    found = {
        path.relative_to(ROOT).as_posix(): sum(1 for _ in functions(path)) for path in sources()
    }
    assert found["msc3870/moderation.py"] > 10
    assert "mediarepo/settings.py" in found
    assert not any("/migrations/" in path for path in found)


def test_measures_what_it_says() -> None:
    tree = ast.parse("def f(a, *, b, c=1):\n    x = 1\n\n    return x\n")
    (function,) = tree.body
    assert isinstance(function, ast.FunctionDef)
    assert lines(function) == 4
    assert len(function.args.kwonlyargs) == 2


def test_no_function_over_50_lines() -> None:
    long, _ = offenders()
    assert not long, f"functions over {MAX_LINES} lines (file:function:lines):\n" + "\n".join(long)


def test_no_function_with_more_than_5_keyword_flags() -> None:
    _, flagged = offenders()
    assert not flagged, (
        f"functions with more than {MAX_KEYWORD_ONLY} keyword-only parameters "
        "(file:function:count); group the flags that travel together in a frozen "
        "dataclass:\n" + "\n".join(flagged)
    )
