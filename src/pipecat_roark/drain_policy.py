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
    """The numbers one drainer runs by; the defaults follow OpenTelemetry's exporters.

    Attributes:
        concurrency: rows delivered at once.
        lease_s: how long a claimed row is ours before another drainer may take it.
        max_attempts: attempts before a row is dead (kept, inspectable and retryable).
        max_age_s: age of a row past which a failed attempt makes it dead.
        backoff_base_s: the first retry's backoff ceiling, doubled per attempt (full jitter).
        backoff_cap_s: the longest backoff ceiling.
        retry_after_cap_s: the longest server-requested wait (Retry-After) we honour.
        auth_probe_s: how often a key Roark refused is tried again.
        poll_s: the longest sleep between looks for new rows.
        retention_s: how long delivered calls are kept before pruning.
        claim_batch: rows claimed per statement.
        prune_every_s: how often a long-running drainer prunes.
    """

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
        """One whole request (connect, send, answer read) must end within this.

        It stays below half the lease, so a request never outlives the lease it was sent
        under.
        """
        return min(self.request_timeout_s, self.lease_s * 0.4)
