"""Who holds a row's lease, and giving back the leases of processes that are gone.

(Ending the calls of a process that is gone is ``call_ending``'s: it is about calls.)
"""

from __future__ import annotations

import sqlite3

from ..owner import Owner, owner_is_gone, parse_identity
from .rows import release

__all__ = [
    "lease_owner_id",
    "release_dead_owners",
    "release_process_leases",
]


def lease_owner_id(owner: Owner, instance: str) -> str:
    """The lease owner a drainer writes on the rows it claims.

    It names its process (with the identity that makes its pid meaningful), so a checker
    in the same PID namespace can take a dead process's leases back early.

    Returns:
        ``host|pid|owner token|instance``.
    """
    return f"{owner.host}|{owner.pid}|{owner.token}|{instance}"


def release_process_leases(conn: sqlite3.Connection, owner: Owner) -> int:
    """At exit, every lease this process still holds goes back.

    A drainer cancelled while its claim was in flight leaves one behind, and the exit
    drain must not wait out a lease of its own process (on an ephemeral disk, that row
    would be lost).

    Returns:
        How many rows were handed back.
    """
    mine = parse_identity(owner.token)
    released = 0
    for (lease_owner,) in conn.execute(
        "SELECT DISTINCT lease_owner FROM deliveries WHERE state = 'leased'"
    ).fetchall():
        parts = str(lease_owner).split("|")
        if len(parts) != 4 or parts[:2] != [owner.host, str(owner.pid)]:
            continue
        theirs = parse_identity(parts[2])
        same = parts[2] == owner.token or (
            mine is not None
            and theirs is not None
            and (theirs.boot_id, theirs.pid_ns, theirs.start)
            == (mine.boot_id, mine.pid_ns, mine.start)
        )
        if same:
            released += release(conn, str(lease_owner))
    return released


def release_dead_owners(conn: sqlite3.Connection) -> int:
    """Leases of drainers certainly dead go back at once, not at expiry.

    Certainly dead means judged by pid from inside the drainer's own PID namespace on
    the same boot; a drainer anywhere else (another container of the pod, another host)
    keeps its leases until they expire, the lease being its heartbeat.

    Returns:
        How many rows were handed back.
    """
    owners = [
        r[0]
        for r in conn.execute("SELECT DISTINCT lease_owner FROM deliveries WHERE state = 'leased'")
    ]
    released = 0
    for lease_owner in owners:
        parts = str(lease_owner).split("|")
        if len(parts) != 4 or not parts[1].isdigit():
            continue
        if owner_is_gone(parts[0], int(parts[1]), parts[2]) is True:
            released += release(conn, lease_owner)
    return released
