"""The shape the code keeps: the waiting logic is one pure flow below two drivers."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pgslots"
DRIVERS = {"psycopg", "psycopg_pool", "threading", "asyncio", "socketserver"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(top-level packages imported, pgslots modules imported) by one module of src/pgslots."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    outside: set[str] = set()
    inside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                inside |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module:
                outside.add(node.module.split(".")[0])
    return outside, inside


def test_the_flow_and_what_it_imports_use_no_driver_and_no_thread() -> None:
    seen: set[str] = set()
    todo = ["_flow"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        outside, inside = _imports(module)
        assert not outside & DRIVERS, f"{module} imports {outside & DRIVERS}"
        todo += sorted(inside)
    assert {"_flow", "errors", "_queries"} <= seen


def test_the_drivers_hold_no_waiting_logic_of_their_own() -> None:
    """Both drivers run the flows of _flow; neither defines a flow (a generator) itself."""
    for driver in ("sync", "asyncio"):
        tree = ast.parse((SRC / f"{driver}.py").read_text())
        _, inside = _imports(driver)
        assert "_flow" in inside
        generators = [
            f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and any(isinstance(n, ast.Yield) for n in ast.walk(f))
        ]
        assert not generators, (driver, generators)
