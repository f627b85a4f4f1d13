"""The drainer: the only part of pipecat-roark that talks to Roark.

It replays the outbox until Roark has every row: per call, call-started, then the
chunks (as they are recorded, during the call), then call-ended; with bounded
concurrency, exponential backoff with full jitter, ``Retry-After`` honoured, and dead
rows that keep their last error. It runs in the bot's event loop (started by the first
RoarkObserver of a process, see ``background_drainer``), as ``pipecat-roark drain``, or
both at once on one database: leases keep them from delivering a row twice.

This module holds the claim loop: workers claim rows, each row goes to ``RowDelivery``,
leases are renewed while they work; plus orphan finalizing and retention. Every sqlite3
call and chunk read runs in a worker thread (``DrainDatabase``): the bot's loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
from loguru import logger

from . import config, outbox
from .client import RoarkClient
from .drain_db import DrainDatabase
from .drain_housekeeping import finalize_orphans, prune
from .drain_policy import DrainPolicy
from .drain_report import DrainReport
from .key_pause import KeyPause
from .outbox import Delivery
from .owner import current_owner
from .row_delivery import RowDelivery
from .row_payload import describe
from .store import now_us

__all__ = ["DrainPolicy", "DrainReport", "Drainer"]


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
        self.policy = policy or DrainPolicy()
        self.key_fp = config.key_fingerprint(api_key)
        self._api_key = api_key
        self._base_url = config.resolve_base_url(base_url)
        self.owner = outbox.lease_owner_id(current_owner(), uuid.uuid4().hex[:8])
        self._db = DrainDatabase(directory, inline=inline_db)
        self._ended = False
        """The run is over: a claim whose thread starts only now must not lease anything."""
        self._pause = KeyPause(self._db, self.key_fp, self.policy.auth_probe_s)
        self._rows = RowDelivery(self._db, self.policy, self.owner, self._pause, on_progress)
        self._wake = asyncio.Event()

    async def run_once(
        self, *, call_id: str | None = None, budget_s: float | None = 120.0
    ) -> DrainReport:
        """Deliver everything due, waiting for rows in backoff, for at most ``budget_s``.

        Orphaned calls are finalized first. A paused key is tried again at once (this is
        how `pipecat-roark drain` resumes after the key is fixed). When the budget runs
        out, requests in flight are cut (each retry carries the same idempotency key) and
        every lease is handed back: what is left is counted in ``pending``.

        Returns:
            What was delivered, retried, dead and finalized, and what is left.
        """
        report = DrainReport()
        self._ended = False  # a drainer may run again (drain --parent-pipe's last pass)
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
            self._ended = True  # before the hand-back, which waits for a claim in progress
            await self._db.guarded("hand back leases", self._release_all)
            await self._summarize(report, call_id)
            self._db.close()
        return report

    async def _drain_until(
        self, client: RoarkClient, report: DrainReport, call_id: str | None, deadline: float | None
    ) -> None:
        self._pause.probe()
        report.finalized = await self._db.run(self._finalize_orphans, call_id)
        while True:
            await self._deliver_due(client, report, call_id, deadline)
            if report.paused:
                return
            wait = await self._db.run(self._next_due_in, call_id)
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
        self._ended = False
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
                                f" ({describe(exc)}); trying again every {sleep:g} s"
                            )
                        failing = True
                    await self._idle(stop, sleep)
        finally:
            self._ended = True  # before the hand-back, which waits for a claim in progress
            await asyncio.shield(self._db.guarded("hand back leases", self._release_all))
            self._db.close()

    async def _pass(
        self, client: RoarkClient, report: DrainReport, clock: dict[str, float]
    ) -> float:
        """One round of ``run_forever``.

        Returns:
            Seconds to wait before the next round, at most ``poll_s`` (``wake`` cuts it short).
        """
        if time.monotonic() - clock["orphans"] > min(10.0, self.policy.orphan_grace_s / 4):
            clock["orphans"] = time.monotonic()
            report.finalized += await self._db.run(self._finalize_orphans)
        if time.monotonic() - clock["prune"] > self.policy.prune_every_s:
            clock["prune"] = time.monotonic()
            await self._db.run(self._prune)
        if self._pause.probe_due():
            self._pause.probe()
            report.paused = False
        if not report.paused:
            await self._deliver_due(client, report, None)
        wait = await self._db.run(self._next_due_in, None)
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

    async def _deliver_due(
        self,
        client: RoarkClient,
        report: DrainReport,
        call_id: str | None,
        deadline: float | None = None,
    ) -> None:
        """Workers claim rows until nothing is claimable, the key is refused, or time is up.

        The ``deadline`` (monotonic) matters because rows that fail fast become due again
        at once: without it a budgeted drain would only stop at the hard timeout.

        While they work, the leases they hold are renewed every third of a lease: a row
        is never claimed by another drainer while this one is still sending it.

        One worker starts; more join, up to ``concurrency``, whenever a claim comes back
        full (a backlog, or a burst of calls ending). A follower is woken for every
        commit that adds deliveries, usually to find a row or two: eight workers each
        claiming was eight trips to the database's thread, most of them finding nothing,
        and each trip wakes a thread on the bot's CPUs (issue 12, eighth pass).
        """
        working_now = 1

        async def worker() -> None:
            nonlocal working_now
            try:
                await deliver_claimed()
            finally:
                working_now -= 1

        async def deliver_claimed() -> None:
            nonlocal working_now
            while not report.paused and (deadline is None or time.monotonic() < deadline):
                try:
                    rows = await self._db.run(self._claim, call_id)
                except Exception as exc:  # the database, not a row: this pass ends
                    logger.warning(
                        f"pipecat-roark: could not claim rows in {self.directory}: {exc}"
                    )
                    return
                if not rows:
                    return
                if len(rows) >= self.policy.claim_batch:  # more are likely waiting
                    while working_now < self.policy.concurrency:
                        working_now += 1
                        working.start_soon(worker)
                claimed_at = time.monotonic()
                for n, row in enumerate(rows):
                    # Hand the rest back if the key was refused, or before their leases
                    # could run out while slow requests ahead of them take their time.
                    stale = n > 0 and time.monotonic() - claimed_at > self.policy.lease_s / 2
                    if report.paused or stale:
                        for rest in rows[n:]:
                            await self._db.guarded("release a lease", self._rows.release, rest)
                        break
                    await self._rows.deliver(client, row, report)

        # anyio task groups, not asyncio.gather plus a renewer cancelled by hand: a budget
        # expiring just as the workers finished cancelled that gather while the renewer's
        # own cancel was pending, and asyncio then raised a bare CancelledError that no
        # cancel scope could recognise as its own, out of run_once.
        async with anyio.create_task_group() as renewing:
            renewing.start_soon(self._renew_leases)
            async with anyio.create_task_group() as working:
                working.start_soon(worker)
            renewing.cancel_scope.cancel()

    async def _renew_leases(self) -> None:
        """Renew this drainer's leases every third of a lease, until cancelled."""
        every = self.policy.lease_s / 3
        while True:
            await anyio.sleep(every)
            await self._db.guarded("renew leases", self._renew)

    def _claim(self, call_id: str | None) -> list[Delivery]:
        # A claim cancelled with its run (the budget ran out) may still reach its thread
        # after the leases were handed back: it must not take new ones, which nobody
        # would deliver or hand back (seen once in test_faults under load).
        if self._ended:
            return []
        return outbox.claim(
            self._db.conn(),
            owner=self.owner,
            now=now_us(),
            lease_us=int(self.policy.lease_s * 1e6),
            limit=self.policy.claim_batch,
            key_fp=self.key_fp,
            call_id=call_id,
        )

    def _finalize_orphans(self, call_id: str | None = None) -> list[str]:
        return finalize_orphans(self._db.conn(), self.directory, self.policy, call_id)

    def _prune(self) -> None:
        prune(self._db.conn(), self.directory, self.policy)

    def _renew(self) -> None:
        outbox.renew_leases(self._db.conn(), self.owner, now_us() + int(self.policy.lease_s * 1e6))

    def _release_all(self) -> None:
        conn = self._db.conn_if_open()
        if conn is not None:
            outbox.release(conn, self.owner)

    def _next_due_in(self, call_id: str | None) -> float | None:
        """Seconds until a row of ours can be claimed; None when nothing of ours is waiting.

        Rows another drainer holds are looked at again after ``poll_s``: they are usually
        delivered by then, or their lease has expired.

        Returns:
            The wait in seconds, or None.
        """
        earliest, leased = outbox.next_due(self._db.conn(), key_fp=self.key_fp, call_id=call_id)
        waits = [] if earliest is None else [max(0.0, (earliest - now_us()) / 1e6)]
        if leased:
            waits.append(self.policy.poll_s)
        return min(waits) if waits else None

    async def _summarize(self, report: DrainReport, call_id: str | None) -> None:
        def count() -> tuple[int, int, list[str]]:
            return outbox.undelivered_counts(self._db.conn(), key_fp=self.key_fp, call_id=call_id)

        try:
            report.pending, report.dead_total, report.skipped_calls = await self._db.run(count)
        except Exception as exc:
            logger.warning(
                f"pipecat-roark: could not count what is left in {self.directory}: {exc}"
            )
