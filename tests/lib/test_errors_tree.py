"""The exception tree drawn in errors.py's docstring is the tree of the classes."""

from __future__ import annotations

import inspect
import re

from pgslots import errors


def _drawn_from_classes() -> list[str]:
    """The tree as the docstring draws it, names only: each class under its pgslots parent, in the
    order the module defines them, other bases (ValueError, TimeoutError) in parentheses."""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.PgSlotsError)]
    classes.sort(key=lambda c: inspect.getsourcelines(c)[1])

    def parent(cls: type) -> type | None:
        return next((b for b in cls.__bases__ if issubclass(b, errors.PgSlotsError)), None)

    def label(cls: type) -> str:
        others = [b.__name__ for b in cls.__bases__ if not issubclass(b, errors.PgSlotsError) and b is not Exception]
        return cls.__name__ + (f" ({', '.join(others)})" if others else "")

    lines = [label(errors.PgSlotsError)]

    def draw(node: type, prefix: str) -> None:
        children = [c for c in classes if parent(c) is node]
        for i, child in enumerate(children):
            last = i == len(children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + label(child))
            draw(child, prefix + ("    " if last else "│   "))

    draw(errors.PgSlotsError, "")
    return lines


def _drawn_in_docstring() -> list[str]:
    doc = errors.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    # Each line: the tree's drawing and the name, then at least two spaces and what it is for.
    drawn = []
    for line in block.splitlines():
        line = line[4:].rstrip()
        start = line.find("── ") + 3 if "── " in line else 0
        drawn.append(line[:start] + re.split(r"\s{2,}", line[start:])[0])
    return drawn


def test_the_docstring_draws_the_exception_tree_of_the_classes() -> None:
    assert _drawn_in_docstring() == _drawn_from_classes()
