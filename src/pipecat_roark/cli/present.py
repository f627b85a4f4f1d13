"""How the CLI prints: data, never markup, and never a stored string that drives the terminal.

The consoles have rich markup and emoji codes off, our own colours are ``Text`` styles,
and every stored string goes through ``shown()``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.text import Text

out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x0A: "\\n",
    0x09: "\\t",
    0x0D: "\\r",
}


def shown(value: object) -> str:
    """Stored data as printable text: control characters (ESC, newline, …) made visible.

    Returns:
        ``str(value)`` with each control character replaced by its escape, as text.
    """
    return str(value).translate(_CONTROLS)


def styled(text: str, style: str) -> Text:
    """Our own colour on our own words: a style, never markup parsed out of the text.

    Returns:
        ``text`` as a rich ``Text`` in ``style``, printed as it is.
    """
    return Text(text, style=style)


def fail(message: str, code: int = 2) -> NoReturn:
    """One ``error:`` line on stderr and exit ``code`` (2: usage or configuration)."""
    err.print(Text.assemble(styled("error:", "red"), " ", shown(message)))
    sys.exit(code)


def emit_json(data: Any) -> None:
    """``--json`` output: indented, anything not JSON-native as its ``str``."""
    click.echo(json.dumps(data, indent=2, default=str))


def format_age(seconds: float | None) -> str:
    """An age as a person reads it: 45s, 12m, 3.5h (``none`` when there is none).

    Returns:
        Seconds under two minutes, minutes under two hours, else hours with one decimal.
    """
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_mb(size: int) -> str:
    """Bytes as decimal megabytes, one decimal.

    Returns:
        ``size`` as text such as ``12.3 MB``.
    """
    return f"{size / 1e6:.1f} MB"
