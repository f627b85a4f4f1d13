"""The ``pipecat-roark`` group and what every command shares.

``--dir``/``--json``, the one place errors become a line on stderr, and opening the
database to read or to write.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import __version__, config
from ..errors import PipecatRoarkError
from ..store import DB_NAME, connect
from .present import fail

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Turns our errors into one line and exit code 2, at the one place they surface."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipecatRoarkError as exc:
            fail(str(exc))
        except sqlite3.DatabaseError as exc:
            fail(f"the database cannot be read ({exc}); run `pipecat-roark doctor`")


def common_options(function: F) -> F:
    """``--dir`` and ``--json``: the same on every command.

    Returns:
        ``function`` as a click callback that takes ``--dir`` and ``--json`` and calls it
        with the resolved ``directory`` and ``as_json``.
    """

    @click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=config.ENV_DIR,
        show_envvar=True,
        help=f"Where {DB_NAME} and chunks/ live (default: the user state dir).",
    )
    @click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables."
    )
    @functools.wraps(function)
    def wrapper(*args: Any, directory: Path | None, as_json: bool, **kwargs: Any) -> Any:
        return function(*args, directory=config.resolve_dir(directory), as_json=as_json, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def reading(directory: Path) -> Iterator[sqlite3.Connection]:
    """Open read-only (query_only): inspection never writes and never migrates.

    Yields:
        A read-only connection to the database in ``directory``, closed on exit.
    """
    conn = connect(directory, read_only=True)
    try:
        yield conn
    finally:
        conn.close()


def require_database(directory: Path) -> None:
    """Commands that write must not create an empty database where nothing was recorded."""
    if not (directory / DB_NAME).exists():
        fail(
            f"no database at {directory / DB_NAME}: nothing has been recorded there yet (check --dir)"
        )


@contextmanager
def writing(directory: Path) -> Iterator[sqlite3.Connection]:
    """Open to write, for the commands that change local data; exits 2 if nothing was recorded.

    Yields:
        A writable connection to the existing database in ``directory``, closed on exit.
    """
    require_database(directory)
    conn = connect(directory)
    try:
        yield conn
    finally:
        conn.close()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipecat-roark")
def main() -> None:
    """Ship every Pipecat call to Roark: deliver the local queue and inspect it offline.

    Calls are recorded by RoarkObserver into PIPECAT_ROARK_DIR (wal.sqlite + chunks/).
    Exit codes: 0 ok, 1 something undelivered/dead/unhealthy, 2 usage or config error.

    \b
    Example:
        pipecat-roark status
        ROARK_API_KEY=... pipecat-roark drain
    """


def parse_since(text: str) -> int:
    """``--since``: a duration back from now (2h, 7d) or an ISO date → epoch microseconds.

    Returns:
        The moment ``text`` names, in microseconds since the epoch (exits 2 if it names none).
    """
    from ..maintenance import parse_duration

    try:
        return int((time.time() - parse_duration(text)) * 1e6)
    except PipecatRoarkError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            fail(f"--since {text!r}: use a duration (2h, 7d) or an ISO date (2026-05-28T10:00)")
        return int(when.timestamp() * 1e6)
