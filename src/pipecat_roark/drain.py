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

from loguru import logger

from . import config, crashpoints, outbox, spool
from .client import RoarkClient
from .errors import AuthError, DeliveryError, PermanentError, RetryableError, UploadUrlExpired
from .maintenance import prune_delivered
from .outbox import Delivery
from .owner import current_owner
from .store import connect, now_us
from .timeline import assemble_call_ended, assemble_call_started, load_events
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
    orphan_grace_s: float = 120.0
    auth_probe_s: float = 300.0
    poll_s: float = 1.0
    request_timeout_s: float = 30.0
    retention_s: float = 7 * 86400.0
    claim_batch: int = 4
    prune_every_s: float = 3600.0


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
        self._to_mark: list[tuple[Delivery, int]] = []
        self._marking = False

    # ---- public ----

    async def run_once(
        self, *, call_id: str | None = None, budget_s: float | None = 120.0
    ) -> DrainReport:
        """Deliver everything due, waiting for rows in backoff while ``budget_s`` allows.

        Orphaned calls are finalized first. A paused key is tried again at once (this is
        how `pipecat-roark drain` resumes after the key is fixed).
        """
        report = DrainReport()
        deadline = None if budget_s is None else time.monotonic() + budget_s
        try:
            async with RoarkClient(
                self._api_key, self._base_url, timeout=self.policy.request_timeout_s
            ) as client:
                self._probe()
                report.finalized = await self._db(self._finalize_orphans, call_id)
                while True:
                    await self._deliver_due(client, report, call_id, deadline)
                    if report.paused:
                        break
                    wait = await self._db(self._next_due_in, call_id)
                    if wait is None:
                        break
                    if deadline is not None and time.monotonic() + wait > deadline:
                        break
                    await asyncio.sleep(min(wait, self.policy.backoff_cap_s))
        finally:
            await self._db(self._release_all)
            await self._summarize(report, call_id)
            self._close()
        return report

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Keep delivering until ``stop`` is set (``drain --follow``, the background drainer)."""
        stop = stop or asyncio.Event()
        report = DrainReport()
        last_orphan_check = 0.0
        last_prune = 0.0
        try:
            async with RoarkClient(
                self._api_key, self._base_url, timeout=self.policy.request_timeout_s
            ) as client:
                while not stop.is_set():
                    if time.monotonic() - last_orphan_check > min(10.0, self.policy.orphan_grace_s):
                        last_orphan_check = time.monotonic()
                        report.finalized += await self._db(self._finalize_orphans)
                    if time.monotonic() - last_prune > self.policy.prune_every_s:
                        last_prune = time.monotonic()
                        await self._db(self._prune)
                    if self._probe_due():
                        self._probe()
                        report.paused = False
                    if not report.paused:
                        await self._deliver_due(client, report, None)
                    wait = await self._db(self._next_due_in, None)
                    sleep = self.policy.poll_s if wait is None else min(wait, self.policy.poll_s)
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
        finally:
            await asyncio.shield(self._db(self._release_all))
            self._close()

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
        and without it a budgeted drain would never return."""

        async def worker() -> None:
            while not report.paused and (deadline is None or time.monotonic() < deadline):
                rows = await self._db(self._claim, call_id)
                if not rows:
                    return
                claimed_at = time.monotonic()
                for n, row in enumerate(rows):
                    # Hand the rest back if the key was refused, or before their leases
                    # could run out while slow requests ahead of them take their time.
                    stale = n > 0 and time.monotonic() - claimed_at > self.policy.lease_s / 2
                    if report.paused or stale:
                        for rest in rows[n:]:
                            await self._db(self._release_one, rest)
                        break
                    await self._deliver(client, row, report)

        await asyncio.gather(*(worker() for _ in range(max(1, self.policy.concurrency))))

    async def _deliver(self, client: RoarkClient, row: Delivery, report: DrainReport) -> None:
        size = 0
        try:
            if row.kind == "chunk":
                path, expected_size, sha = await self._db(self._chunk_row, row)
                data = await self._blocking(self._read_chunk, path, expected_size, sha)
                size = len(data)
                assert row.chunk_idx is not None
                await client.upload_chunk(
                    row.call_id,
                    row.chunk_idx,
                    data,
                    idempotency_key=row.idempotency_key,
                    attempt=row.attempts,
                )
                crashpoints.reached("after-upload")
            else:
                events = await self._db(self._events, row.call_id)
                payload = (
                    assemble_call_started(row.call_id, events)
                    if row.kind == "call-started"
                    else assemble_call_ended(row.call_id, events)
                )
                await client.send_event(payload, idempotency_key=row.idempotency_key)
                if row.kind == "call-ended":
                    crashpoints.reached("after-call-ended")
        except AuthError as exc:
            await self._auth_refused(row, exc, report)
            return
        except UploadUrlExpired as exc:  # a fresh URL at once, the first time; then back off
            delay = 0.0 if row.attempts == 0 else self._backoff(row, exc)
            await self._retry(row, exc, report, delay_s=delay)
            return
        except RetryableError as exc:
            await self._retry(row, exc, report, delay_s=self._backoff(row, exc))
            return
        except (PermanentError, _Unsendable) as exc:
            await self._dead(row, str(exc), report)
            return
        await self._settle_delivered(row, size, report)

    async def _settle_delivered(self, row: Delivery, size: int, report: DrainReport) -> None:
        """Group commit for delivered rows: whoever finds no mark running marks everything
        that piles up meanwhile in one transaction; the others go on delivering."""
        self._to_mark.append((row, size))
        if self._marking:
            return
        self._marking = True
        try:
            while self._to_mark:
                batch, self._to_mark = self._to_mark, []
                confirmed = await self._db(self._mark_delivered, [r for r, _ in batch])
                if confirmed and self._maybe_paused:
                    await self._db(self._clear_pause)
                for done, done_size in batch:
                    if done.id in confirmed:
                        report.delivered += 1
                        report.calls.add(done.call_id)
                        if done.kind == "chunk":
                            report.chunks += 1
                            report.bytes += done_size
                self._progress(report)
        finally:
            self._marking = False

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
        if await self._db(self._mark_retry, row, error, now_us() + int(delay_s * 1e6)):
            report.retried += 1
        logger.debug(
            f"pipecat-roark: {row.idempotency_key} will be retried in {delay_s:.2f} s: {error}"
        )
        self._progress(report)

    async def _dead(self, row: Delivery, error: str, report: DrainReport) -> None:
        report.last_error = error
        if await self._db(self._mark_dead, row, error):
            report.dead += 1
            logger.error(f"pipecat-roark: {row.idempotency_key} is dead: {error}")
        self._progress(report)

    async def _auth_refused(self, row: Delivery, exc: AuthError, report: DrainReport) -> None:
        report.paused = True
        report.last_error = str(exc)
        await self._db(self._release_one, row)
        first = await self._db(self._pause, str(exc))
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

    def _read_chunk(self, path: str, size: int, sha: str) -> bytes:
        """Off the database lock: reading and hashing a file needs no connection."""
        try:
            data = spool.read_chunk(self.directory, path)
        except FileNotFoundError:
            raise _Unsendable(f"chunk file missing: {self.directory / path}") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            raise _Unsendable(
                f"chunk file corrupt (size or sha256 differs): {self.directory / path}"
            )
        return data

    def _mark_delivered(self, rows: list[Delivery]) -> set[int]:
        return outbox.mark_delivered(self._conn_or_open(), rows, owner=self.owner, now=now_us())

    def _mark_retry(self, row: Delivery, error: str, at: int) -> bool:
        return outbox.mark_retry(
            self._conn_or_open(), row, owner=self.owner, error=error, next_attempt_at=at
        )

    def _mark_dead(self, row: Delivery, error: str) -> bool:
        return outbox.mark_dead(self._conn_or_open(), row, owner=self.owner, error=error)

    def _pause(self, reason: str) -> bool:
        assert self.key_fp is not None
        return outbox.pause_key(self._conn_or_open(), self.key_fp, reason, now_us())

    def _probe(self) -> None:
        """Try a paused key again; the pause is lifted by the first delivery that succeeds."""
        self._paused_at = None
        self._maybe_paused = True

    def _clear_pause(self) -> None:
        assert self.key_fp is not None
        self._maybe_paused = False
        if outbox.unpause_key(self._conn_or_open(), self.key_fp):
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
            logger.warning(
                f"pipecat-roark: call {call_id} never ended (its process is gone); finalized "
                "from what was recorded with reason observer-lost"
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

    def _release_one(self, row: Delivery) -> None:
        outbox.release(self._conn_or_open(), self.owner, row)

    def _events(self, call_id: str) -> list[Any]:
        return load_events(self._conn_or_open(), call_id)

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
            conn = self._conn_or_open()
            mine = "(c.key_fp IS NULL OR c.key_fp = ?) AND (? IS NULL OR d.call_id = ?)"
            pending = conn.execute(
                "SELECT count(*) FROM deliveries d JOIN calls c ON c.id = d.call_id"
                f" WHERE d.state IN ('pending', 'leased') AND {mine}",
                (self.key_fp, call_id, call_id),
            ).fetchone()[0]
            dead = conn.execute(
                f"SELECT count(*) FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state = 'dead' AND {mine}",
                (self.key_fp, call_id, call_id),
            ).fetchone()[0]
            others = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT c.id FROM calls c JOIN deliveries d ON d.call_id = c.id"
                    " WHERE d.state IN ('pending', 'leased') AND c.key_fp IS NOT NULL AND c.key_fp != ?"
                    " AND (? IS NULL OR c.id = ?) ORDER BY c.id",
                    (self.key_fp, call_id, call_id),
                )
            ]
            return int(pending), int(dead), others

        try:
            report.pending, report.dead_total, report.skipped_calls = await self._db(count)
        except Exception as exc:
            logger.warning(
                f"pipecat-roark: could not count what is left in {self.directory}: {exc}"
            )


class _Unsendable(Exception):
    """The row cannot be built from what is on disk: it goes dead with this reason."""


# ---- the background drainer of a bot process ----

_BACKGROUND: dict[tuple[Path, str | None], tuple[Drainer, asyncio.Task[None], asyncio.Event]] = {}


def ensure_background_drainer(directory: Path, api_key: str, base_url: str | None) -> None:
    """Start this process's drainer for ``directory`` and key in the running loop (once).

    Never raises and never blocks: delivery problems are logged, the call goes on.
    """
    try:
        loop = asyncio.get_running_loop()
        key = (directory.expanduser().resolve(), config.key_fingerprint(api_key))
        current = _BACKGROUND.get(key)
        if current is not None and not current[1].done() and current[1].get_loop() is loop:
            return
        drainer = Drainer(directory, api_key, base_url)
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
