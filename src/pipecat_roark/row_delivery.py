"""One row's delivery: load, assemble, send, classify the outcome, mark it.

``RowDelivery.deliver`` is the one boundary per row: whatever goes wrong with a row
counts as an attempt of that row alone, retried with backoff or dead with its reason,
and never reaches the other rows. Delivered rows are marked in group commits; a
refused key pauses deliveries until a delivery with it succeeds again.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable

from loguru import logger

from . import crashpoints, faultpoints, metrics, outbox
from .client import RoarkClient
from .drain_db import DrainDatabase
from .drain_policy import DrainPolicy
from .drain_report import DrainReport
from .errors import AuthError, DeliveryError, PermanentError, RetryableError, UploadUrlExpired
from .key_pause import KeyPause
from .maintenance import discard_delivered_audio
from .outbox import Delivery
from .row_payload import (
    PERMANENT_FOREIGN,
    Unsendable,
    chunk_file,
    describe,
    load_events,
    read_chunk,
    salvage_note,
)
from .store import now_us
from .timeline import assemble_call_ended, assemble_call_started

__all__ = ["RowDelivery"]


class RowDelivery:
    """Delivers single rows for one drainer, and settles each one's outcome.

    Args:
        db: the drainer's database.
        policy: the drainer's retries, backoff and retention.
        owner: the drainer's lease owner, which its claimed rows carry.
        pause: the drainer's key pause, told of refusals and successes.
        on_progress: called with the report after each batch of rows is marked delivered.
    """

    def __init__(
        self,
        db: DrainDatabase,
        policy: DrainPolicy,
        owner: str,
        pause: KeyPause,
        on_progress: Callable[[DrainReport], None] | None,
    ) -> None:
        self._db = db
        self._policy = policy
        self._owner = owner
        self._pause = pause
        self._on_progress = on_progress
        self._to_mark: list[tuple[Delivery, int, str | None]] = []
        self._marking = False

    # ---- one row ----

    async def deliver(self, client: RoarkClient, row: Delivery, report: DrainReport) -> None:
        """Deliver one claimed row: the one boundary per row, which never raises.

        Whatever goes wrong with this row (our errors, aiohttp's, a decoder's, a bug's)
        counts as an attempt of this row alone and is classified here; nothing raised for
        one row reaches the other rows or stops the drain.
        """
        try:
            size, note = await self._send_row(client, row)
        except AuthError as exc:
            metrics.DELIVERY_FAILURES.labels(row.kind, "auth").inc()
            await self._auth_refused(row, exc, report)
        except UploadUrlExpired as exc:  # a fresh URL at once, the first time; then back off
            metrics.DELIVERY_FAILURES.labels(row.kind, "retryable").inc()
            delay = 0.0 if row.attempts == 0 else self._backoff(row, exc)
            await self._retry(row, exc, report, delay_s=delay)
        except RetryableError as exc:
            metrics.DELIVERY_FAILURES.labels(row.kind, "retryable").inc()
            await self._retry(row, exc, report, delay_s=self._backoff(row, exc))
        except (PermanentError, Unsendable) as exc:
            metrics.DELIVERY_FAILURES.labels(row.kind, "permanent").inc()
            await self._dead(row, str(exc), report)
        except PERMANENT_FOREIGN as exc:  # the same bytes will fail the same way
            metrics.DELIVERY_FAILURES.labels(row.kind, "permanent").inc()
            await self._dead(row, describe(exc), report)
        except Exception as exc:  # anything else: maybe passing, so bounded retries
            metrics.DELIVERY_FAILURES.labels(row.kind, "retryable").inc()
            failure = RetryableError(f"{describe(exc)}; will retry")
            await self._retry(row, failure, report, delay_s=self._backoff(row, failure))
        else:
            await self._settle_delivered(row, size, report, note)

    def release(self, row: Delivery) -> None:
        """Hand a claimed row back untouched (inside ``DrainDatabase.run``)."""
        outbox.release(self._db.conn(), self._owner, row)

    async def _send_row(self, client: RoarkClient, row: Delivery) -> tuple[int, str | None]:
        """Load, assemble and send one row.

        Returns:
            The chunk bytes sent (0 for an event) and the salvage note to keep, if any.

        Raises:
            Unsendable: the stored events cannot be assembled into the payload.
        """
        if row.kind == "chunk":
            path, expected_size, sha = await self._db.run(lambda: chunk_file(self._db.conn(), row))
            data = await self._db.blocking(
                read_chunk, self._db.directory, row, path, expected_size, sha
            )
            assert row.chunk_idx is not None
            await client.upload_chunk(
                row.call_id,
                row.chunk_idx,
                data,
                idempotency_key=row.idempotency_key,
                attempt=row.attempts,
            )
            crashpoints.reached("after-upload")
            return len(data), None
        stored = await self._db.run(lambda: load_events(self._db.conn(), row.call_id))
        faultpoints.reached("drain:assemble", row.call_id)
        try:
            payload = (
                assemble_call_started(row.call_id, stored.events)
                if row.kind == "call-started"
                else assemble_call_ended(row.call_id, stored.events)
            )
        except Exception as exc:  # a pure function of what is stored: retrying cannot help
            raise Unsendable(f"cannot assemble {row.kind} from what is stored: {exc}") from exc
        faultpoints.reached("drain:post", row.call_id)
        await client.send_event(payload, idempotency_key=row.idempotency_key)
        if row.kind == "call-ended":
            crashpoints.reached("after-call-ended")
        return 0, salvage_note(row, stored)

    # ---- the outcome ----

    async def _settle_delivered(
        self, row: Delivery, size: int, report: DrainReport, note: str | None
    ) -> None:
        """Group commit for delivered rows, one transaction for whatever piles up.

        Whoever finds no mark running marks everything that piles up meanwhile; the
        others go on delivering.
        """
        self._to_mark.append((row, size, note))
        if self._marking:
            return
        self._marking = True
        try:
            while self._to_mark:
                batch, self._to_mark = self._to_mark, []
                confirmed = await self._mark_batch(batch, report)
                if confirmed:
                    await self._pause.accepted()
                for done, done_size, _ in batch:
                    if done.id in confirmed:
                        metrics.DELIVERIES.labels(done.kind).inc()
                        report.delivered += 1
                        report.calls.add(done.call_id)
                        if done.kind == "chunk":
                            report.chunks += 1
                            report.bytes += done_size
                            metrics.DELIVERED_BYTES.inc(done_size)
                if not self._policy.keep_delivered_audio:
                    for call_id in {done.call_id for done, _, _ in batch if done.id in confirmed}:
                        await self._db.guarded(
                            "delete delivered audio", self._discard_audio, call_id
                        )
                self.progress(report)
        finally:
            self._marking = False

    async def _mark_batch(
        self, batch: list[tuple[Delivery, int, str | None]], report: DrainReport
    ) -> set[int]:
        """Mark a batch delivered; if that fails, each row alone.

        So one row that cannot be marked keeps its failure to itself. Such a row is
        retried (same key: Roark replays its answer) or, if even that cannot be written,
        left to its lease.

        Returns:
            The ids of the rows now marked delivered.
        """
        notes = {r.id: note for r, _, note in batch if note is not None}
        rows = [r for r, _, _ in batch]
        try:
            return await self._db.run(self._mark_delivered, rows, notes)
        except Exception as exc:
            if len(rows) == 1:
                failure = RetryableError(f"marking it delivered failed: {describe(exc)}")
                await self._retry(rows[0], failure, report, delay_s=self._backoff(rows[0], failure))
                return set()
        confirmed: set[int] = set()
        for one in batch:
            confirmed |= await self._mark_batch([one], report)
        return confirmed

    def _backoff(self, row: Delivery, exc: RetryableError) -> float:
        policy = self._policy
        jitter = random.uniform(
            0, min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** min(row.attempts, 30))
        )
        if exc.retry_after is not None:
            return min(exc.retry_after, policy.retry_after_cap_s)
        return jitter

    async def _retry(
        self, row: Delivery, exc: DeliveryError, report: DrainReport, *, delay_s: float
    ) -> None:
        error = str(exc)
        report.last_error = error
        too_old = now_us() - row.created_at > self._policy.max_age_s * 1e6
        if row.attempts + 1 >= self._policy.max_attempts or too_old:
            why = "too old" if too_old else f"{row.attempts + 1} attempts"
            await self._dead(row, f"gave up after {why}: {error}", report)
            return
        try:
            marked = await self._db.run(self._mark_retry, row, error, now_us() + int(delay_s * 1e6))
        except Exception as exc:  # the row stays leased; its lease runs out and it is retried
            logger.warning(
                f"pipecat-roark: could not record the failed attempt of {row.idempotency_key!r}"
                f" ({describe(exc)}); it is retried when its lease runs out"
            )
            return
        if marked:
            report.retried += 1
        logger.debug(
            f"pipecat-roark: {row.idempotency_key!r} will be retried in {delay_s:.2f} s: {error}"
        )
        self.progress(report)

    async def _dead(self, row: Delivery, error: str, report: DrainReport) -> None:
        report.last_error = error
        try:
            marked = await self._db.run(self._mark_dead, row, error)
        except Exception as exc:  # the row stays leased; its lease runs out and it is retried
            logger.warning(
                f"pipecat-roark: could not mark {row.idempotency_key!r} dead ({describe(exc)});"
                f" it is tried again when its lease runs out: {error}"
            )
            return
        if marked:
            report.dead += 1
            logger.error(f"pipecat-roark: {row.idempotency_key!r} is dead: {error}")
        self.progress(report)

    async def _auth_refused(self, row: Delivery, exc: AuthError, report: DrainReport) -> None:
        report.paused = True
        report.last_error = str(exc)
        await self._db.guarded("release a lease", self.release, row)
        await self._pause.refused(exc)

    def progress(self, report: DrainReport) -> None:
        """Tell ``on_progress`` (a display) how the drain goes; its failure is only logged."""
        if self._on_progress is not None:
            try:
                self._on_progress(report)
            except Exception as exc:  # a display callback must not stop delivery
                logger.warning(f"pipecat-roark: progress callback failed: {exc}")

    # ---- database work (inside DrainDatabase.run) ----

    def _mark_delivered(self, rows: list[Delivery], notes: dict[int, str]) -> set[int]:
        for row in rows:
            faultpoints.reached("drain:mark-delivered", row.call_id)
        return outbox.mark_delivered(
            self._db.conn(), rows, owner=self._owner, now=now_us(), notes=notes
        )

    def _mark_retry(self, row: Delivery, error: str, at: int) -> bool:
        return outbox.mark_retry(
            self._db.conn(), row, owner=self._owner, error=error, next_attempt_at=at
        )

    def _mark_dead(self, row: Delivery, error: str) -> bool:
        return outbox.mark_dead(self._db.conn(), row, owner=self._owner, error=error)

    def _discard_audio(self, call_id: str) -> None:
        """Roark has the whole call: its delivered chunk files leave the disk."""
        try:
            discard_delivered_audio(self._db.conn(), self._db.directory, call_id, now=now_us())
        except (OSError, sqlite3.Error) as exc:
            logger.warning(
                f"pipecat-roark: could not delete the delivered audio of call {call_id!r} "
                f"({exc}); retention deletes it later"
            )
