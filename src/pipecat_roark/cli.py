"""`pipecat-roark`: deliver what is queued, and see offline what is stuck and why.

A thin click layer over the library. Every command takes ``--dir`` (default
``PIPECAT_ROARK_DIR``, else the user state dir) and ``--json``. Exit codes: 0 ok,
1 something is left undelivered, dead or unhealthy, 2 a usage or configuration error.
Errors are one line on stderr, never a traceback.

What we print is data, never markup: the consoles have rich markup and emoji codes
off (a call id ``[/]`` or ``[link=…]`` is printed as it is), our own colours are
``Text`` styles, and every stored string goes through ``shown()``, which makes control
characters visible (``\x1b``) so stored data cannot drive the terminal.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, config
from .errors import PipecatRoarkError
from .store import connect, now_us, quarantine

F = TypeVar("F", bound=Callable[..., Any])

out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x0A: "\\n",
    0x09: "\\t",
    0x0D: "\\r",
}


def shown(value: object) -> str:
    """Stored data as printable text: control characters (ESC, newline, …) made visible."""
    return str(value).translate(_CONTROLS)


def styled(text: str, style: str) -> Text:
    return Text(text, style=style)


class _Group(click.Group):
    """Turns our errors into one line and exit code 2, at the one place they surface."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipecatRoarkError as exc:
            fail(str(exc))
        except sqlite3.DatabaseError as exc:
            fail(f"the database cannot be read ({exc}); run `pipecat-roark doctor`")


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(Text.assemble(styled("error:", "red"), " ", shown(message)))
    sys.exit(code)


def common_options(function: F) -> F:
    """``--dir`` and ``--json``: the same on every command."""

    @click.option(
        "--dir",
        "directory",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=config.ENV_DIR,
        show_envvar=True,
        help="Where wal.sqlite and chunks/ live (default: the user state dir).",
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
    """Open read-only (query_only): inspection never writes and never migrates."""
    conn = connect(directory, read_only=True)
    try:
        yield conn
    finally:
        conn.close()


def require_database(directory: Path) -> None:
    """Commands that write must not create an empty database where nothing was recorded."""
    if not (directory / "wal.sqlite").exists():
        fail(
            f"no database at {directory / 'wal.sqlite'}: nothing has been recorded there yet (check --dir)"
        )


@contextmanager
def writing(directory: Path) -> Iterator[sqlite3.Connection]:
    require_database(directory)
    conn = connect(directory)
    try:
        yield conn
    finally:
        conn.close()


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


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


# ---- drain ----


@main.command()
@common_options
@click.option("--call", "call_id", help="Deliver only this call.")
@click.option(
    "--follow", is_flag=True, help="Keep running and deliver new calls as they come (a sidecar)."
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Stop after this many seconds, even mid-request (leases are handed back; drain"
    " again to go on).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="PIPECAT_ROARK_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics on this port at /metrics (0: any free port).",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    envvar="PIPECAT_ROARK_METRICS_ADDR",
    show_envvar=True,
    help="Address the metrics endpoint binds.",
)
@click.option(
    "--keep-delivered-audio",
    is_flag=True,
    help="Keep chunk files after Roark has the whole call (default: delete them then).",
)
def drain(
    directory: Path,
    as_json: bool,
    call_id: str | None,
    follow: bool,
    timeout: float,
    metrics_port: int | None,
    metrics_addr: str,
    keep_delivered_audio: bool,
) -> None:
    """Deliver everything pending to Roark, including calls that never ended.

    Uses ROARK_API_KEY and ROARK_BASE_URL. Calls recorded under another key are
    skipped and reported. With --follow (a sidecar) the database is created if the bot
    has not recorded yet, and open calls of processes in another PID namespace are
    ended only after PIPECAT_ROARK_ORPHAN_GRACE_S (default 20) seconds without a
    heartbeat. Ctrl-C stops cleanly: leases are released, nothing is lost.
    Once Roark has a whole call, its chunk files are deleted (rows stay until
    retention prunes them). Exits 1 if anything is left undelivered or dead.

    \b
    Example:
        ROARK_API_KEY=... pipecat-roark drain
        pipecat-roark drain --call 6f1c... --timeout 30
        pipecat-roark drain --follow --metrics-port 9464
    """
    from .drain import Drainer, DrainPolicy, DrainReport

    api_key = config.resolve_api_key(None)
    if not api_key:
        fail(f"set {config.ENV_API_KEY} to the Roark API key the calls were recorded with")
    base_url = config.resolve_base_url(None)
    if follow:  # a sidecar may start on an empty volume, before the bot's first call
        connect(directory).close()
    else:
        require_database(directory)
    with reading(directory) as conn:
        total = conn.execute(
            "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'leased')"
        ).fetchone()[0]
    progress = _Progress(total, enabled=not as_json and out.is_terminal)
    policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
    drainer = Drainer(directory, api_key, base_url, policy, on_progress=progress.update)
    metrics_url = None
    if metrics_port is not None:
        from .metrics import serve

        try:
            bound = serve(metrics_port, metrics_addr, directory)
        except OSError as exc:
            fail(
                f"cannot serve metrics on {metrics_addr}:{metrics_port} ({exc.strerror or exc}); "
                "choose another --metrics-port"
            )
        metrics_url = f"http://{metrics_addr}:{bound}/metrics"

    async def run() -> DrainReport | None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set if follow else task.cancel)  # type: ignore[union-attr]
        if metrics_url is not None:
            err.print(f"metrics at {metrics_url}")
        if not as_json:  # after the handlers: from here on a signal stops us cleanly
            out.print(
                f"draining {shown(directory)} to {shown(base_url)} with key {drainer.key_fp} "
                f"({total} rows queued)"
                + (" and following new calls (Ctrl-C stops)" if follow else "")
            )

        if follow:
            await drainer.run_forever(stop)
            return None
        return await drainer.run_once(call_id=call_id, budget_s=timeout)

    with progress:
        try:
            report = asyncio.run(run())
        except (KeyboardInterrupt, asyncio.CancelledError):
            err.print("stopped: leases released; run `pipecat-roark drain` again to go on")
            sys.exit(1)
    if report is None:
        return
    if as_json:
        emit_json(
            {
                "delivered": report.delivered,
                "chunks": report.chunks,
                "bytes": report.bytes,
                "retried": report.retried,
                "dead": report.dead,
                "pending": report.pending,
                "deadTotal": report.dead_total,
                "finalized": report.finalized,
                "skippedCalls": report.skipped_calls,
                "paused": report.paused,
                "lastError": report.last_error,
                "complete": report.complete,
            }
        )
    else:
        out.print(shown(report))
        for skipped in report.skipped_calls:
            err.print(
                f"skipped call {shown(skipped)}: recorded under another API key (set that key "
                "and drain again)"
            )
        if report.paused:
            err.print(
                "Roark refused the API key: set a valid ROARK_API_KEY and run `pipecat-roark drain`"
            )
        elif report.last_error and not report.complete:
            err.print(f"last error: {shown(report.last_error)}")
    sys.exit(0 if report.complete and not report.skipped_calls else 1)


class _Progress:
    """A rich progress bar on a terminal (rows, calls, chunks, MB, MB/s, ETA); nothing
    otherwise (a summary line follows)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.enabled = enabled
        self._started = time.monotonic()
        self._bar = Progress(
            TextColumn("delivering"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rows"),
            TextColumn("{task.description}", markup=False),
            TimeRemainingColumn(),
            console=out,
            disable=not enabled,
        )
        self._task = self._bar.add_task("", total=max(total, 1))

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def update(self, report: Any) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        self._bar.update(
            self._task,
            completed=report.delivered + report.dead,
            description=(
                f"{len(report.calls)} calls · {report.chunks} chunks · "
                f"{report.bytes / 1e6:.1f} MB at {report.bytes / 1e6 / elapsed:.1f} MB/s"
            ),
        )


# ---- status / calls / show ----


@main.command()
@common_options
@click.option(
    "--max-age",
    help="Unhealthy (exit 1) if a row has waited this long past its due time without an"
    " attempt (default 15m: no drainer is working).",
)
def status(directory: Path, as_json: bool, max_age: str | None) -> None:
    """Queue depth by state, oldest pending age, bytes on disk, dead rows, paused keys.

    Exits 1, with the reasons, when a row is dead, stored events do not decode, a key is
    paused, or a row has waited past its due time longer than --max-age without an
    attempt: usable as a health check with no flags.

    \b
    Example:
        pipecat-roark status
        pipecat-roark status --json --max-age 1h
    """
    from .inspection import DEFAULT_MAX_OVERDUE_S, queue_status
    from .maintenance import parse_duration

    limit = DEFAULT_MAX_OVERDUE_S if max_age is None else parse_duration(max_age)
    with reading(directory) as conn:
        data = queue_status(conn, directory, now=now_us(), max_overdue_s=limit)
    age = data["oldestPendingAgeS"]
    healthy = data["healthy"]
    if as_json:
        emit_json(data)
    else:
        table = Table(title=f"pipecat-roark queue in {shown(directory)}", show_header=True)
        table.add_column("kind")
        for state in ("pending", "leased", "delivered", "dead"):
            table.add_column(state, justify="right")
        for kind, counts in data["byKind"].items():
            table.add_row(
                shown(kind), *(str(counts[s]) for s in ("pending", "leased", "delivered", "dead"))
            )
        out.print(table)
        out.print(
            f"calls: {data['calls']['open']} open, {data['calls']['ended']} ended · "
            f"oldest pending: {_age(age)} · audio on disk: {_mb(data['chunkBytes'])} "
            f"({_mb(data['undeliveredChunkBytes'])} undelivered) · database: {_mb(data['databaseBytes'])}"
        )
        for paused in data["pausedKeys"]:
            out.print(
                styled(f"paused key {shown(paused['keyFingerprint'])}", "red"),
                f"since {shown(paused['pausedAt'])}: {shown(paused['reason'])}",
            )
        if data["lastError"]:
            last = data["lastError"]
            out.print(f"last error ({shown(last['key'])}): {shown(last['error'])}")
        out.print(styled("healthy", "green") if healthy else styled("unhealthy", "red"))
        for reason in data["reasons"]:
            out.print(f"  {shown(reason)}")
    sys.exit(0 if healthy else 1)


@main.command()
@common_options
@click.option(
    "--state",
    type=click.Choice(["open", "pending", "delivered", "dead"]),
    help="Only calls in this state.",
)
@click.option("--agent", help="Only calls of this agent id.")
@click.option("--since", help="Only calls started since: a duration (2h, 7d) or an ISO date.")
@click.option("--limit", type=int, default=50, show_default=True, help="Show at most this many.")
def calls(
    directory: Path,
    as_json: bool,
    state: str | None,
    agent: str | None,
    since: str | None,
    limit: int,
) -> None:
    """A table of calls: id, agent, started, duration, state, chunks delivered/total, last error.

    \b
    Example:
        pipecat-roark calls --state dead
        pipecat-roark calls --agent support-bot --since 2h --json
    """
    from .inspection import list_calls

    since_us = None if since is None else _since(since)
    with reading(directory) as conn:
        rows = list_calls(conn, state=state, agent=agent, since_us=since_us, limit=limit)
    if as_json:
        emit_json(rows)
        return
    table = Table(show_header=True)
    for column in ("id", "agent", "started", "duration", "state", "chunks", "last error"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            shown(row["id"]),
            shown(row["agentId"]),
            row["startedAt"][:19].replace("T", " "),
            "-" if row["durationS"] is None else f"{row['durationS']:.1f}s",
            shown(row["state"]),
            f"{row['chunksDelivered']}/{row['chunksTotal']}",
            shown(row["lastError"] or ""),
        )
    out.print(table)


@main.command()
@common_options
@click.argument("call_id")
def show(directory: Path, as_json: bool, call_id: str) -> None:
    """One call: its timeline, the exact payloads sent (or to be sent), each delivery's state.

    \b
    Example:
        pipecat-roark show 6f1c2a4e-...
    """
    from .inspection import call_detail

    with reading(directory) as conn:
        detail = call_detail(conn, call_id)
    if detail is None:
        fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
    if as_json:
        emit_json(detail)
        return
    call = detail["call"]
    out.print(
        styled(f"call {shown(call['id'])}", "bold"),
        f"· agent {shown(call['agentId'])} · {shown(call['state'])}"
        + (f" ({shown(call['endReason'])})" if call["endReason"] else "")
        + f" · started {call['startedAt']} · key {shown(call['keyFingerprint'] or 'none')}",
    )
    deliveries = Table(title="deliveries", show_header=True)
    for column in ("delivery", "state", "attempts", "next attempt", "last error"):
        deliveries.add_column(column)
    for row in detail["deliveries"]:
        deliveries.add_row(
            shown(row["key"].removeprefix(f"{call_id}:")),
            shown(row["state"]),
            str(row["attempts"]),
            row["nextAttemptAt"] or "",
            shown(row["lastError"] or ""),
        )
    out.print(deliveries)
    undecodable = detail["damage"]["undecodableEvents"]
    if undecodable:
        out.print(
            styled("damaged:", "red"),
            f"{len(undecodable)} stored event(s) do not decode and are left out of the payloads",
        )
        for bad in undecodable:
            out.print(f"  event row {bad['eventRow']}: {shown(bad['error'])}")
    out.print(styled("timeline", "bold"))
    for event in detail["timeline"]:
        fields = {k: v for k, v in event.items() if k not in ("at", "event")}
        at = event["at"] if isinstance(event["at"], int) else event["at"][11:26]
        out.print(
            f"  {at}  {event['event']:<16} {json.dumps(fields) if fields else ''}", markup=False
        )
    if detail["payloadNote"]:
        out.print(styled(shown(detail["payloadNote"]), "yellow"))
    for name, payload in detail["payloads"].items():
        out.print(styled(name, "bold"))
        out.print_json(json.dumps(payload))


# ---- export / retry / prune / doctor ----


@main.command()
@common_options
@click.argument("call_id")
@click.option(
    "--wav",
    "wav_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the recording here.",
)
@click.option(
    "--payloads",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write both payloads as JSON here.",
)
def export(
    directory: Path, as_json: bool, call_id: str, wav_path: Path | None, payloads: Path | None
) -> None:
    """Rebuild a call's recording locally from its chunk files (and its payloads).

    \b
    Example:
        pipecat-roark export 6f1c2a4e-... --wav call.wav --payloads call.json
    """
    from .inspection import call_detail
    from .maintenance import export_wav, private_file

    if wav_path is None and payloads is None:
        fail("say what to export: --wav FILE and/or --payloads FILE")
    result: dict[str, Any] = {"call": call_id}
    with reading(directory) as conn:
        detail = call_detail(conn, call_id)
        if detail is None:
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        if payloads is not None:
            with private_file(payloads) as file:
                file.write((json.dumps(detail["payloads"], indent=2) + "\n").encode())
            result["payloads"] = str(payloads)
        if wav_path is not None:
            try:
                exported = export_wav(conn, directory, call_id, wav_path)
            except PipecatRoarkError as exc:
                fail(str(exc), code=1)
            result.update(
                wav=str(exported.path),
                chunks=exported.chunks,
                bytes=exported.bytes,
                sampleRate=exported.sample_rate,
                numChannels=exported.num_channels,
            )
    if as_json:
        emit_json(result)
    else:
        if "wav" in result:
            seconds = result["bytes"] / (2 * result["numChannels"] * result["sampleRate"])
            out.print(
                f"wrote {shown(result['wav'])}: {result['chunks']} chunks, {seconds:.1f} s, "
                f"{result['sampleRate']} Hz"
            )
        if "payloads" in result:
            out.print(f"wrote {shown(result['payloads'])}")


@main.command()
@common_options
@click.argument("call_id", required=False)
@click.option("--dead", "all_dead", is_flag=True, help="Retry every dead or backing-off row.")
def retry(directory: Path, as_json: bool, call_id: str | None, all_dead: bool) -> None:
    """Make dead (and backing-off) rows due again, with their attempts reset.

    \b
    Example:
        pipecat-roark retry --dead
        pipecat-roark retry 6f1c2a4e-...
    """
    from .maintenance import retry as retry_rows

    if call_id is None and not all_dead:
        fail("say what to retry: a CALL id, or --dead for every dead row")
    with writing(directory) as conn:
        if (
            call_id is not None
            and conn.execute("SELECT 1 FROM calls WHERE id = ?", (call_id,)).fetchone() is None
        ):
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        count = retry_rows(conn, call_id=call_id, now=now_us())
    if as_json:
        emit_json({"retried": count})
    else:
        out.print(f"{count} row(s) are due again; run `pipecat-roark drain`")


@main.command()
@common_options
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    help="Age of delivered calls to delete (90s, 12h, 7d).",
)
def prune(directory: Path, as_json: bool, older_than: str) -> None:
    """Delete delivered calls (rows and chunk files) older than --older-than.

    Only calls whose every delivery is delivered; never anything pending, dead or open.

    \b
    Example:
        pipecat-roark prune --older-than 3d
    """
    from .maintenance import parse_duration, prune_delivered

    seconds = parse_duration(older_than)
    with writing(directory) as conn:
        result = prune_delivered(conn, directory, seconds, now=now_us())
    if as_json:
        emit_json({"calls": result.calls, "bytes": result.bytes})
    else:
        out.print(f"pruned {result.calls} delivered call(s), {_mb(result.bytes)} of audio")


@main.command()
@common_options
@click.argument("call_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Erase a call that is still open too.")
def forget(directory: Path, as_json: bool, call_id: str, yes: bool, force: bool) -> None:
    """Erase one call's local data: its rows, events and chunk files, delivered or not.

    For erasure requests. What Roark already received is not touched (ask Roark for
    that). Asks for confirmation unless --yes; an open call needs --force.

    \b
    Example:
        pipecat-roark forget 6f1c2a4e-...
        pipecat-roark forget 6f1c2a4e-... --yes --json
    """
    from .maintenance import forget_call

    with writing(directory) as conn:
        found = conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone()
        if found is None:
            fail(f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`")
        if not yes:
            if not sys.stdin.isatty():
                fail(f"forget erases call {call_id!r} for good: pass --yes to confirm")
            click.confirm(
                f"Erase call {call_id!r} ({found[0]}) and its recording from {directory}?",
                abort=True,
            )
        result = forget_call(conn, directory, call_id, force=force)
    if as_json:
        emit_json(
            {
                "forgotten": result.call_id,
                "state": result.state,
                "rows": result.rows,
                "bytes": result.bytes,
            }
        )
    else:
        out.print(
            f"erased call {shown(result.call_id)}: {result.rows} row(s), {_mb(result.bytes)} of audio"
        )


@main.command()
@common_options
@click.option(
    "--repair", is_flag=True, help="Move a corrupt database aside (timestamped, never deleted)."
)
@click.option("--offline", is_flag=True, help="Skip the base URL reachability check.")
def doctor(directory: Path, as_json: bool, repair: bool, offline: bool) -> None:
    """Check the directory, database, disk, key and base URL; one line per check.

    \b
    Example:
        pipecat-roark doctor
        pipecat-roark doctor --repair
    """
    from .maintenance import damage
    from .maintenance import doctor as run_checks

    if repair and (directory / "wal.sqlite").exists() and damage(directory)[0] is not None:
        moved = quarantine(directory)
        err.print(
            f"moved the corrupt database to {shown(moved)} (kept: `sqlite3 {shown(moved)} "
            ".recover` salvages it); a fresh one starts with the next call"
        )
    checks = run_checks(
        directory, api_key=config.resolve_api_key(None), base_url=None, reachability=not offline
    )
    if as_json:
        emit_json([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        for check in checks:
            mark = styled("✓", "green") if check.ok else styled("✗", "red")
            out.print(mark, f"{check.name}: {shown(check.detail)}")
    sys.exit(0 if all(c.ok for c in checks) else 1)


@main.command("dev-server")
@click.option(
    "--port",
    type=int,
    default=8787,
    show_default=True,
    help="Port on 127.0.0.1 (0: any free port).",
)
@click.option(
    "--data", type=click.Path(file_okay=False, path_type=Path), help="Keep what is received here."
)
@click.option("--fail-rate", type=float, default=0.0, help="Fraction of requests answered 503.")
@click.option("--latency-ms", type=int, default=0, help="Delay before every answer.")
@click.option(
    "--status-sequence", default="", help="Statuses for the next requests, e.g. 500,429,200."
)
@click.option("--reset-rate", type=float, default=0.0, help="Fraction of connections dropped.")
@click.option("--url-ttl", type=float, default=900.0, help="Presigned URL lifetime in seconds.")
@click.option(
    "--garbage-rate", type=float, default=0.0, help="Fraction of truncated upload-URL answers."
)
@click.option("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429.")
@click.option("--api-key", multiple=True, help="Accept only this key (repeatable; default: any).")
@click.option("--seed", type=int, default=0, help="Seed of the injected faults.")
def dev_server(**options: Any) -> None:
    """Run a local Roark-compatible server (loopback only) with fault injection.

    \b
    Example:
        pipecat-roark dev-server --port 8787 --fail-rate 0.3
        ROARK_BASE_URL=http://127.0.0.1:8787 ROARK_API_KEY=dev pipecat-roark drain
    """
    from argparse import Namespace

    from .devserver import faults_from, serve

    args = Namespace(**options)
    args.api_key = list(options["api_key"])
    serve(port=args.port, data_dir=args.data, faults=faults_from(args))


# ---- helpers ----


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _since(text: str) -> int:
    from .maintenance import parse_duration

    try:
        return int((time.time() - parse_duration(text)) * 1e6)
    except PipecatRoarkError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            fail(f"--since {text!r}: use a duration (2h, 7d) or an ISO date (2026-05-28T10:00)")
        return int(when.timestamp() * 1e6)


if __name__ == "__main__":
    main()
