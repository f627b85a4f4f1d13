"""Calls whose pipeline never says they ended: the process exits, or the host shuts down.

SIGTERM follows the host. A host with a graceful shutdown of its own (uvicorn, which
Pipecat's development runner serves through; ``WorkerRunner(handle_sigterm=True)``; any
handler installed before our first observer) decides what SIGTERM means: its calls go on
recording until their pipeline ends, a call that ends during that shutdown waits (bounded)
for its own delivery, and whatever is still open when the interpreter really exits is
finalized (reason ``process-exit``) and drained by the atexit hook. Only where nobody
handles SIGTERM (Pipecat Cloud stops containers with it, and its disk goes with them) do
we end every open call ourselves, run the bounded final drain and still die of SIGTERM,
as the process would have without us.

Nothing takes a lock inside the signal handler: it writes one byte to a pipe. A thread
started with the hook does the work, with the writers each observer already holds (never
``writer_for``, whose lock the interrupted main thread may hold, e.g. while it migrates
another data directory), and if the main thread is stuck in C code the process still
leaves within a second of the drain.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from loguru import logger

__all__ = [
    "DEFAULT_EXIT_DRAIN_S",
    "deliver_before_exit",
    "host_is_shutting_down",
    "install_exit_hooks",
    "register",
    "run_final_drain",
]

DEFAULT_EXIT_DRAIN_S = 5.0
_FINALIZE_COMMIT_S = 2.0
_REKILL_WAIT_S = 1.0
"""After the final drain: how long the main thread gets to die of the re-raised SIGTERM
before the process leaves with status 143 anyway (the main thread is stuck in C code)."""


class Flushable(Protocol):
    def flush_sync(self, timeout: float) -> bool:
        """Block until everything queued so far is committed (or ``timeout``)."""


class EndsAbruptly(Protocol):
    def end_abruptly(self, reason: str) -> Flushable | None:
        """Finalize now without awaiting; return the writer to flush if the call was open."""


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_DELIVERY_TARGETS: dict[tuple[Path, str], tuple[str, str | None, float, bool]] = {}
"""(directory, key) → (key, base URL, exit drain limit, keep delivered audio)."""
_LOCK = threading.Lock()
_atexit_installed = False
_wake: tuple[int, int] | None = None
"""(pid, write end of the pipe) the SIGTERM handler wakes the shutdown thread through. The
pid: a forked child inherits the handler and the pipe but not the thread, and must never
wake its parent's."""
_ready_to_die = False
_host_shutdown = False


def register(
    observer: EndsAbruptly,
    *,
    api_key: str | None,
    base_url: str | None,
    directory: Path,
    exit_drain_s: float,
    keep_delivered_audio: bool = False,
) -> None:
    """Track an observer so process exit can finalize its call and drain what it recorded."""
    with _LOCK:
        _LIVE.add(observer)
        if api_key and exit_drain_s > 0:
            _DELIVERY_TARGETS[(directory, api_key)] = (
                api_key,
                base_url,
                exit_drain_s,
                keep_delivered_audio,
            )


def host_is_shutting_down() -> bool:
    """A host that handles SIGTERM itself got one: calls ending now deliver before exit."""
    return _host_shutdown


def install_exit_hooks() -> None:
    """atexit once per process; and on every new observer (main thread only), look again
    at who handles SIGTERM: a runner may have come and gone since the last call."""
    global _atexit_installed
    with _LOCK:
        first = not _atexit_installed
        _atexit_installed = True
    if first:
        atexit.register(_on_exit)  # runs before the writers' own atexit close (LIFO)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is None or current is signal.SIG_IGN or getattr(current, "_pipecat_roark", False):
        if current is _on_sigterm:  # ours, maybe inherited by a forked child: its own thread
            _start_shutdown_thread()
        return  # a handler outside Python's reach, ignored on purpose, or ours already
    try:
        if current is signal.SIG_DFL:
            _start_shutdown_thread()
            signal.signal(signal.SIGTERM, _on_sigterm)
        elif callable(current):
            signal.signal(signal.SIGTERM, _chain_to_host(current))
    except (ValueError, OSError, RuntimeError) as exc:  # an embedded runtime, no threads
        logger.debug(f"pipecat-roark: SIGTERM hook not installed: {exc}")


def _chain_to_host(host: Callable[[int, FrameType | None], Any]) -> Callable[..., Any]:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        global _host_shutdown
        _host_shutdown = True  # no lock: one store, read by observers as their calls end
        host(signum, frame)

    on_sigterm._pipecat_roark = True  # type: ignore[attr-defined]
    return on_sigterm


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Nobody else handles SIGTERM: wake the shutdown thread, or die once it is done."""
    wake = _wake
    if _ready_to_die or wake is None or wake[0] != os.getpid():  # done, or no thread here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    with contextlib.suppress(OSError):  # a full pipe: the thread is awake already
        os.write(wake[1], b"\0")


_on_sigterm._pipecat_roark = True  # type: ignore[attr-defined]


def _start_shutdown_thread() -> None:
    global _wake
    if _wake is not None and _wake[0] == os.getpid():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    threading.Thread(
        target=_shutdown_on_wake, args=(read_fd,), name="pipecat-roark-sigterm", daemon=True
    ).start()
    _wake = (os.getpid(), write_fd)


def _shutdown_on_wake(read_fd: int) -> None:
    global _ready_to_die
    try:
        os.read(read_fd, 1)
    except OSError:
        return
    logger.info("pipecat-roark: SIGTERM and no host handles it: ending open calls")
    try:
        _finalize_open_calls("process-exit")
        run_final_drain()
        _finalize_open_calls("process-exit")  # calls that started during the drain
    except Exception as exc:  # the process must still go
        logger.error(f"pipecat-roark: shutting down after SIGTERM failed: {exc}")
    finally:
        _ready_to_die = True
        main = threading.main_thread().ident
        if main is not None:  # to that thread: a signal to the process may land in this one
            signal.pthread_kill(main, signal.SIGTERM)  # its handler re-raises it, unhandled
        time.sleep(_REKILL_WAIT_S)
        os._exit(128 + signal.SIGTERM)


def _on_exit() -> None:
    _finalize_open_calls("process-exit")
    run_final_drain()


def _finalize_open_calls(reason: str) -> None:
    with _LOCK:
        observers = list(_LIVE)
    writers: list[Flushable] = []
    for observer in observers:
        try:
            writer = observer.end_abruptly(reason)
        except Exception as exc:
            logger.error(f"pipecat-roark: could not finalize a call at exit: {exc}")
            continue
        if writer is not None and all(writer is not w for w in writers):
            writers.append(writer)
    for writer in writers:
        try:
            writer.flush_sync(_FINALIZE_COMMIT_S)
        except Exception as exc:
            logger.error(f"pipecat-roark: could not commit calls at exit: {exc}")


def run_final_drain() -> None:
    """Deliver what this process recorded, bounded by each observer's ``exit_drain_s``.

    Runs in a thread of its own with a fresh event loop: the bot's loop may be gone, or
    blocked in the main thread, and neither may be touched.
    """
    with _LOCK:
        targets = list(_DELIVERY_TARGETS.items())
        _DELIVERY_TARGETS.clear()
    if not targets:
        return
    budget = max(limit for _, (_, _, limit, _) in targets)
    deadline = time.monotonic() + budget

    def drain_all() -> None:
        asyncio.run(_drain_targets(targets, deadline))

    thread = threading.Thread(target=drain_all, name="pipecat-roark-exit-drain", daemon=True)
    thread.start()
    thread.join(budget + 0.5)
    if thread.is_alive():
        logger.warning(
            f"pipecat-roark: the final drain did not finish within {budget:.0f} s; what is left "
            "stays on disk for `pipecat-roark drain` (mount a volume on ephemeral containers)"
        )


async def _drain_targets(
    targets: list[tuple[tuple[Path, str], tuple[str, str | None, float, bool]]], deadline: float
) -> None:
    from .drain import (
        Drainer,
        DrainPolicy,
    )  # here: the observer imports us, the drainer imports the writer

    for (directory, _), (api_key, base_url, _limit, keep) in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            _release_leases_of_this_process(directory)
            policy = DrainPolicy(keep_delivered_audio=keep)
            drainer = Drainer(directory, api_key, base_url, policy, inline_db=True)
            await drainer.run_once(budget_s=remaining)
        except Exception as exc:
            logger.error(f"pipecat-roark: final drain of {directory} failed: {exc}")


def _release_leases_of_this_process(directory: Path) -> None:
    """The process's own drainers are gone or stuck: what they held is the exit drain's now
    (a row they did send goes again with the same idempotency key)."""
    from .outbox import release_process_leases
    from .owner import current_owner
    from .store import connect

    conn = connect(directory)
    try:
        released = release_process_leases(conn, current_owner())
    finally:
        conn.close()
    if released:
        logger.debug(f"pipecat-roark: the exit drain took back {released} lease(s) of this process")


async def deliver_before_exit(
    directory: Path,
    api_key: str,
    base_url: str | None,
    call_id: str,
    limit_s: float,
    *,
    keep_delivered_audio: bool = False,
) -> None:
    """A call ended while its host shuts down: deliver it now, bounded, in this loop.

    A host like uvicorn restores the default SIGTERM action once its requests are done
    and re-raises the signal, so the process may die without running atexit.
    """
    from .drain import Drainer, DrainPolicy

    if limit_s <= 0:
        return
    try:
        policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
        drainer = Drainer(directory, api_key, base_url, policy)
        await asyncio.wait_for(drainer.run_once(call_id=call_id, budget_s=limit_s), limit_s)
    except Exception as exc:  # TimeoutError included: what is left stays on disk
        logger.warning(
            f"pipecat-roark: call {call_id} was not fully delivered before shutdown ({exc!r}); "
            "it stays on disk for `pipecat-roark drain`"
        )
