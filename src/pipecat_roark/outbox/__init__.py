"""The outbox: the SQL of delivery rows, claimed with leases by any number of drainers.

A row is ``pending → leased → delivered``, or ``dead`` with its last error. Leases,
not locks: a drainer claims rows with one conditional UPDATE inside ``BEGIN
IMMEDIATE``, so two live drainers never hold the same row, and a crashed drainer's
rows become claimable again when its lease expires (the retry carries the same
idempotency key). Every outcome is written only while we still hold the lease.

One package owns every statement on the ``deliveries`` table: ``rows`` (enqueue,
claim, settle), ``leases`` (who holds a row; the leases of dead owners) and ``reads``
(what inspection, maintenance and the CLI ask). A statement lives with the table its
outermost ``FROM``, ``INTO`` or ``UPDATE`` names: the outbox may JOIN ``calls`` or
``chunks`` in a statement on rows, and writes no other table (``tests/test_table_owners.py``).
"""

from .leases import (
    lease_owner_id,
    release_dead_owners,
    release_process_leases,
)
from .reads import (
    DeliveryRow,
    call_deliveries,
    calls_delivered_with_note,
    count_for_call,
    counts_by_kind_and_state,
    earliest_untouched_due_at,
    last_undelivered_error,
    make_due_again,
    oldest_queued_at,
    queued_count,
    undelivered_audio_bytes,
    undelivered_chunk_files,
    undelivered_counts,
)
from .rows import (
    Delivery,
    claim,
    enqueue_call_ended,
    enqueue_call_started,
    enqueue_chunk,
    mark_dead,
    mark_delivered,
    mark_retry,
    next_due,
    release,
    renew_leases,
)

__all__ = [
    "Delivery",
    "DeliveryRow",
    "call_deliveries",
    "calls_delivered_with_note",
    "claim",
    "count_for_call",
    "counts_by_kind_and_state",
    "earliest_untouched_due_at",
    "enqueue_call_ended",
    "enqueue_call_started",
    "enqueue_chunk",
    "last_undelivered_error",
    "lease_owner_id",
    "make_due_again",
    "mark_dead",
    "mark_delivered",
    "mark_retry",
    "next_due",
    "oldest_queued_at",
    "queued_count",
    "release",
    "release_dead_owners",
    "release_process_leases",
    "renew_leases",
    "undelivered_audio_bytes",
    "undelivered_chunk_files",
    "undelivered_counts",
]
