"""Which process owns a call, and whether that process is still alive.

A pid alone is not an identity (pids are reused), so an owner is host + pid + the
process's start time as the kernel reports it. On another host, or where /proc is
missing, only the heartbeat can tell.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Owner", "current_owner", "owner_is_gone"]


@dataclass(frozen=True, slots=True)
class Owner:
    host: str
    pid: int
    token: str


def _start_ticks(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the parenthesised command name, which may hold spaces.
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, f"{pid}:{_start_ticks(pid) or 'na'}")


def owner_is_gone(host: str, pid: int, token: str) -> bool | None:
    """True: the owner is certainly dead. False: alive. None: cannot tell (other host)."""
    if host != socket.gethostname():
        return None
    ticks = _start_ticks(pid)
    if ticks is not None:
        return token != f"{pid}:{ticks}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    except OSError:
        return None
    # Alive, but without /proc we cannot tell a reused pid from the owner.
    return False if token.endswith(":na") else None
