"""Prometheus counters and histograms of what this process did, for an operator to graph.

Deliveries, failures by class, request latency, bytes, calls finalized and writer commits
live in prometheus-client's default registry, so a bot that already serves its own
``/metrics`` shows ours too. The writer and the drainer count here; this module imports
nothing of theirs. The scrape side (the queue's state read at scrape time, and the
endpoint) is ``metrics_endpoint``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from .timeline import DEFAULT_RECOVERY_REASON

__all__ = [
    "CALLS_FINALIZED",
    "DELIVERED_BYTES",
    "DELIVERIES",
    "DELIVERY_FAILURES",
    "REQUEST_SECONDS",
    "WRITER_COMMIT_SECONDS",
    "finalized",
]

DELIVERIES = Counter("pipecat_roark_deliveries_total", "Rows Roark accepted, by kind.", ["kind"])
DELIVERY_FAILURES = Counter(
    "pipecat_roark_delivery_failures_total",
    "Failed delivery attempts, by kind and failure class (retryable, auth, dead).",
    ["kind", "failure"],
)
REQUEST_SECONDS = Histogram(
    "pipecat_roark_request_duration_seconds",
    "Duration of each request to Roark or object storage, by request.",
    ["request"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
DELIVERED_BYTES = Counter("pipecat_roark_delivered_bytes_total", "Recording bytes Roark accepted.")
CALLS_FINALIZED = Counter(
    "pipecat_roark_calls_finalized_total",
    "Calls ended by this process, by end reason (unusual reasons count as 'other').",
    ["reason"],
)
WRITER_COMMIT_SECONDS = Histogram(
    "pipecat_roark_writer_commit_duration_seconds",
    "Duration of each group commit of the writer (chunk files, then one transaction).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

_KNOWN_REASONS = frozenset(
    {
        "agent-ended",
        "unknown",
        "client-disconnected",
        "session-vanished",
        "process-exit",
        DEFAULT_RECOVERY_REASON,
    }
)


def finalized(reason: str) -> None:
    """Count a call that ended; free-form reasons are folded so labels stay few."""
    CALLS_FINALIZED.labels(reason if reason in _KNOWN_REASONS else "other").inc()
