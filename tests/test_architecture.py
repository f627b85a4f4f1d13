"""The import graph of src/pipecat_roark, read with ``ast``: no cycles, no upward imports,
no module over 400 lines of code and no class over 250. The layer table is docs/architecture.md's.

Every import counts, including those inside functions (the CLI imports lazily to start
fast; laziness must not hide a cycle). Imports under ``if TYPE_CHECKING:`` are skipped:
they never run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pipecat_roark"

LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "errors",
            "config",
            "owner",
            "events",
            "wire",
            "crashpoints",
            "faultpoints",
            "compat",
            "capture",
            "env_proxy",
            "scheduling",
        },
    ),
    ("storage", {"store", "spool", "owner_lock", "timeline", "ops", "metrics"}),
    ("tables", {"calls_table", "events_table", "chunks_table", "paused_keys", "outbox"}),
    ("table readers", {"call_ending", "inspection", "maintenance", "doctor", "row_payload"}),
    (
        "internals",
        {
            "writer_state",
            "wal_file",
            "chunk_spooler",
            "parked_ops",
            "op_apply",
            "batch_commit",
            "client",
            "drain_policy",
            "drain_report",
            "drain_db",
            "key_pause",
            "drain_housekeeping",
            "row_delivery",
            "writer_flush",
            "frame_feed",
            "answer_reader",
            "child_watch",
            "writer_pipe",
            "writer_recovery",
        },
    ),
    ("engines", {"writer", "drain", "writer_child", "writer_process"}),
    ("process", {"exit_drain", "lifecycle"}),
    (
        "delivery",
        {"background_drainer", "delivery_process", "metrics_endpoint", "call_delivery"},
    ),
    (
        "call",
        {"recorder", "recording", "facts", "watchdog", "hooks", "audio_tail", "wiring_warnings"},
    ),
    ("observer", {"observer", "testing"}),
    ("entry", {"", "cli", "devserver", "devserver_command"}),
]
"""Bottom to top; a module may import its own layer or lower ones. "" is the package root.
A subpackage (``outbox``, ``cli``, ``devserver``) is in its top name's layer."""

MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250
"""Lines of code: docstrings do not count. ruff's docstring rules make every public name
say what it returns and raises; that must not force a module or a class apart."""


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    here = [part for part in here if part]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module is None or node.module.split(".")[0] != "pipecat_roark":
                    continue
                base = node.module.split(".")[1:]
            else:
                base = here[: len(here) - (node.level - 1)]
                base += node.module.split(".") if node.module else []
            for alias in node.names:
                sub = ".".join([*base, alias.name])
                found.add(sub if sub in known else ".".join(base))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pipecat_roark":
                    found.add(".".join(alias.name.split(".")[1:]))
    found.discard(name)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    found = modules(package)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for index, (_, members) in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"module {name or '<root>'!r} is in no layer: add it to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name or '<root>'} ({LAYERS[layer_of(name)][0]}) imports "
        f"{target or '<root>'} ({LAYERS[layer_of(target)][0]})"
        for name, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(import_graph(PACKAGE)) is None


def test_no_module_imports_one_in_a_higher_layer() -> None:
    assert upward_imports(import_graph(PACKAGE)) == []


def test_the_layer_table_names_only_modules_that_exist() -> None:
    tops = {name.split(".")[0] for name in modules(PACKAGE)}
    listed = set().union(*(members for _, members in LAYERS))
    assert listed == tops


def test_the_layer_table_is_the_documented_one() -> None:
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    for layer, members in LAYERS:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {layer} |")), None)
        assert row is not None, f"docs/architecture.md has no row for layer {layer!r}"
        named = {cell.strip("` ") for cell in row.split("|")[2].split(",")}
        assert named == {m or "pipecat_roark" for m in members}, layer


def docstring_lines(tree: ast.Module) -> set[int]:
    """The lines of every string statement: module, class, function and attribute docstrings."""
    return {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }


def code_lines(source: str, first: int = 1, last: int | None = None) -> int:
    """Lines ``first``..``last`` of ``source`` (all of it by default) that are not docstrings."""
    docs = docstring_lines(ast.parse(source))
    last = len(source.splitlines()) if last is None else last
    return sum(1 for line in range(first, last + 1) if line not in docs)


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_modules_and_classes_stay_small(path: Path) -> None:
    source = path.read_text()
    assert code_lines(source) <= MAX_MODULE_LINES, f"{path.name} is over the limit"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = code_lines(source, node.lineno, node.end_lineno or node.lineno)
            assert size <= MAX_CLASS_LINES, f"class {node.name} has {size} lines of code"


def test_docstrings_do_not_count_but_code_does() -> None:
    doc = '    """' + "A docstring line.\n" * 300 + '    """\n'
    code = "".join(f"    x{i} = {i}\n" for i in range(240))
    source = f'"""Module."""\n\n\nclass Small:\n{doc}{code}'
    tree = ast.parse(source)
    small = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))
    assert code_lines(source, small.lineno, small.end_lineno) == 241
    assert code_lines(source + "    y = 0\n" * 20) == 2 + 241 + 20  # blank lines count


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pipecat_roark"
    for name, text in files.items():
        target = package / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return package


def test_the_checks_catch_a_cycle_even_through_a_function_level_import(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "store.py": "def f():\n    from .writer import Writer\n",
            "writer.py": "from . import store\n",
        },
    )
    graph = import_graph(package)
    assert find_cycle(graph) == ["store", "writer", "store"]
    assert upward_imports(graph) == ["store (storage) imports writer (engines)"]


def test_the_checks_resolve_packages_and_skip_type_checking_imports(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from .observer import RoarkObserver\n",
            "outbox/__init__.py": "from .rows import x\n",
            "outbox/rows.py": "from ..store import y\nimport pipecat_roark.wire\n",
            "store.py": "",
            "wire.py": "",
            "cli/group.py": "from .. import __version__\n",
        },
    )
    assert import_graph(package) == {
        "": set(),
        "outbox": {"outbox.rows"},
        "outbox.rows": {"store", "wire"},
        "store": set(),
        "wire": set(),
        "cli.group": {""},
    }


# Process-wide state is lifecycle's (issue 14): a module-level name that code mutates at run
# time is a singleton, and every singleton lives in lifecycle.ProcessState. The exceptions,
# each with its reason:
STATE_OUTSIDE_LIFECYCLE = {
    ("crashpoints", "_hits"): "the SIGKILL test hook counts hits in its own process",
    ("faultpoints", "_ARMED"): "the fault-injection test hook's armed points",
    ("writer_state", "EXITING"): "read by the writer, below lifecycle; only lifecycle sets it",
    ("child_watch", "_HIDDEN"): "a spawn's pipes for a moment, closed by a fork, below lifecycle",
}
_MUTATORS = {"add", "append", "clear", "discard", "pop", "popitem", "remove", "set"}
_MUTATORS |= {"setdefault", "update", "extend", "insert"}


def mutated_globals(path: Path) -> set[str]:
    """Module-level names of ``path`` that its functions rebind (``global``), store into
    (``x[k] = …``, ``del x[k]``, ``x.attr = …``) or call a mutating method on."""
    tree = ast.parse(path.read_text(), str(path))
    top = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    found: set[str] = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Global):
                found.update(n for n in node.names if n in top)
            elif isinstance(node, ast.Subscript | ast.Attribute) and isinstance(
                node.ctx, ast.Store | ast.Del
            ):
                found.update(_root(node.value) & top)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _MUTATORS
            ):
                found.update(_root(node.func.value) & top)
    return found


def _root(node: ast.expr) -> set[str]:
    """The name an attribute/subscript chain starts from (``x`` of ``x.a[k].b``)."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return {node.id} if isinstance(node, ast.Name) else set()


def state_outside_lifecycle(package: Path) -> list[str]:
    return sorted(
        f"{name}.{variable}"
        for name, path in modules(package).items()
        if name != "lifecycle"
        for variable in mutated_globals(path)
        if (name, variable) not in STATE_OUTSIDE_LIFECYCLE
    )


def test_every_process_wide_singleton_lives_in_lifecycle() -> None:
    assert state_outside_lifecycle(PACKAGE) == []


def test_only_lifecycle_sets_or_clears_the_exit_flag() -> None:
    setters = sorted(
        name
        for name, path in modules(PACKAGE).items()
        if re.search(r"\bEXITING\.(set|clear)\(", path.read_text())
    )
    assert setters == ["lifecycle"]


def test_the_singleton_check_catches_each_way_of_keeping_state(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "a.py": "_SEEN = set()\ndef f(x):\n    _SEEN.add(x)\n",
            "b.py": "_N = 0\ndef f():\n    global _N\n    _N += 1\n",
            "c.py": "_BY = {}\ndef f(k, v):\n    _BY[k] = v\n",
            "d.py": "TABLE = {'a': 1}\ndef f(k):\n    return TABLE[k]\n",
            "e.py": "_Q = Q()\ndef f(d):\n    _Q.dirs.add(d)\n",
            "lifecycle.py": "_MINE = {}\ndef f(k):\n    _MINE[k] = 1\n",
        },
    )
    assert state_outside_lifecycle(package) == ["a._SEEN", "b._N", "c._BY", "e._Q"]
