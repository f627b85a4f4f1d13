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

Everything process-wide lives here, in one ``ProcessState`` (``PROCESS``): the writers,
the background drainers, the delivery children, the live observers and their delivery
settings, and the SIGTERM state; every registry is keyed by
``config.registry_key(directory)``. ``shut_down`` is the one shutdown order (finalize open
calls, flush their writers, stop the background drainers, the exit drain, close the
writers, then the delivery children's pipes), used by atexit, the SIGTERM thread and tests.

No API key is kept here. The exit drain asks each registered ``DeliveryTarget`` for its
key at exit time; a target is the observer's own ``CallDelivery`` (frozen, holding the
settings the observer was made with). Its reference here is strong on purpose: an
observer whose call ended and was collected before exit still has its rows drained at
exit, as its settings say. One target per data directory and key fingerprint: a later
observer's settings replace an earlier one's, and the exit drain forgets them once run.
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from loguru import logger

from . import config
from .drain import Drainer
from .exit_drain import DeliveryTarget, run_exit_drain
from .writer import Writer
from .writer_process import AnyWriter, ProcessWriter
from .writer_state import EXITING

__all__ = [
    "DEFAULT_EXIT_DRAIN_S",
    "PROCESS",
    "ProcessState",
    "RunningDrainer",
    "close_all_writers",
    "host_is_shutting_down",
    "install_exit_hooks",
    "register",
    "running_writer",
    "shut_down",
    "writer_for",
]

DEFAULT_EXIT_DRAIN_S = 5.0
_FINALIZE_COMMIT_S = 2.0
_CLOSE_WRITERS_S = 3.0
_REKILL_WAIT_S = 1.0
"""After the final drain: how long the main thread gets to die of the re-raised SIGTERM
before the process leaves with status 143 anyway (the main thread is stuck in C code)."""


class Flushable(Protocol):
    def flush_sync(self, timeout: float) -> bool:
        """Block until everything queued so far is committed (or ``timeout``)."""


class ClosesAtExit(Protocol):
    def close(self) -> None:
        """This process is shutting down: let go (never blocks, never raises)."""

    def left_in_fork(self) -> None:
        """In a forked copy of this process: close this copy's end of the child's pipe."""


class EndsAbruptly(Protocol):
    def end_abruptly(self, reason: str) -> Flushable | None:
        """Finalize now without awaiting; return the writer to flush if the call was open."""


@dataclass(frozen=True, slots=True)
class RunningDrainer:
    """A background drainer in the bot's loop: the task runs until ``stop`` is set."""

    drainer: Drainer
    task: asyncio.Task[None]
    stop: asyncio.Event

    def stop_from_any_thread(self) -> None:
        """Ask it to stop (leases handed back) from outside its loop; a closed loop: gone."""
        loop = self.task.get_loop()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            if not loop.is_closed() and not self.task.done():
                loop.call_soon_threadsafe(self.stop.set)


@dataclass
class ProcessState:
    """Every process-wide singleton of pipecat-roark, in one place."""

    writers: dict[Path, AnyWriter] = field(default_factory=dict)
    writers_lock: threading.Lock = field(default_factory=threading.Lock)
    """Only ``writer_for`` and ``close_all_writers`` take it (never the SIGTERM thread)."""
    drainers: dict[tuple[Path, str | None], RunningDrainer] = field(default_factory=dict)
    """By data directory and key fingerprint; touched only from event loops."""
    delivery_processes: dict[tuple[Path, str | None], ClosesAtExit] = field(default_factory=dict)
    """The delivery child of each data directory and key fingerprint (``delivery_process``),
    guarded by ``lock``; closed, so the child makes its last pass, at the end of shut_down."""
    observers: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    deliveries: dict[tuple[Path, str | None], DeliveryTarget] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``observers`` and ``deliveries``."""
    wake: tuple[int, int] | None = None
    """(pid, write end of the pipe) the SIGTERM handler wakes the shutdown thread through.
    The pid: a forked child inherits the handler and the pipe but not the thread, and must
    never wake its parent's."""
    ready_to_die: bool = False
    host_shutdown: bool = False
    call_ids: weakref.WeakValueDictionary[str, Any] = field(
        default_factory=weakref.WeakValueDictionary
    )
    """The call ids live sessions record under, guarded by ``lock``; a session that is
    garbage-collected lets go of its id by itself."""
    metrics_collector: Any = None
    """The queue collector registered with Prometheus (``metrics_endpoint``), once."""
    metrics_directories: set[Path] = field(default_factory=set)
    """The data directories the metrics endpoint reports, by ``config.registry_key``."""
    metrics_ports: dict[tuple[str, int], int] = field(default_factory=dict)
    """(address, asked port) → the port bound, so each endpoint is served once."""
    warned_missing_key: bool = False
    """The one warning that calls are recorded without an API key has been given."""


PROCESS = ProcessState()


def writer_for(directory: Path, *, process: bool = False, **kwargs: Any) -> AnyWriter:
    """The process's writer for ``directory``, started on first use.

    With ``process``, the first use starts a ``ProcessWriter`` (a writer child) instead of
    the writer thread; later uses get whichever the first one started.

    Returns:
        The one live writer of this process for that database.

    Raises:
        StoreError: the database cannot be opened (a subclass says why).
    """
    key = config.registry_key(directory)
    with PROCESS.writers_lock:
        writer = PROCESS.writers.get(key)
        if writer is None or not writer.alive:
            EXITING.clear()  # recording again: whatever exit set it is over (tests, embedders)
            writer = ProcessWriter(key, **kwargs) if process else Writer(key, **kwargs)
            PROCESS.writers[key] = writer
        return writer


def running_writer(directory: Path) -> AnyWriter | None:
    """This process's live writer for ``directory``, if one runs (never starts one).

    Returns:
        The writer, or None.
    """
    writer = PROCESS.writers.get(config.registry_key(directory))
    return writer if writer is not None and writer.alive else None


def claim_call_id(call_id: str, session: Any) -> bool:
    """Take ``call_id`` for ``session`` in this process.

    Two sessions recording under one id at once would interleave in one call; the
    writer cannot tell their records apart, so the second is refused here, in memory.

    Returns:
        False if another live session holds the id, True once ``session`` holds it.
    """
    with PROCESS.lock:
        holder = PROCESS.call_ids.get(call_id)
        if holder is not None and holder is not session:
            return False
        PROCESS.call_ids[call_id] = session
        return True


def release_call_id(call_id: str, session: Any) -> None:
    """Let go of ``call_id`` if ``session`` holds it (its call is over)."""
    with PROCESS.lock:
        if PROCESS.call_ids.get(call_id) is session:
            del PROCESS.call_ids[call_id]


def close_all_writers(timeout: float = 5.0) -> None:
    """Commit what every writer holds and stop them (interpreter exit, tests)."""
    with PROCESS.writers_lock:
        writers = list(PROCESS.writers.values())
        PROCESS.writers.clear()
    deadline = time.monotonic() + timeout
    for writer in writers:
        writer.close(max(0.1, deadline - time.monotonic()))


def register(observer: EndsAbruptly, delivery: DeliveryTarget) -> None:
    """Track an observer so process exit can finalize its call and drain what it recorded."""
    with PROCESS.lock:
        PROCESS.observers.add(observer)
        if delivery.deliver and delivery.api_key and delivery.exit_drain_s > 0:
            key = (
                config.registry_key(delivery.directory),
                config.key_fingerprint(delivery.api_key),
            )
            PROCESS.deliveries[key] = delivery


def shut_down(reason: str = "process-exit", *, close_writers: bool = True) -> None:
    """The one shutdown order, for atexit and the SIGTERM thread.

    Finalize open calls, flush their writers, stop the background drainers, run the
    exit drain, finalize calls that opened meanwhile, close the writers
    (``close_writers``: not from the SIGTERM thread, which never takes the writers'
    lock and leaves the process right after), and last, with everything committed,
    close the pipes of the delivery children: each makes its last pass and exits.
    """
    _finalize_open_calls(reason)
    for running in list(PROCESS.drainers.values()):
        running.stop_from_any_thread()
    with PROCESS.lock:
        targets = list(PROCESS.deliveries.values())
        PROCESS.deliveries.clear()
    run_exit_drain(targets)
    _finalize_open_calls(reason)  # calls that started during the drain
    if close_writers:
        close_all_writers(timeout=_CLOSE_WRITERS_S)
        EXITING.set()  # a writer still waiting for its disk gives up
    with PROCESS.lock:
        children = list(PROCESS.delivery_processes.values())
        PROCESS.delivery_processes.clear()
    for child in children:
        child.close()


def host_is_shutting_down() -> bool:
    """A host that handles SIGTERM itself got one: calls ending now deliver before exit.

    Returns:
        True once such a SIGTERM arrived.
    """
    return PROCESS.host_shutdown


def install_exit_hooks() -> None:
    """On every new observer (main thread only), look again at who handles SIGTERM.

    A runner may have come and gone since the last call. (atexit runs ``shut_down`` from
    this module's import on.)
    """
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
        PROCESS.host_shutdown = True  # no lock: one store, read by observers as their calls end
        host(signum, frame)

    on_sigterm._pipecat_roark = True  # type: ignore[attr-defined]
    return on_sigterm


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Nobody else handles SIGTERM: wake the shutdown thread, or die once it is done."""
    wake = PROCESS.wake
    if PROCESS.ready_to_die or wake is None or wake[0] != os.getpid():  # done, or no thread here
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    with contextlib.suppress(OSError):  # a full pipe: the thread is awake already
        os.write(wake[1], b"\0")


_on_sigterm._pipecat_roark = True  # type: ignore[attr-defined]


def _start_shutdown_thread() -> None:
    if PROCESS.wake is not None and PROCESS.wake[0] == os.getpid():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    threading.Thread(
        target=_shutdown_on_wake, args=(read_fd,), name="pipecat-roark-sigterm", daemon=True
    ).start()
    PROCESS.wake = (os.getpid(), write_fd)


def _shutdown_on_wake(read_fd: int) -> None:
    try:
        os.read(read_fd, 1)
    except OSError:
        return
    logger.info("pipecat-roark: SIGTERM and no host handles it: ending open calls")
    try:
        shut_down("process-exit", close_writers=False)
    except Exception as exc:  # the process must still go
        logger.error(f"pipecat-roark: shutting down after SIGTERM failed: {exc}")
    finally:
        PROCESS.ready_to_die = True
        main = threading.main_thread().ident
        if main is not None:  # to that thread: a signal to the process may land in this one
            signal.pthread_kill(main, signal.SIGTERM)  # its handler re-raises it, unhandled
        time.sleep(_REKILL_WAIT_S)
        os._exit(128 + signal.SIGTERM)


def _finalize_open_calls(reason: str) -> None:
    with PROCESS.lock:
        observers = list(PROCESS.observers)
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


def _let_go_in_fork() -> None:
    """A forked copy of the bot: its copies of its children's pipes are let go.

    The copy's threads did not come along: records given to it would wait for a sender
    that does not exist here, and its open pipes would keep a child (a writer child, a
    delivery child) from seeing the parent's end of input. ``writer_for`` starts the
    fork's own writer instead. (Pipes held only during a spawn: ``child_watch``.)
    """
    for writer in PROCESS.writers.values():
        if isinstance(writer, ProcessWriter):
            writer.left_in_fork()
    for child in PROCESS.delivery_processes.values():
        child.left_in_fork()


os.register_at_fork(after_in_child=_let_go_in_fork)
atexit.register(shut_down)
