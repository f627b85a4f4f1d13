"""The drainer: the only part of pipecat-roark that talks to Roark.

It replays the outbox until Roark has every row: per call, call-started, then the
chunks (as they are recorded, during the call), then call-ended; with bounded
concurrency, exponential backoff with full jitter, ``Retry-After`` honoured, and dead
rows that keep their last error. It runs in the bot's event loop (started by the first
RoarkObserver of a process), as ``pipecat-roark drain``, or both at once on one
database: leases keep them from delivering a row twice.

Every sqlite3 call and chunk read runs in a worker thread: the bot's loop never waits
on the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from loguru import logger

from . import config, crashpoints, faultpoints, metrics, outbox, paused_keys, spool
from .client import RoarkClient
from .errors import AuthError, DeliveryError, PermanentError, RetryableError, UploadUrlExpired
from .maintenance import discard_delivered_audio, prune_delivered
from .outbox import Delivery
from .owner import current_owner, orphan_grace_s
from .store import connect, now_us
from .timeline import (
    DEFAULT_RECOVERY_REASON,
    StoredEvents,
    assemble_call_ended,
    assemble_call_started,
    read_events,
)
from .writer import writer_for

__all__ = [
    "DrainPolicy",
    "DrainReport",
    "Drainer",
    "ensure_background_drainer",
    "stop_background_drainers",
]

T = TypeVar("T")


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
        return self.pending == 0 and self.dead_total == 0 and not self.paused

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


class Drainer:
    """Delivers one database's outbox with one API key.

    ``on_progress`` is called (in the event loop) after every row with the running report.
    ``inline_db`` runs database work on the loop's own thread: only for a loop that serves
    nothing else (the exit drain, where worker threads can no longer be started).
    """

    def __init__(
        self,
        directory: Path,
        api_key: str,
        base_url: str | None = None,
        policy: DrainPolicy | None = None,
        on_progress: Callable[[DrainReport], None] | None = None,
        *,
        inline_db: bool = False,
    ) -> None:
        self.directory = directory
        self._inline_db = inline_db
        self.policy = policy or DrainPolicy()
        self.key_fp = config.key_fingerprint(api_key)
        self._api_key = api_key
        self._base_url = config.resolve_base_url(base_url)
        self._on_progress = on_progress
        self.owner = outbox.lease_owner_id(current_owner(), uuid.uuid4().hex[:8])
        self._conn: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._paused_at: float | None = None
        self._maybe_paused = True  # until a delivery succeeds, a pause row may be in the database
        self._wake = asyncio.Event()
        self._to_mark: list[tuple[Delivery, int, str | None]] = []
        self._marking = False

    # ---- public ----

    async def run_once(
        self, *, call_id: str | None = None, budget_s: float | None = 120.0
    ) -> DrainReport:
        """Deliver everything due, waiting for rows in backoff, for at most ``budget_s``.

        Orphaned calls are finalized first. A paused key is tried again at once (this is
        how `pipecat-roark drain` resumes after the key is fixed). When the budget runs
        out, requests in flight are cut (each retry carries the same idempotency key) and
        every lease is handed back: what is left is counted in ``pending``.
        """
        report = DrainReport()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        try:
            async with RoarkClient(
                self._api_key,
                self._base_url,
                timeout=self.policy.request_timeout_s,
                deadline=self.policy.request_deadline_s,
            ) as client:
                try:
                    with anyio.fail_after(budget_s):
                        await self._drain_until(client, report, call_id, deadline)
                except TimeoutError:
                    report.out_of_time = True
        finally:
            await self._guarded_db("hand back leases", self._release_all)
            await self._summarize(report, call_id)
            self._close()
        return report

    async def _drain_until(
        self, client: RoarkClient, report: DrainReport, call_id: str | None, deadline: float | None
    ) -> None:
        self._probe()
        report.finalized = await self._db(self._finalize_orphans, call_id)
        while True:
            await self._deliver_due(client, report, call_id, deadline)
            if report.paused:
                return
            wait = await self._db(self._next_due_in, call_id)
            if wait is None:
                return
            if deadline is not None and time.monotonic() + wait > deadline:
                return
            await asyncio.sleep(min(wait, self.policy.backoff_cap_s))

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Keep delivering until ``stop`` is set (``drain --follow``, the background drainer).

        A pass that fails (the database locked or gone for a moment) is logged and the
        next one runs after ``poll_s``: the drainer of a bot outlives any one failure.
        """
        stop = stop or asyncio.Event()
        report = DrainReport()
        clock = {"orphans": 0.0, "prune": 0.0}
        failing = False
        try:
            async with RoarkClient(
                self._api_key,
                self._base_url,
                timeout=self.policy.request_timeout_s,
                deadline=self.policy.request_deadline_s,
            ) as client:
                while not stop.is_set():
                    sleep = self.policy.poll_s
                    try:
                        sleep = await self._pass(client, report, clock)
                        failing = False
                    except Exception as exc:
                        if not failing:  # one line per run of failures, not one per poll
                            logger.error(
                                f"pipecat-roark: a delivery pass in {self.directory} failed"
                                f" ({_describe(exc)}); trying again every {sleep:g} s"
                            )
                        failing = True
                    await self._idle(stop, sleep)
        finally:
            await asyncio.shield(self._guarded_db("hand back leases", self._release_all))
            self._close()

    async def _pass(
        self, client: RoarkClient, report: DrainReport, clock: dict[str, float]
    ) -> float:
        """One round of ``run_forever``; returns how long to wait before the next."""
        if time.monotonic() - clock["orphans"] > min(10.0, self.policy.orphan_grace_s / 4):
            clock["orphans"] = time.monotonic()
            report.finalized += await self._db(self._finalize_orphans)
        if time.monotonic() - clock["prune"] > self.policy.prune_every_s:
            clock["prune"] = time.monotonic()
            await self._db(self._prune)
        if self._probe_due():
            self._probe()
            report.paused = False
        if not report.paused:
            await self._deliver_due(client, report, None)
        wait = await self._db(self._next_due_in, None)
        return self.policy.poll_s if wait is None else min(wait, self.policy.poll_s)

    async def _idle(self, stop: asyncio.Event, sleep: float) -> None:
        """Until ``stop``, a wake-up (something new was committed) or ``sleep`` seconds."""
        self._wake.clear()
        stop_task = asyncio.ensure_future(stop.wait())
        wake_task = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                {stop_task, wake_task},
                timeout=max(0.01, sleep),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop_task.cancel()
            wake_task.cancel()

    def wake(self) -> None:
        """Something new was committed: look now instead of at the next poll."""
        self._wake.set()

    # ---- delivery ----

    async def _deliver_due(
        self,
        client: RoarkClient,
        report: DrainReport,
        call_id: str | None,
        deadline: float | None = None,
    ) -> None:
        """Workers claim rows until nothing is claimable, the key is refused, or the
        ``deadline`` (monotonic) passes: rows that fail fast become due again at once,
        and without it a budgeted drain would only stop at the hard timeout.

        While they work, the leases they hold are renewed every third of a lease: a row
        is never claimed by another drainer while this one is still sending it.
        """

        async def worker() -> None:
            while not report.paused and (deadline is None or time.monotonic() < deadline):
                try:
                    rows = await self._db(self._claim, call_id)
                except Exception as exc:  # the database, not a row: this pass ends
                    logger.warning(
                        f"pipecat-roark: could not claim rows in {self.directory}: {exc}"
                    )
                    return
                if not rows:
                    return
                claimed_at = time.monotonic()
                for n, row in enumerate(rows):
                    # Hand the rest back if the key was refused, or before their leases
                    # could run out while slow requests ahead of them take their time.
                    stale = n > 0 and time.monotonic() - claimed_at > self.policy.lease_s / 2
                    if report.paused or stale:
                        for rest in rows[n:]:
                            await self._guarded_db("release a lease", self._release_one, rest)
                        break
                    await self._deliver(client, row, report)

        workers = asyncio.gather(*(worker() for _ in range(max(1, self.policy.concurrency))))
        renewer = asyncio.ensure_future(self._renew_leases_until(workers))
        try:
            await workers
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _renew_leases_until(self, done: asyncio.Future[Any]) -> None:
        every = self.policy.lease_s / 3
        while not done.done():
            await asyncio.sleep(every)
            await self._guarded_db("renew leases", self._renew)

    async def _deliver(self, client: RoarkClient, row: Delivery, report: DrainReport) -> None:
        """The one boundary per row: whatever goes wrong with this row (our errors, httpx's,
        a decoder's, a bug's) counts as an attempt of this row alone and is classified
        here; nothing raised for one row reaches the other rows or stops the drain."""
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
        except (PermanentError, _Unsendable) as exc:
            metrics.DELIVERY_FAILURES.labels(row.kind, "permanent").inc()
            await self._dead(row, str(exc), report)
        except _PERMANENT_FOREIGN as exc:  # the same bytes will fail the same way
            metrics.DELIVERY_FAILURES.labels(row.kind, "permanent").inc()
            await self._dead(row, _describe(exc), report)
        except Exception as exc:  # anything else: maybe passing, so bounded retries
            metrics.DELIVERY_FAILURES.labels(row.kind, "retryable").inc()
            failure = RetryableError(f"{_describe(exc)}; will retry")
            await self._retry(row, failure, report, delay_s=self._backoff(row, failure))
        else:
            await self._settle_delivered(row, size, report, note)

    async def _send_row(self, client: RoarkClient, row: Delivery) -> tuple[int, str | None]:
        """Load, assemble and send one row; returns (chunk bytes sent, salvage note)."""
        if row.kind == "chunk":
            path, expected_size, sha = await self._db(self._chunk_row, row)
            data = await self._blocking(self._read_chunk, row, path, expected_size, sha)
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
        stored = await self._db(self._events, row.call_id)
        faultpoints.reached("drain:assemble", row.call_id)
        try:
            payload = (
                assemble_call_started(row.call_id, stored.events)
                if row.kind == "call-started"
                else assemble_call_ended(row.call_id, stored.events)
            )
        except Exception as exc:  # a pure function of what is stored: retrying cannot help
            raise _Unsendable(f"cannot assemble {row.kind} from what is stored: {exc}") from exc
        faultpoints.reached("drain:post", row.call_id)
        await client.send_event(payload, idempotency_key=row.idempotency_key)
        if row.kind == "call-ended":
            crashpoints.reached("after-call-ended")
        return 0, _salvage_note(row, stored)

    async def _settle_delivered(
        self, row: Delivery, size: int, report: DrainReport, note: str | None
    ) -> None:
        """Group commit for delivered rows: whoever finds no mark running marks everything
        that piles up meanwhile in one transaction; the others go on delivering."""
        self._to_mark.append((row, size, note))
        if self._marking:
            return
        self._marking = True
        try:
            while self._to_mark:
                batch, self._to_mark = self._to_mark, []
                confirmed = await self._mark_batch(batch, report)
                if confirmed and self._maybe_paused:
                    await self._guarded_db("lift the key's pause", self._clear_pause)
                for done, done_size, _ in batch:
                    if done.id in confirmed:
                        metrics.DELIVERIES.labels(done.kind).inc()
                        report.delivered += 1
                        report.calls.add(done.call_id)
                        if done.kind == "chunk":
                            report.chunks += 1
                            report.bytes += done_size
                            metrics.DELIVERED_BYTES.inc(done_size)
                if not self.policy.keep_delivered_audio:
                    for call_id in {done.call_id for done, _, _ in batch if done.id in confirmed}:
                        await self._guarded_db(
                            "delete delivered audio", self._discard_audio, call_id
                        )
                self._progress(report)
        finally:
            self._marking = False

    async def _mark_batch(
        self, batch: list[tuple[Delivery, int, str | None]], report: DrainReport
    ) -> set[int]:
        """Mark a batch delivered; if that fails, each row alone, so one row that cannot be
        marked keeps its failure to itself. Such a row is retried (same key: Roark
        replays its answer) or, if even that cannot be written, left to its lease."""
        notes = {r.id: note for r, _, note in batch if note is not None}
        rows = [r for r, _, _ in batch]
        try:
            return await self._db(self._mark_delivered, rows, notes)
        except Exception as exc:
            if len(rows) == 1:
                failure = RetryableError(f"marking it delivered failed: {_describe(exc)}")
                await self._retry(rows[0], failure, report, delay_s=self._backoff(rows[0], failure))
                return set()
        confirmed: set[int] = set()
        for one in batch:
            confirmed |= await self._mark_batch([one], report)
        return confirmed

    async def _guarded_db(self, what: str, function: Callable[..., object], *args: Any) -> bool:
        """Bookkeeping whose failure must not stop delivery: logged, and False."""
        try:
            await self._db(function, *args)
        except Exception as exc:
            logger.warning(f"pipecat-roark: could not {what} in {self.directory}: {exc}")
            return False
        return True

    def _backoff(self, row: Delivery, exc: RetryableError) -> float:
        policy = self.policy
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
        too_old = now_us() - row.created_at > self.policy.max_age_s * 1e6
        if row.attempts + 1 >= self.policy.max_attempts or too_old:
            why = "too old" if too_old else f"{row.attempts + 1} attempts"
            await self._dead(row, f"gave up after {why}: {error}", report)
            return
        try:
            marked = await self._db(self._mark_retry, row, error, now_us() + int(delay_s * 1e6))
        except Exception as exc:  # the row stays leased; its lease runs out and it is retried
            logger.warning(
                f"pipecat-roark: could not record the failed attempt of {row.idempotency_key!r}"
                f" ({_describe(exc)}); it is retried when its lease runs out"
            )
            return
        if marked:
            report.retried += 1
        logger.debug(
            f"pipecat-roark: {row.idempotency_key!r} will be retried in {delay_s:.2f} s: {error}"
        )
        self._progress(report)

    async def _dead(self, row: Delivery, error: str, report: DrainReport) -> None:
        report.last_error = error
        try:
            marked = await self._db(self._mark_dead, row, error)
        except Exception as exc:  # the row stays leased; its lease runs out and it is retried
            logger.warning(
                f"pipecat-roark: could not mark {row.idempotency_key!r} dead ({_describe(exc)});"
                f" it is tried again when its lease runs out: {error}"
            )
            return
        if marked:
            report.dead += 1
            logger.error(f"pipecat-roark: {row.idempotency_key!r} is dead: {error}")
        self._progress(report)

    async def _auth_refused(self, row: Delivery, exc: AuthError, report: DrainReport) -> None:
        report.paused = True
        report.last_error = str(exc)
        await self._guarded_db("release a lease", self._release_one, row)
        try:
            first = await self._db(self._pause, str(exc))
        except Exception as db_exc:
            logger.warning(f"pipecat-roark: could not record the key's pause: {db_exc}")
            first = True
        self._paused_at = time.monotonic()
        self._maybe_paused = True
        if first:
            logger.error(
                f"pipecat-roark: Roark refused the API key {self.key_fp} (HTTP {exc.status}): "
                "deliveries for it are paused and nothing is dropped; set a valid ROARK_API_KEY "
                "and run `pipecat-roark drain`"
            )

    def _probe_due(self) -> bool:
        return (
            self._paused_at is not None
            and time.monotonic() - self._paused_at >= self.policy.auth_probe_s
        )

    def _progress(self, report: DrainReport) -> None:
        if self._on_progress is not None:
            try:
                self._on_progress(report)
            except Exception as exc:  # a display callback must not stop delivery
                logger.warning(f"pipecat-roark: progress callback failed: {exc}")

    # ---- database work (worker threads, one connection, serialized) ----

    async def _db(self, function: Callable[..., T], *args: Any) -> T:
        def locked() -> T:
            with self._db_lock:
                return function(*args)

        return await self._blocking(locked)

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        """Blocking work off the event loop; inline in the exit drain, whose loop is its
        own and which must start no threads at interpreter exit."""
        if self._inline_db:
            return function(*args)
        return await asyncio.to_thread(function, *args)

    def _conn_or_open(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.directory)
        return self._conn

    def _close(self) -> None:
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _claim(self, call_id: str | None) -> list[Delivery]:
        return outbox.claim(
            self._conn_or_open(),
            owner=self.owner,
            now=now_us(),
            lease_us=int(self.policy.lease_s * 1e6),
            limit=self.policy.claim_batch,
            key_fp=self.key_fp,
            call_id=call_id,
        )

    def _chunk_row(self, row: Delivery) -> tuple[str, int, str]:
        found = (
            self._conn_or_open()
            .execute(
                "SELECT path, size, sha256 FROM chunks WHERE call_id = ? AND idx = ?",
                (row.call_id, row.chunk_idx),
            )
            .fetchone()
        )
        if found is None:
            raise _Unsendable(f"chunk {row.chunk_idx} of call {row.call_id!r} has no row")
        return str(found[0]), int(found[1]), str(found[2])

    def _read_chunk(self, row: Delivery, path: str, size: int, sha: str) -> bytes:
        """Off the database lock: reading and hashing a file needs no connection.

        A file that is gone, is not a file, or is not the bytes recorded is dead with the
        reason (call-ended then goes without it); other OS errors (EIO, EMFILE, EACCES)
        may pass and are retried.
        """
        faultpoints.reached("drain:read-chunk", row.call_id)
        try:
            data = spool.read_chunk(self.directory, path)
        except FileNotFoundError:
            raise _Unsendable(f"chunk file missing: {self.directory / path}") from None
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise _Unsendable(
                f"chunk file is not a file ({exc}): {self.directory / path}"
            ) from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise _Unsendable(
                f"chunk file corrupt (size or sha256 differs): {self.directory / path}"
            )
        return data

    def _mark_delivered(self, rows: list[Delivery], notes: dict[int, str]) -> set[int]:
        for row in rows:
            faultpoints.reached("drain:mark-delivered", row.call_id)
        return outbox.mark_delivered(
            self._conn_or_open(), rows, owner=self.owner, now=now_us(), notes=notes
        )

    def _mark_retry(self, row: Delivery, error: str, at: int) -> bool:
        return outbox.mark_retry(
            self._conn_or_open(), row, owner=self.owner, error=error, next_attempt_at=at
        )

    def _mark_dead(self, row: Delivery, error: str) -> bool:
        return outbox.mark_dead(self._conn_or_open(), row, owner=self.owner, error=error)

    def _pause(self, reason: str) -> bool:
        assert self.key_fp is not None
        return paused_keys.pause_key(self._conn_or_open(), self.key_fp, reason, now_us())

    def _probe(self) -> None:
        """Try a paused key again; the pause is lifted by the first delivery that succeeds."""
        self._paused_at = None
        self._maybe_paused = True

    def _clear_pause(self) -> None:
        assert self.key_fp is not None
        self._maybe_paused = False
        if paused_keys.unpause_key(self._conn_or_open(), self.key_fp):
            logger.info(
                f"pipecat-roark: Roark accepts the API key {self.key_fp} again; deliveries resumed"
            )

    def _finalize_orphans(self, call_id: str | None = None) -> list[str]:
        outbox.release_dead_owners(self._conn_or_open())
        finalized = outbox.finalize_orphans(
            self._conn_or_open(),
            now=now_us(),
            grace_us=int(self.policy.orphan_grace_s * 1e6),
            call_id=call_id,
        )
        for call_id in finalized:
            metrics.finalized(DEFAULT_RECOVERY_REASON)
            logger.warning(
                f"pipecat-roark: call {call_id} never ended (its process is gone); finalized "
                f"from what was recorded with reason {DEFAULT_RECOVERY_REASON}"
            )
        return finalized

    def _prune(self) -> None:
        """Retention: delivered calls go after ``retention_s``; nothing undelivered ever does."""
        try:
            result = prune_delivered(
                self._conn_or_open(), self.directory, self.policy.retention_s, now=now_us()
            )
        except (OSError, sqlite3.Error) as exc:
            logger.warning(f"pipecat-roark: pruning delivered calls failed ({exc}); will retry")
            return
        if result.calls:
            logger.info(
                f"pipecat-roark: pruned {result.calls} delivered call(s) older than "
                f"{self.policy.retention_s / 86400:g} days ({result.bytes} bytes of audio)"
            )

    def _discard_audio(self, call_id: str) -> None:
        """Roark has the whole call: its delivered chunk files leave the disk."""
        try:
            discard_delivered_audio(self._conn_or_open(), self.directory, call_id, now=now_us())
        except (OSError, sqlite3.Error) as exc:
            logger.warning(
                f"pipecat-roark: could not delete the delivered audio of call {call_id!r} "
                f"({exc}); retention deletes it later"
            )

    def _renew(self) -> None:
        outbox.renew_leases(
            self._conn_or_open(), self.owner, now_us() + int(self.policy.lease_s * 1e6)
        )

    def _release_one(self, row: Delivery) -> None:
        outbox.release(self._conn_or_open(), self.owner, row)

    def _events(self, call_id: str) -> StoredEvents:
        faultpoints.reached("drain:load", call_id)
        return read_events(self._conn_or_open(), call_id)

    def _release_all(self) -> None:
        if self._conn is not None:
            outbox.release(self._conn, self.owner)

    def _next_due_in(self, call_id: str | None) -> float | None:
        """Seconds until a row of ours can be claimed; None when nothing of ours is waiting.

        Rows another drainer holds are looked at again after ``poll_s``: they are usually
        delivered by then, or their lease has expired.
        """
        earliest, leased = outbox.next_due(
            self._conn_or_open(), key_fp=self.key_fp, call_id=call_id
        )
        waits = [] if earliest is None else [max(0.0, (earliest - now_us()) / 1e6)]
        if leased:
            waits.append(self.policy.poll_s)
        return min(waits) if waits else None

    async def _summarize(self, report: DrainReport, call_id: str | None) -> None:
        def count() -> tuple[int, int, list[str]]:
            return outbox.undelivered_counts(
                self._conn_or_open(), key_fp=self.key_fp, call_id=call_id
            )

        try:
            report.pending, report.dead_total, report.skipped_calls = await self._db(count)
        except Exception as exc:
            logger.warning(
                f"pipecat-roark: could not count what is left in {self.directory}: {exc}"
            )


class _Unsendable(Exception):
    """The row cannot be built from what is on disk: it goes dead with this reason."""


# Raised by a row's own bytes (a stored body, an id or header that cannot be encoded):
# the next attempt would fail the same way, so the row goes dead at once.
_PERMANENT_FOREIGN = (UnicodeError, msgspec.DecodeError, msgspec.ValidationError)


def _describe(exc: BaseException) -> str:
    """One line naming the exception, whatever its message holds."""
    detail = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {detail[:500]}"


def _salvage_note(row: Delivery, stored: StoredEvents) -> str | None:
    """What a delivered event row left out, kept on the row and logged once."""
    if not stored.undecodable:
        return None
    total = len(stored.events) + len(stored.undecodable)
    first_id, why = stored.undecodable[0]
    note = (
        f"salvaged: {len(stored.undecodable)} of {total} stored events did not decode and were"
        f" left out (event row {first_id}: {' '.join(why.split())[:200]})"
    )
    logger.warning(f"pipecat-roark: {row.idempotency_key!r} delivered, {note}")
    return note


# ---- the background drainer of a bot process ----

_BACKGROUND: dict[tuple[Path, str | None], tuple[Drainer, asyncio.Task[None], asyncio.Event]] = {}


def ensure_background_drainer(
    directory: Path, api_key: str, base_url: str | None, *, keep_delivered_audio: bool = False
) -> None:
    """Start this process's drainer for ``directory`` and key in the running loop (once).

    The first observer's settings hold for the drainer's life. Never raises and never
    blocks: delivery problems are logged, the call goes on.
    """
    try:
        loop = asyncio.get_running_loop()
        key = (directory.expanduser().resolve(), config.key_fingerprint(api_key))
        current = _BACKGROUND.get(key)
        if current is not None and not current[1].done() and current[1].get_loop() is loop:
            return
        policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
        drainer = Drainer(directory, api_key, base_url, policy)
        stop = asyncio.Event()
        task = loop.create_task(
            _run_background(drainer, stop), name=f"pipecat-roark-drainer:{directory}"
        )
        _BACKGROUND[key] = (drainer, task, stop)

        def on_commit() -> None:
            loop.call_soon_threadsafe(drainer.wake)

        writer_for(directory).add_commit_listener(on_commit)
        task.add_done_callback(lambda _: writer_for(directory).remove_commit_listener(on_commit))
    except Exception as exc:
        logger.error(
            f"pipecat-roark: the background drainer did not start ({exc}); run `pipecat-roark drain`"
        )


async def _run_background(drainer: Drainer, stop: asyncio.Event) -> None:
    try:
        await drainer.run_forever(stop)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.error(
            f"pipecat-roark: the background drainer stopped ({exc}); run `pipecat-roark drain`"
        )


async def stop_background_drainers(limit_s: float = 5.0) -> None:
    """Stop this loop's background drainers, bounded: leases are released, nothing is lost."""
    loop = asyncio.get_running_loop()
    mine = [(k, v) for k, v in _BACKGROUND.items() if v[1].get_loop() is loop]
    for key, (_, _task, stop) in mine:
        stop.set()
        _BACKGROUND.pop(key, None)
    tasks = [task for _, (_, task, _) in mine]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=limit_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
