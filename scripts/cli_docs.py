"""Write docs/cli.md from the CLI's own --help, so the reference cannot drift.

uv run python scripts/cli_docs.py          # rewrite docs/cli.md
uv run python scripts/cli_docs.py --check  # exit 1 if docs/cli.md is stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipecat_roark.cli import main as cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 88

INTRO = """\
# `pipecat-roark` command reference

Generated from `--help` by `scripts/cli_docs.py`; a test fails when it is stale.

Every command takes `--dir` (default `PIPECAT_ROARK_DIR`, else the user state dir)
and `--json`. Exit codes: **0** ok, **1** something left undelivered, dead or
unhealthy, **2** a usage or configuration error (one line on stderr, never a traceback).
"""


def help_text(command: click.Command, name: str, parent: click.Context | None) -> str:
    ctx = click.Context(
        command,
        info_name=name,
        parent=parent,
        terminal_width=WIDTH,
        max_content_width=WIDTH,
        help_option_names=["-h", "--help"],
    )
    return command.get_help(ctx)


def render() -> str:
    root = click.Context(cli, info_name="pipecat-roark", terminal_width=WIDTH)
    parts = [INTRO, "## pipecat-roark\n", "```text", help_text(cli, "pipecat-roark", None), "```"]
    assert isinstance(cli, click.Group)
    for name in sorted(cli.commands):
        parts += [
            f"\n## pipecat-roark {name}\n",
            "```text",
            help_text(cli.commands[name], name, root),
            "```",
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `uv run python scripts/cli_docs.py`", file=sys.stderr)
            sys.exit(1)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
