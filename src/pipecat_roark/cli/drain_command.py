"""``pipecat-roark drain``: deliver the queue once, or follow it as a sidecar.

A progress bar shows on a terminal.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .. import config
from ..errors import StoreError
from ..outbox import queued_count
from ..scheduling import run_as_batch_work
from ..store import connect
from .group import common_options, main, reading, require_database
from .present import emit_json, err, fail, out, shown

if TYPE_CHECKING:
    from ..drain import Drainer


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
@click.option(
    "--parent-pipe",
    is_flag=True,
    help="Follow while stdin, a pipe from the bot that started this drain, is open: each"
    " byte read wakes the drain; at EOF (the bot exited or was killed) one last pass of at"
    " most --timeout, then exit 0; the pass first waits, for at most half of that, for a"
    " dead bot's writer process to commit what it was sent. SIGTERM and SIGINT are"
    " ignored: it stops with the bot. Implies --follow (RoarkObserver(delivery_process=True)).",
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
    parent_pipe: bool,
) -> None:
    """Deliver everything pending to Roark, including calls that never ended.

    Uses ROARK_API_KEY and ROARK_BASE_URL. Calls recorded under another key are
    skipped and reported. With --follow (a sidecar) the database is created if the bot
    has not recorded yet, and open calls of processes in another PID namespace are
    ended only after PIPECAT_ROARK_ORPHAN_GRACE_S (default 20) seconds without a
    heartbeat. Ctrl-C stops cleanly: leases are released, nothing is lost.
    Once Roark has a whole call, its chunk files are deleted (rows stay until
    retention prunes them). Exits 1 if anything is left undelivered or dead.
    With --parent-pipe (how RoarkObserver(delivery_process=True) starts it, the key
    in the environment) it follows the bot that started it and exits after the bot.

    \b
    Example:
        ROARK_API_KEY=... pipecat-roark drain
        pipecat-roark drain --call 6f1c... --timeout 30
        pipecat-roark drain --follow --metrics-port 9464
    """
    from ..drain import Drainer, DrainPolicy, DrainReport

    api_key = config.resolve_api_key(None)
    if not api_key:
        fail(f"set {config.ENV_API_KEY} to the Roark API key the calls were recorded with")
    base_url = config.resolve_base_url(None)
    follow = follow or parent_pipe
    if parent_pipe:  # the bot's own delivery child: it must not preempt the bot's loop
        run_as_batch_work()
    if follow:  # a sidecar may start on an empty volume, before the bot's first call
        connect(directory).close()
    else:
        require_database(directory)
    with reading(directory) as conn:
        total = queued_count(conn)
    progress = _Progress(total, enabled=not as_json and out.is_terminal)
    policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
    drainer = Drainer(directory, api_key, base_url, policy, on_progress=progress.update)
    metrics_url = None
    if metrics_port is not None:
        from ..metrics_endpoint import serve

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
            if parent_pipe:  # the bot's child: it stops when the bot's pipe closes
                signal.signal(sig, signal.SIG_IGN)
            else:
                loop.add_signal_handler(sig, stop.set if follow else task.cancel)  # type: ignore[union-attr]
        if metrics_url is not None:
            err.print(f"metrics at {metrics_url}")
        if not as_json:  # after the handlers: from here on a signal stops us cleanly
            out.print(
                f"draining {shown(directory)} to {shown(base_url)} with key {drainer.key_fp} "
                f"({total} rows queued)"
                + (" and following new calls (Ctrl-C stops)" if follow else "")
            )

        if parent_pipe:
            await _follow_parent(drainer, stop, timeout)
            return None
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
        emit_json(report.as_json())
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


async def _follow_parent(drainer: Drainer, stop: asyncio.Event, last_pass_s: float) -> None:
    """Follow until the parent's pipe (stdin) closes, then one last pass.

    Each byte the parent writes (a commit that added deliveries) wakes the drainer at
    once; EOF means the parent is gone, whether it exited or was killed. SIGTERM and
    SIGINT are ignored: a service manager's stop signals every process of the service at
    once (systemd's control-group kill), and stopping here would leave the calls the bot
    ends in its own shutdown undelivered until the next start, or for ever on a disk that
    goes with the container. The bot's exit closes the pipe; a SIGKILL still ends it.
    """
    loop = asyncio.get_running_loop()
    parent_gone = asyncio.Event()

    class ParentPipe(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            drainer.wake()

        def eof_received(self) -> bool:
            parent_gone.set()
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            parent_gone.set()

    try:
        await loop.connect_read_pipe(ParentPipe, sys.stdin.buffer)
    except (ValueError, OSError) as exc:
        fail(f"--parent-pipe needs stdin to be a pipe ({exc})")

    async def until_parent_gone() -> None:
        await parent_gone.wait()
        stop.set()

    watcher = asyncio.create_task(until_parent_gone())
    try:
        await drainer.run_forever(stop)
    finally:
        watcher.cancel()
    if parent_gone.is_set():  # deliver what the parent left, bounded, then exit 0
        started = time.monotonic()
        await _wait_for_writer_children(drainer.directory, last_pass_s / 2)
        await drainer.run_once(budget_s=last_pass_s - (time.monotonic() - started))


WRITER_POLL_S = 0.1
"""How often the last pass looks again whether a dead bot's writer child is done."""


async def _wait_for_writer_children(directory: Path, budget_s: float) -> None:
    """Wait, at most ``budget_s``, for the writer child of a dead bot to finish.

    A bot killed with ``writer_process=True`` leaves its writer child committing what
    was still in its pipe (``owner_lock``); until it exits, its calls are not ended, so
    the last pass would leave them open for the next drainer. Waiting here delivers them
    whole now.
    """
    from ..drain_housekeeping import calls_awaiting_writers

    said = False
    try:
        with reading(directory) as conn:
            for _ in range(max(1, round(budget_s / WRITER_POLL_S))):
                awaiting = calls_awaiting_writers(conn, directory)
                if not awaiting:
                    return
                if not said:
                    err.print(
                        f"waiting up to {budget_s:g} s for the writer process of call(s) "
                        f"{shown(', '.join(awaiting[:5]))} to commit what the bot left it"
                    )
                    said = True
                await asyncio.sleep(WRITER_POLL_S)
    except (OSError, sqlite3.Error, StoreError) as exc:  # the last pass meets it and says so
        err.print(f"could not look for writer processes still at work ({shown(exc)})")


class _Progress:
    """A rich progress bar on a terminal (rows, calls, chunks, MB, MB/s, ETA).

    Nothing otherwise: a summary line follows.
    """

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
