"""The README tells the truth: its code blocks are excerpts of tested examples, every
command in it runs (or is run by the test named for it), and its configuration tables
match the code."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from pipecat_roark import RoarkObserver
from test_cli import cli, start_cli
from test_drain import record

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)

# Commands the README shows that this file does not run itself, and what runs them.
RUN_ELSEWHERE = {
    "scripts/demo": "tests/test_demo.py runs examples/offline_call.py, what scripts/demo runs",
    "scripts/demo --crash": "tests/test_demo.py",
    "scripts/demo --real": "tests/test_demo.py, with the dev server standing in for Roark",
    "scripts/test": "CI: .ci/run runs it on a clean clone",
    "scripts/test --long": "the long crash sets; scripts/test --long",
    "scripts/bench": "tests/test_bench_smoke.py runs scripts/bench.py --quick",
    "uv run python scripts/cli_docs.py": "tests/test_cli_docs.py runs it with --check",
    "uv sync --extra examples": "test_examples imports examples/bot.py with the extras",
    "uv run examples/bot.py --transport webrtc": "needs service keys and a browser; "
    "test_examples imports it and checks bot() and its transports",
    "pip install /path/to/this/checkout": "the entry point test in tests/test_cli_docs.py",
    "export ROARK_API_KEY=...": "an environment variable (documented below)",
    "cp .env.example .env": "checked here: .env.example exists",
}


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def commands() -> list[str]:
    out = []
    for body in blocks("bash"):
        for line in body.splitlines():
            command = re.split(r"\s{2,}#", line)[0].strip()
            if command and not command.startswith("#"):
                out.append(command)
    return out


def test_python_blocks_are_excerpts_of_the_examples() -> None:
    example_lines = {
        line.strip()
        for path in (ROOT / "examples").glob("*.py")
        for line in path.read_text().splitlines()
    }
    python = blocks("python")
    assert len(python) >= 2
    for body in python:
        compile(textwrap.dedent(body), "README.md", "exec")
        missing = [
            line.strip()
            for line in body.splitlines()
            if line.strip() and line.strip() not in example_lines
        ]
        assert missing == [], f"README lines not in examples/: {missing}"


def test_every_command_is_run_here_or_by_a_named_test() -> None:
    unknown = [
        c
        for c in commands()
        if not c.startswith("pipecat-roark ")
        and c not in RUN_ELSEWHERE
        and c != "uv run examples/basic_observer.py"
    ]
    assert unknown == [], f"README commands nobody runs: {unknown}"
    assert (ROOT / ".env.example").exists()
    for path in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / path).exists(), f"README links to a missing file: {path}"


def test_the_offline_example_command_runs(tmp_path: Path) -> None:
    assert "uv run examples/basic_observer.py" in commands()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROARK_", "PIPECAT_ROARK"))}
    env["PIPECAT_ROARK_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "basic_observer.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("recorded call ")


@pytest.mark.anyio
async def test_every_cli_command_in_the_readme_runs_as_documented(
    data_dir: Path, dev_server: RunningDevServer, tmp_path: Path
) -> None:
    await record(data_dir, "readme-call", 0)
    cli_lines = [c for c in commands() if c.startswith("pipecat-roark ")]
    assert len(cli_lines) >= 10
    for line in cli_lines:
        args = shlex.split(line.replace("CALL_ID", "readme-call"))[1:]
        args = [str(tmp_path / a) if a.endswith(".wav") else a for a in args]
        if args[0] == "dev-server" or "--follow" in args:
            assert_starts_and_stops(data_dir, args, dev_server.base_url)
            continue
        done = cli(data_dir, *args, base_url=dev_server.base_url)
        assert done.returncode == 0, f"{line}: {done.stderr}"
        assert "Traceback" not in done.stderr
    assert dev_server.call("readme-call")["eventCounts"] == {"callStarted": 1, "callEnded": 1}


def assert_starts_and_stops(directory: Path, args: list[str], base_url: str) -> None:
    if args[0] == "dev-server":
        args = [a if a != "8787" else "0" for a in args]  # any free port in tests
    proc = start_cli(directory, *args, base_url=base_url)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith(("dev server listening on", "draining")), first
    proc.terminate()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


def _table(header: str) -> list[list[str]]:
    section = README.split(header, 1)[1].split("\n\n", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_parameter_table_matches_the_signature() -> None:
    params = {
        name: p
        for name, p in inspect.signature(RoarkObserver.__init__).parameters.items()
        if name != "self"
    }
    rows = _table("| parameter | default | what it does |")
    assert [r[0].strip("`") for r in rows] == list(params)
    for row in rows:
        param = params[row[0].strip("`")]
        expected = (
            "required" if param.default is inspect.Parameter.empty else f"`{param.default!r}`"
        )
        assert row[1] == expected, row


def test_the_environment_table_names_every_variable_the_code_reads() -> None:
    read = set()
    for path in (ROOT / "src" / "pipecat_roark").glob("*.py"):
        read |= set(re.findall(r"[\"']((?:PIPECAT_)?ROARK_[A-Z_]+)[\"']", path.read_text()))
    documented = {r[0].strip("`") for r in _table("| environment variable | default | used by |")}
    assert documented == read


def test_every_guarantee_names_tests_that_exist() -> None:
    rows = [
        [cell.strip() for cell in row.strip().strip("|").split(" | ")]
        for row in _section("| guarantee | proved by |").splitlines()[2:]
        if row.startswith("| ")
    ]
    assert len(rows) >= 10, "the guarantees table was found"
    for guarantee, proof in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", proof)
        assert named, f"a guarantee without a test: {guarantee[:80]}"
        for path, name in named:
            assert name in defined_tests(ROOT / path), f"{path}::{name} does not exist"


def _section(header: str) -> str:
    return README.split(header, 1)[1].split("\n\n", 1)[0]


def defined_tests(path: Path) -> set[str]:
    """The test functions a file defines (parsed, not imported)."""
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }
