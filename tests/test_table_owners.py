"""Each table's SQL lives in one module, and the CLI runs no SQL.

Every string literal under ``src/pipecat_roark`` (docstrings and other bare string
statements aside) is read for the tables it names after ``FROM``, ``INTO``, ``UPDATE``
and ``JOIN``. A statement is about the table its outermost ``FROM``, ``INTO`` or
``UPDATE`` names (``DELETE FROM`` included): that table's owner module holds it, and
only there may the statement name other tables, in a ``JOIN`` or a subquery. A
fragment with no outermost table (a ``WHERE`` clause kept apart) may name only tables
its module owns. A name that is not a known table (``FROM {table}`` in an f-string)
is a violation too: no statement may hide which table it touches.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "pipecat_roark"

OWNERS = {
    "calls": "calls_table",
    "events": "events_table",
    "chunks": "chunks_table",
    "deliveries": "outbox",  # the package: rows, orphans, reads
    "paused_keys": "paused_keys",
    "sqlite_schema": "store",  # the schema itself: is this file ours?
}
"""Table → the module (or package) that owns every statement on it."""

_REFERENCE = re.compile(r"\b(FROM|INTO|UPDATE|JOIN)\s+([^\s(),;]+)")
_SUBJECT_KEYWORDS = ("FROM", "INTO", "UPDATE")
_EXECUTES = {"execute", "executemany", "executescript"}


@dataclass(frozen=True)
class Reference:
    keyword: str
    table: str
    depth: int
    """How many parentheses are open where the table is named (0: the statement's own)."""


def owns(module: str, table: str) -> bool:
    owner = OWNERS.get(table)
    return owner is not None and (module == owner or module.startswith(owner + "."))


def references(text: str) -> list[Reference]:
    found = []
    for match in _REFERENCE.finditer(text):
        before = text[: match.start()]
        depth = before.count("(") - before.count(")")
        found.append(Reference(match.group(1), match.group(2), depth))
    return found


def literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal that could be run; an f-string's holes read
    ``{…}``. Strings that are whole statements on their own (docstrings) are prose."""
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant | ast.JoinedStr)
    }
    inside_fstrings = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in node.values
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in prose or id(node) in inside_fstrings:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                part.value if isinstance(part, ast.Constant) else "{…}" for part in node.values
            )
            found.append((node.lineno, text))
    return found


def violations(module: str, source: str) -> list[str]:
    """What in ``source`` (the text of module ``module``, dotted, relative to the
    package) breaks the rules above; empty when it keeps them."""
    tree = ast.parse(source)
    out = []
    in_cli = module == "cli" or module.startswith("cli.")
    if in_cli:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _EXECUTES
            ):
                out.append(f"{module}:{node.lineno}: the CLI runs SQL ({node.func.attr})")
    for line, text in literals(tree):
        refs = references(text)
        if not refs:
            continue
        where = f"{module}:{line}"
        if in_cli:
            out.append(f"{where}: the CLI holds SQL naming {sorted({r.table for r in refs})}")
            continue
        unknown = sorted({r.table for r in refs if r.table not in OWNERS})
        if unknown:
            out.append(f"{where}: names {unknown}, which is not a known table")
            continue
        subject = next((r for r in refs if r.depth == 0 and r.keyword in _SUBJECT_KEYWORDS), None)
        if subject is not None:
            if not owns(module, subject.table):
                out.append(
                    f"{where}: a statement on {subject.table!r} belongs in {OWNERS[subject.table]}"
                )
            continue
        strays = sorted({r.table for r in refs if not owns(module, r.table)})
        if strays:
            out.append(f"{where}: a fragment names {strays}, owned elsewhere")
    return out


def modules() -> dict[str, str]:
    """Dotted module name (relative to the package) → its source."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path.read_text()
    return found


def test_each_tables_sql_lives_only_in_its_owner_module() -> None:
    found = [v for module, source in modules().items() for v in violations(module, source)]
    assert found == []


def test_every_table_in_the_schema_has_an_owner_that_holds_statements_on_it() -> None:
    schema = "".join(path.read_text() for path in sorted((ROOT / "migrations").glob("*.sql")))
    created = set(re.findall(r"CREATE TABLE (\w+)", schema))
    assert created == set(OWNERS) - {"sqlite_schema"}
    named: dict[str, set[str]] = {}
    for module, source in modules().items():
        for _, text in literals(ast.parse(source)):
            for ref in references(text):
                named.setdefault(ref.table, set()).add(module)
    for table, owner in OWNERS.items():
        holders = named.get(table, set())
        assert any(owns(m, table) for m in holders), f"{owner} holds no statement on {table}"


def test_the_cli_runs_no_sql() -> None:
    cli = {m: s for m, s in modules().items() if m == "cli" or m.startswith("cli.")}
    assert len(cli) >= 4, "the CLI package was not found"
    assert [v for module, source in cli.items() for v in violations(module, source)] == []


def test_the_check_catches_sql_in_the_wrong_module() -> None:
    select_calls = 'conn.execute("SELECT id FROM calls WHERE state = ?", ("open",))\n'
    assert violations("drain", select_calls) != []
    assert violations("cli.inspect_commands", select_calls) != []
    assert violations("cli.group", 'conn.execute("PRAGMA query_only")\n') != []
    assert violations("calls_table", select_calls) == []
    assert violations("outbox.reads", "q = 'INSERT INTO calls (id) VALUES (?)'\n") != []
    assert violations("chunks_table", 'q = "DELETE FROM paused_keys"\n') != []
    # A docstring may talk about a statement; it is not one.
    assert violations("drain", 'def f():\n    """One UPDATE calls can end a call."""\n') == []


def test_joins_and_subqueries_belong_to_the_owner_of_the_outermost_table() -> None:
    joined = 'q = "SELECT c.id FROM calls c JOIN deliveries d ON d.call_id = c.id"\n'
    assert violations("calls_table", joined) == []
    assert violations("outbox.reads", joined) != []
    scalar = 'q = "SELECT c.id, (SELECT last_error FROM deliveries e) FROM calls c"\n'
    assert violations("calls_table", scalar) == []
    assert violations("outbox", scalar) != []
    nested = 'q = "SELECT body FROM events WHERE call_id IN (SELECT id FROM calls)"\n'
    assert violations("events_table", nested) == []
    assert violations("calls_table", nested) != []
    fragment = 'q = " AND EXISTS (SELECT 1 FROM deliveries s WHERE s.call_id = d.call_id)"\n'
    assert violations("outbox.rows", fragment) == []
    assert violations("calls_table", fragment) != []


def test_a_statement_that_hides_its_table_is_caught() -> None:
    hidden = 'conn.execute(f"SELECT count(*) FROM {table} WHERE call_id = ?", (call_id,))\n'
    assert violations("calls_table", hidden) != []
