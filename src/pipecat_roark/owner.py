"""Which process owns a call, and who may judge whether that process is still alive.

A pid means something only inside its own PID namespace, on the boot it was taken on:
the containers of one Kubernetes pod share a hostname and a volume but not their pids,
and two containers on one host can both be pid 1. So an owner identity records what
makes its pid meaningful: the boot id, the PID-namespace inode, the process start time
(pids are reused), the heartbeat interval it promises, and, for people reading
``pipecat-roark show``, the container id where one can be read.

Only a checker on the same boot, in the same PID namespace, with a /proc of that
namespace, judges by pid. Everyone else (another container, another host, an old row
whose identity lacks these facts) judges by heartbeat age alone.

A dead pid is not yet the end of its calls where a writer child recorded them for it
(``writer_process=True``): the child may still be committing. It holds the owner's lock
while it lives (``owner_lock``), and the drainer asks about that too
(``drain_housekeeping``), since the lock lives in a data directory and this judges a pid.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from loguru import logger

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_ORPHAN_GRACE_S",
    "ENV_HEARTBEAT_S",
    "ENV_ORPHAN_GRACE_S",
    "Identity",
    "Owner",
    "current_owner",
    "effective_grace_us",
    "heartbeat_interval_s",
    "orphan_grace_s",
    "owner_is_gone",
    "parse_identity",
]

ENV_HEARTBEAT_S = "PIPECAT_ROARK_HEARTBEAT_S"
ENV_ORPHAN_GRACE_S = "PIPECAT_ROARK_ORPHAN_GRACE_S"
DEFAULT_HEARTBEAT_S = 5.0
"""How often a recording process marks its open calls alive."""
DEFAULT_ORPHAN_GRACE_S = 20.0
"""How old a heartbeat may get before a checker outside the owner's namespace ends the call."""
MISSED_HEARTBEATS = 3
"""A grace shorter than this many of the owner's own heartbeat intervals is stretched to it."""

_VERSION = "v2"
_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")


@dataclass(frozen=True, slots=True)
class Identity:
    """What an owner token says (``v2:<boot>:<pidns>:<start>:<heartbeat ms>:<container>``)."""

    boot_id: str
    pid_ns: str
    start: str
    heartbeat_ms: int
    container: str

    def token(self) -> str:
        """The identity as the owner token stored on a call's row.

        Returns:
            ``v2:<boot>:<pidns>:<start>:<heartbeat ms>:<container>``, read by ``parse_identity``.
        """
        return ":".join(
            (
                _VERSION,
                self.boot_id,
                self.pid_ns,
                self.start,
                str(self.heartbeat_ms),
                self.container,
            )
        )


@dataclass(frozen=True, slots=True)
class Owner:
    """The process recording a call, as stored on its row.

    Host and pid are for people to read; the token (an ``Identity``) is for judging
    whether the process is gone.
    """

    host: str
    pid: int
    token: str


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _stat(pid: int | str) -> tuple[str, str] | None:
    """State and start time of a pid, from this process's /proc.

    Returns:
        The state letter and the start time in clock ticks since boot, or None when the
        pid has no readable stat.
    """
    raw = _read(f"/proc/{pid}/stat")
    # Fields after the parenthesised command name, which may hold spaces and parentheses.
    fields = raw[raw.rfind(")") + 2 :].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


@cache
def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_ns() -> str:
    """The inode of this process's PID namespace (``pid:[4026531836]`` → ``4026531836``).

    Returns:
        The inode number as text, or ``""`` when it cannot be read.
    """
    try:
        link = str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return ""
    found = re.fullmatch(r"pid:\[(\d+)\]", link)
    return found.group(1) if found else ""


def _proc_is_ours() -> bool:
    """Whether /proc shows this PID namespace (a container may mount the host's /proc).

    Returns:
        True when ``/proc/self`` names this process's own pid.
    """
    try:
        return str(Path("/proc/self").readlink()) == str(os.getpid())
    except OSError:
        return False


@cache
def _container_id() -> str:
    """This process's container id, for people reading ``show``.

    Docker, containerd and CRI-O name the 64-hex container id in cgroup or mount paths.

    Returns:
        The first such id found, or ``""`` outside a container.
    """
    lines = _read("/proc/self/cgroup").splitlines() + [
        line for line in _read("/proc/self/mountinfo").splitlines() if "/containers/" in line
    ]
    for line in lines:
        found = _CONTAINER_ID.search(line)
        if found:
            return found.group(1)
    return ""


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        logger.error(
            f"pipecat-roark: {name}={raw!r} is not a number of seconds between 0 and 86400; "
            f"using {default:g}. Fix or unset {name}"
        )
        return default
    return value


def heartbeat_interval_s() -> float:
    """``PIPECAT_ROARK_HEARTBEAT_S``, else 5 s: read when a process's writer starts.

    Returns:
        Seconds between heartbeats; an invalid setting is logged and the default used.
    """
    return _seconds_from_env(ENV_HEARTBEAT_S, DEFAULT_HEARTBEAT_S)


def orphan_grace_s() -> float:
    """``PIPECAT_ROARK_ORPHAN_GRACE_S``, else 20 s: the default of ``DrainPolicy``.

    Returns:
        Seconds of heartbeat silence before a call is ended; an invalid setting is
        logged and the default used.
    """
    return _seconds_from_env(ENV_ORPHAN_GRACE_S, DEFAULT_ORPHAN_GRACE_S)


def current_owner(heartbeat_s: float | None = None) -> Owner:
    """Who this process is, to stamp on the calls it records.

    Args:
        heartbeat_s: the heartbeat interval this process promises; None reads
            ``heartbeat_interval_s()``.

    Returns:
        This host and pid, with a token that lets a checker in the same PID namespace
        judge the pid and tells everyone else how long a silence to allow.
    """
    pid = os.getpid()
    stat = _stat("self")
    identity = Identity(
        boot_id=_boot_id(),
        pid_ns=_pid_ns(),
        start=stat[1] if stat else "na",
        heartbeat_ms=round(1000 * (heartbeat_s or heartbeat_interval_s())),
        container=_container_id(),
    )
    return Owner(socket.gethostname(), pid, identity.token())


def parse_identity(token: str) -> Identity | None:
    """The identity in an owner token.

    Returns:
        The parsed identity, or None for tokens written before it existed.
    """
    parts = token.split(":")
    if len(parts) != 6 or parts[0] != _VERSION or not parts[4].isdigit():
        return None
    return Identity(parts[1], parts[2], parts[3], int(parts[4]), parts[5])


def effective_grace_us(token: str, grace_us: int) -> int:
    """The grace, never shorter than a few of the owner's own heartbeat intervals.

    A bot configured with slower heartbeats than a sidecar expects must not lose its calls.

    Returns:
        ``grace_us``, or ``MISSED_HEARTBEATS`` of the owner's heartbeats if that is longer.
    """
    identity = parse_identity(token)
    if identity is None:
        return grace_us
    return max(grace_us, MISSED_HEARTBEATS * identity.heartbeat_ms * 1000)


def owner_is_gone(host: str, pid: int, token: str) -> bool | None:
    """Whether a call's owner process is gone, judged by pid where that means something.

    ``host`` is kept for display only: equal hostnames prove nothing (pods, compose).

    Returns:
        True: the owner is certainly dead. False: alive. None: not ours to judge by pid
        (another boot or PID namespace, an old token, or a pid we cannot tell apart), so
        heartbeat age decides.
    """
    del host
    identity = parse_identity(token)
    if (
        identity is None
        or not identity.boot_id
        or not identity.pid_ns
        or identity.boot_id != _boot_id()
        or identity.pid_ns != _pid_ns()
    ):
        return None
    if _proc_is_ours():
        stat = _stat(pid)
        if stat is None:
            return True
        state, start = stat
        if state in ("Z", "X"):  # killed, not yet reaped by its parent
            return True
        if identity.start != "na":
            return start != identity.start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return None
    # Alive, but without its start time a reused pid cannot be told from the owner.
    return None
