"""What the writer thread keeps between batches: its counters and what it knows of calls.

Shared by the parts of the writer (``writer``, ``batch_commit``, ``op_apply``,
``chunk_spooler``, ``wal_file``), and touched only by the writer thread.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PipecatRoarkError
from .events import CallOpened
from .ops import CallOp, SpooledChunkOp

__all__ = ["EXITING", "CallBook", "CallIdReused", "OpenCall", "WriterStats", "reused"]

EXITING = threading.Event()
"""Set by ``lifecycle.shut_down`` once the writers are closed: a writer still waiting for its
disk gives up instead of waiting. It cannot go stale: ``lifecycle.writer_for`` clears it
when it starts a writer (the process records again), and a forked child starts clear."""
os.register_at_fork(after_in_child=EXITING.clear)


class CallIdReused(PipecatRoarkError):
    """A second session tried to record under a call id the database already holds."""


def reused(call_id: str, directory: Path) -> CallIdReused:
    """The refusal of a second session under ``call_id``, saying what to do.

    Returns:
        The error the op is dropped with, naming the call and the data directory.
    """
    return CallIdReused(
        f"call id {call_id!r} is already recorded in {directory}; this second session is "
        "not recorded and the earlier call is kept as it was. Give each call its own "
        "pipecat_call_id"
    )


@dataclass
class WriterStats:
    """Counters a benchmark or `doctor` can read; updated only by the writer thread."""

    batches: int = 0
    ops: int = 0
    events: int = 0
    chunks: int = 0
    max_batch: int = 0
    failed_batches: int = 0
    dropped_ops: int = 0
    retried_ops: int = 0
    restarts: int = 0
    reopened: int = 0
    """Times the database file was found deleted or replaced and a fresh one opened."""
    chunks_skipped: int = 0
    """Chunks not recorded: spool cap, free-space floor, a full disk or a failed write."""


@dataclass
class OpenCall:
    """What is needed to record a call again in a fresh database (its events are not kept)."""

    opened: CallOpened
    key_fp: str | None
    chunks: list[SpooledChunkOp] = field(default_factory=list)


@dataclass
class CallBook:
    """What the writer remembers of the calls it writes, by call id."""

    open_calls: dict[str, OpenCall] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    """Calls this transaction ended, by reason: counted in metrics once committed."""
    audio_stopped: set[str] = field(default_factory=set)
    audio_cut: dict[str, int] = field(default_factory=dict)
    """Per call, the first chunk admitted whose row was not recorded: a later chunk of the
    call already admitted (its file written while that row failed) must not be recorded
    either, or the call's audio has a gap."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Calls whose ops are dropped until their end: why (a reused id, a failed open)."""
    faults: dict[str, set[tuple[type[CallOp], str]]] = field(default_factory=dict)
    """Per open call, the (op kind, exception class) pairs that already cost a record."""
