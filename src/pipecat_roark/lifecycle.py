"""Calls whose pipeline never says they ended: the process exits, or the session vanishes.

Pipecat Cloud stops a container with SIGTERM and its disk goes with it, so on the way out
every open call is finalized (reason ``process-exit``) and a bounded final drain runs.
This never hangs the shutdown and never swallows the host's own signal handling: a
handler the host installed still runs after ours, and with no handler the process still
dies of SIGTERM, as it would have without us.
"""

from __future__ import annotations

import asyncio
import atexit
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

from .writer import writer_for

__all__ = ["DEFAULT_EXIT_DRAIN_S", "install_exit_hooks", "register", "run_final_drain"]

DEFAULT_EXIT_DRAIN_S = 5.0
_FINALIZE_COMMIT_S = 2.0


class EndsAbruptly(Protocol):
    def end_abruptly(self, reason: str) -> tuple[Path, str | None, str | None] | None:
        """Finalize now without awaiting; return (directory, api key, base URL) if it was open."""


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()
_DELIVERY_TARGETS: dict[tuple[Path, str], tuple[str, str | None, float]] = {}
_LOCK = threading.Lock()
_installed = False
_exiting = False


def register(
    observer: EndsAbruptly,
    *,
    api_key: str | None,
    base_url: str | None,
    directory: Path,
    exit_drain_s: float,
) -> None:
    """Track an observer so process exit can finalize its call and drain what it recorded."""
    with _LOCK:
        _LIVE.add(observer)
        if api_key:
            _DELIVERY_TARGETS[(directory, api_key)] = (api_key, base_url, exit_drain_s)


def install_exit_hooks() -> None:
    """Once per process: atexit, and SIGTERM when nobody else handles it (main thread only)."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
    atexit.register(_on_exit)  # runs before the writers' own atexit close (LIFO)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return
    try:
        signal.signal(signal.SIGTERM, _make_sigterm_handler(previous))
    except (ValueError, OSError) as exc:  # not the main interpreter, or an embedded runtime
        logger.debug(f"pipecat-roark: SIGTERM hook not installed: {exc}")


def _make_sigterm_handler(previous: Any) -> Callable[[int, FrameType | None], None]:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        _finalize_open_calls("process-exit")
        if callable(previous):
            previous(signum, frame)  # the host's handler decides how to exit; atexit drains
            return
        run_final_drain()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    return on_sigterm


def _on_exit() -> None:
    _finalize_open_calls("process-exit")
    run_final_drain()


def _finalize_open_calls(reason: str) -> None:
    global _exiting
    if _exiting:
        return
    _exiting = True
    directories: set[Path] = set()
    for observer in list(_LIVE):
        try:
            ended = observer.end_abruptly(reason)
        except Exception as exc:
            logger.error(f"pipecat-roark: could not finalize a call at exit: {exc}")
            continue
        if ended is not None:
            directories.add(ended[0])
    for directory in directories:
        try:
            writer_for(directory).flush_sync(_FINALIZE_COMMIT_S)
        except Exception as exc:
            logger.error(f"pipecat-roark: could not commit calls in {directory} at exit: {exc}")


def run_final_drain() -> None:
    """Deliver what this process recorded, bounded by each observer's ``exit_drain_s``.

    Runs in a thread of its own with a fresh event loop: the bot's loop may be gone, or
    still running in this very thread (a signal handler), and neither may be touched.
    """
    with _LOCK:
        targets = list(_DELIVERY_TARGETS.items())
        _DELIVERY_TARGETS.clear()
    if not targets:
        return
    budget = max(limit for _, (_, _, limit) in targets)
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
    targets: list[tuple[tuple[Path, str], tuple[str, str | None, float]]], deadline: float
) -> None:
    from .drain import Drainer  # here: the observer imports us, the drainer imports the writer

    for (directory, _), (api_key, base_url, _limit) in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            await Drainer(directory, api_key, base_url, inline_db=True).run_once(budget_s=remaining)
        except Exception as exc:
            logger.error(f"pipecat-roark: final drain of {directory} failed: {exc}")
