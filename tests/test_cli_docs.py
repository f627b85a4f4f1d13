"""The CLI reference is its own --help, every command shows an example, and the installed
`pipecat-roark` entry point runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from pipecat_roark import __version__
from pipecat_roark.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(cli.commands) if isinstance(cli, click.Group) else []


def test_docs_cli_md_is_generated_from_the_current_help() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_the_documented_commands_are_exactly_these() -> None:
    assert COMMANDS == [
        "calls",
        "dev-server",
        "doctor",
        "drain",
        "export",
        "forget",
        "prune",
        "retry",
        "show",
        "status",
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_an_example_that_names_itself(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    example = done.stdout.split("Example:", 1)[1]
    assert f"pipecat-roark {command}" in example


def test_the_installed_entry_point_prints_the_version() -> None:
    entry = Path(sys.executable).parent / "pipecat-roark"
    done = subprocess.run([str(entry), "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == f"pipecat-roark, version {__version__}"
