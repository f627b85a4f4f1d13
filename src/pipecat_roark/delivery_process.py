"""Delivery from a child process: the bot's calls go out without the bot's GIL.

``RoarkObserver(delivery_process=True)``: instead of the background drainer in the bot's
event loop, the first observer of a (data directory, key) in this process starts one
``pipecat-roark drain --follow --parent-pipe`` child. The HTTP and the drainer's SQL then
cost the child's CPU, not the bot's loop. The bot only records, as with a sidecar, and
wakes the child on every commit that adds deliveries by writing one byte to its stdin
(non-blocking: a full pipe means a wake is already pending).

The key and base URL travel in the child's environment, never in its argv. The child
runs in a session of its own, so the terminal's Ctrl-C reaches only the bot, which ends
its calls and commits them before the child's last pass. When the bot exits (or dies of
SIGKILL) the pipe reaches EOF: the child makes one bounded pass (``drain --timeout``) and
exits. A thread reaps the child; if it exits while the bot lives, or cannot be started,
one line is logged and this process falls back to the in-loop background drainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from . import config
from .background_drainer import ensure_background_drainer
from .child_watch import HiddenFromForks
from .lifecycle import PROCESS, running_writer
from .metrics_endpoint import ENV_METRICS_PORT

__all__ = ["DeliveryProcess", "delivery_command", "ensure_delivery_process"]


def delivery_command(directory: Path, *, keep_delivered_audio: bool = False) -> list[str]:
    """The child's argv: no secret in it (the key goes in its environment).

    Returns:
        ``python -m pipecat_roark.cli drain --follow --parent-pipe --dir DIR`` with this
        interpreter.
    """
    argv = [sys.executable, "-m", "pipecat_roark.cli", "drain", "--follow", "--parent-pipe"]
    argv += ["--dir", str(directory)]
    return argv + (["--keep-delivered-audio"] if keep_delivered_audio else [])


@dataclass(eq=False)
class DeliveryProcess:
    """One delivery child of this process, for one data directory and key.

    Made in the bot's loop; started, woken, reaped and closed from other threads, so the
    pipe's write end is touched only under ``_lock`` (a closed descriptor number may be
    reused by any file: no byte may ever go to it).
    """

    directory: Path
    api_key: str = field(repr=False)  # never in a log line
    base_url: str | None
    keep_delivered_audio: bool
    loop: asyncio.AbstractEventLoop
    owner_pid: int = field(default_factory=os.getpid)
    """The process that started the child: a forked copy of the bot must not use it."""
    pid: int | None = field(default=None, init=False)
    failed: bool = field(default=False, init=False)
    """The child could not start, or exited while the bot lives: deliver in-loop instead."""
    cpu_s: float | None = field(default=None, init=False)
    """The child's CPU (user and system seconds), once it exited."""
    exited: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    """Set once the child exited and was reaped (or never started)."""
    _fd: int | None = field(default=None, init=False, repr=False)
    _closing: bool = field(default=False, init=False, repr=False)
    _warned_pipe: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def start(self) -> None:
        """Spawn the child in a daemon thread: never blocks the caller, never raises."""
        try:
            threading.Thread(
                target=self._run, name="pipecat-roark-delivery-spawn", daemon=True
            ).start()
        except Exception as exc:  # no thread to be had: deliver in-loop
            self._fall_back(f"the delivery process did not start ({exc})")
            self.exited.set()

    def wake(self) -> None:
        """A commit added deliveries (the writer thread): one byte to the child, never waiting."""
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake is already pending
            except OSError as exc:  # EPIPE: the child is gone; the reaper falls back
                if not self._warned_pipe:
                    self._warned_pipe = True
                    logger.warning(f"pipecat-roark: the delivery process cannot be woken ({exc})")

    def close(self) -> None:
        """This process is shutting down: EOF tells the child to make its last pass and exit."""
        with self._lock:
            self._closing = True
            fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def left_in_fork(self) -> None:
        """In a forked copy of the bot: close this copy of the pipe, use none of it.

        A copy left open would keep the child from seeing the bot's end (its exit, its
        SIGKILL) for as long as the fork lives. The parent's thread may hold ``_lock``:
        a fresh one here (the fork has one thread).
        """
        self._lock = threading.Lock()
        self._closing = True
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        """Spawn, wait, reap; whatever fails, the bot falls back to its in-loop drainer."""
        try:
            self._spawn_and_reap()
        except Exception as exc:
            self._fall_back(f"the delivery process failed ({exc})")
        finally:
            self.exited.set()

    def _spawn_and_reap(self) -> None:
        # The bot serves the metrics; a second bind of its port would stop the child.
        env = config.child_environment(drop=(ENV_METRICS_PORT, config.ENV_BASE_URL))
        env[config.ENV_API_KEY] = self.api_key
        env[config.ENV_BASE_URL] = config.resolve_base_url(self.base_url)
        try:
            child = subprocess.Popen(
                delivery_command(self.directory, keep_delivered_audio=self.keep_delivered_audio),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except Exception as exc:
            self._fall_back(f"the delivery process did not start ({exc})")
            return
        assert child.stdin is not None
        hidden = HiddenFromForks(child.stdin.fileno())  # until self._fd holds it
        fd = os.dup(child.stdin.fileno())
        hidden.add(fd)
        hidden.release(child.stdin.fileno())
        child.stdin.close()
        os.set_blocking(fd, False)
        with self._lock:
            closing = self._closing
            if not closing:
                self._fd, self.pid = fd, child.pid
        hidden.release()  # this object's now (``left_in_fork``), or closed just below
        writer = None if closing else running_writer(self.directory)
        if closing:  # shut down while it started: EOF at once
            os.close(fd)
        else:
            logger.info(
                f"pipecat-roark: delivering {self.directory} from process {child.pid} "
                f"(key {config.key_fingerprint(self.api_key)})"
            )
            if writer is not None:  # else the child still looks every poll_s
                writer.add_commit_listener(self.wake)
        code = self._reap(child)
        if writer is not None:
            writer.remove_commit_listener(self.wake)
        with self._lock:
            asked = self._closing  # this process shut down: the child's exit is expected
        self.close()
        if not asked:
            self._fall_back(f"the delivery process {child.pid} exited with status {code}")

    def _reap(self, child: subprocess.Popen[bytes]) -> int:
        """Wait for the child's exit (no zombie while the bot lives) and note its CPU.

        Returns:
            Its exit status (negative: killed by that signal).
        """
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): no usage to note
            return child.wait()
        child.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        logger.debug(
            f"pipecat-roark: the delivery process {child.pid} exited with status "
            f"{child.returncode} after {self.cpu_s:.2f} s of CPU"
        )
        return child.returncode

    def _fall_back(self, why: str) -> None:
        """Deliver from the bot's loop from now on; one line says why."""
        self.failed = True
        logger.error(f"pipecat-roark: {why}; delivering from this process's event loop instead")
        with contextlib.suppress(RuntimeError):  # the loop is closed: the next call falls back
            self.loop.call_soon_threadsafe(self._start_in_loop)

    def _start_in_loop(self) -> None:
        ensure_background_drainer(
            self.directory,
            self.api_key,
            self.base_url,
            keep_delivered_audio=self.keep_delivered_audio,
        )


def ensure_delivery_process(
    directory: Path, api_key: str, base_url: str | None, *, keep_delivered_audio: bool = False
) -> None:
    """Deliver ``directory`` with this key from a child process, started once per process.

    The first observer's settings hold for the child's life. If the child failed, this
    process's background drainer delivers instead. Never raises and never blocks.
    """
    try:
        key = (config.registry_key(directory), config.key_fingerprint(api_key))
        with PROCESS.lock:
            current = PROCESS.delivery_processes.get(key)
            if isinstance(current, DeliveryProcess) and current.owner_pid == os.getpid():
                failed = current.failed
            else:
                child = DeliveryProcess(
                    directory, api_key, base_url, keep_delivered_audio, asyncio.get_running_loop()
                )
                PROCESS.delivery_processes[key] = child
                failed = False
                child.start()
        if failed:
            ensure_background_drainer(
                directory, api_key, base_url, keep_delivered_audio=keep_delivered_audio
            )
    except Exception as exc:
        logger.error(
            f"pipecat-roark: the delivery process did not start ({exc}); run `pipecat-roark drain`"
        )
