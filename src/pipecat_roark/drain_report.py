"""What one drain did, and what is left: the drainer fills it in, the CLI shows it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DrainReport"]


@dataclass
class DrainReport:
    """What one drain did, and what is left."""

    delivered: int = 0
    chunks: int = 0
    bytes: int = 0
    retried: int = 0
    dead: int = 0
    calls: set[str] = field(default_factory=set)
    finalized: list[str] = field(default_factory=list)
    skipped_calls: list[str] = field(default_factory=list)
    """Calls with undelivered rows recorded under another API key."""
    paused: bool = False
    pending: int = 0
    """Rows of ours still undelivered when the drain stopped (backing off, or paused)."""
    dead_total: int = 0
    last_error: str | None = None
    out_of_time: bool = False
    """The drain's budget ran out with work still in hand."""

    @property
    def complete(self) -> bool:
        """Nothing of ours is left undelivered or dead, and the key is not paused."""
        return self.pending == 0 and self.dead_total == 0 and not self.paused

    def as_json(self) -> dict[str, Any]:
        """The report as ``pipecat-roark drain --json`` prints it (camelCase keys).

        Returns:
            The counts, lists and flags as JSON-ready values (``complete`` included).
        """
        return {
            "delivered": self.delivered,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "retried": self.retried,
            "dead": self.dead,
            "pending": self.pending,
            "deadTotal": self.dead_total,
            "finalized": self.finalized,
            "skippedCalls": self.skipped_calls,
            "paused": self.paused,
            "lastError": self.last_error,
            "complete": self.complete,
        }

    def __str__(self) -> str:
        parts = [
            f"{self.delivered} delivered ({self.chunks} chunks, {self.bytes / 1e6:.2f} MB)",
            f"{self.retried} retried",
            f"{self.dead} dead",
            f"{self.pending} pending",
        ]
        if self.finalized:
            parts.append(f"{len(self.finalized)} orphaned call(s) finalized")
        if self.skipped_calls:
            parts.append(f"{len(self.skipped_calls)} call(s) of another key skipped")
        if self.paused:
            parts.append("deliveries paused: Roark refused the API key")
        if self.out_of_time:
            parts.append("stopped at the time budget (run drain again to go on)")
        return ", ".join(parts)
