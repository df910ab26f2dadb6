"""The shape the code keeps: the waiting logic is one pure flow below two drivers, which reach a
client's connections through one door."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "pgslots"
DRIVERS = {"psycopg", "psycopg_pool", "threading", "asyncio", "socketserver"}
# A flow reads neither the time nor chance itself: its driver passes a clock (tests step it).
IMPURE = {"time", "random"}


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
        assert not outside & (DRIVERS | IMPURE), f"{module} imports {outside & (DRIVERS | IMPURE)}"
        todo += sorted(inside)
    assert {"_flow", "errors", "_queries", "_validate", "types"} <= seen


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


def test_only_the_client_module_reaches_into_a_client() -> None:
    """Faces, apply and the CLI get a client's session through client.connections_of, never by reading
    a client's private attributes."""
    roots = [SRC, SRC.parents[1] / "cli" / "pgslots_cli"]
    for path in (p for root in roots for p in sorted(root.glob("*.py"))):
        if path.name == "client.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "_connections":
                owner = node.value
                assert isinstance(owner, ast.Name) and owner.id == "self", f"{path.name}:{node.lineno} reads ._connections"


SQL = SRC.parents[1] / "sql" / "functions"


def _body(name: str) -> list[str]:
    """The lines between AS $$ and $$; of one function in sql/functions."""
    for path in sorted(SQL.glob("*.sql")):
        text = path.read_text()
        start = text.find(f"CREATE FUNCTION pgslots.{name}(")
        if start >= 0:
            body = text[text.index("AS $$", start) + len("AS $$") : text.index("\n$$;", start)]
            return body.strip("\n").splitlines()
    raise AssertionError(f"no function {name}")


def _depth(lines: list[str]) -> int:
    depth = deepest = 0
    for line in lines:
        code = line.split("--")[0].strip()
        if code.startswith(("IF ", "FOR ", "WHILE ", "LOOP")) and code.endswith(("THEN", "LOOP")):
            depth += 1
            deepest = max(deepest, depth)
        elif code.startswith(("END IF", "END LOOP")):
            depth -= 1
    return deepest


def test_sql_files_keep_one_subject_each_and_acquire_is_a_short_pipeline() -> None:
    for path in sorted(SQL.glob("*.sql")):
        assert len(path.read_text().splitlines()) <= 300, f"{path.name} has grown past 300 lines: split it by subject"
    # acquire is a short pipeline of stages; only the first stage's grant, the hot path, is written
    # out in it (its UPDATE for a limit nobody waits on, its lease row and answer: every nested call
    # there costs each acquire microseconds).
    acquire = _body("acquire")
    assert len(acquire) <= 62 and _depth(acquire) <= 2, (len(acquire), _depth(acquire))
    # The lock-wait bound is written once: every function that takes wait_seconds calls the pair.
    for path in sorted(SQL.glob("*.sql")):
        text = path.read_text()
        assert "set_config('lock_timeout'" not in text or path.name == "12_shared_writes.sql", path.name
