"""How a drainer delivers: concurrency, leases, retries, backoff, retention.

One frozen value per drainer, so the claim loop, each row's delivery and the
housekeeping read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .owner import orphan_grace_s

__all__ = ["DrainPolicy"]


@dataclass(frozen=True)
class DrainPolicy:
    concurrency: int = 8
    lease_s: float = 60.0
    max_attempts: int = 20
    max_age_s: float = 72 * 3600.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    retry_after_cap_s: float = 3600.0
    orphan_grace_s: float = field(default_factory=orphan_grace_s)
    """Heartbeat age after which a call of a process outside our PID namespace is ended
    (``PIPECAT_ROARK_ORPHAN_GRACE_S``, default 20 s)."""
    auth_probe_s: float = 300.0
    poll_s: float = 1.0
    request_timeout_s: float = 30.0
    """Longest wait for a connection or for the next bytes of an answer."""
    retention_s: float = 7 * 86400.0
    claim_batch: int = 4
    prune_every_s: float = 3600.0
    keep_delivered_audio: bool = False
    """Keep chunk files once Roark has the whole call (by default they are deleted then)."""

    @property
    def request_deadline_s(self) -> float:
        """One whole request (connect, send, answer read) must end within this: below
        half the lease, so a request never outlives the lease it was sent under."""
        return min(self.request_timeout_s, self.lease_s * 0.4)
