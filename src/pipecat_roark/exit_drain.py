"""Delivery on the way out: the bounded drain at process exit, and a call's last delivery.

A call's own delivery is the one it gets when it ends while its host shuts down.

Both build a ``Drainer`` for the one run they need, with the key of the object that asked
(``DeliveryTarget``: the observer's own delivery settings); nothing here keeps a key.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from loguru import logger

from .drain import Drainer
from .drain_policy import DrainPolicy
from .outbox import release_process_leases
from .owner import current_owner
from .store import connect

__all__ = ["DeliveryTarget", "deliver_before_exit", "run_exit_drain"]


class DeliveryTarget(Protocol):
    """Where and with which key one observer's calls are delivered (its ``CallDelivery``)."""

    @property
    def directory(self) -> Path:
        """The data directory the calls are recorded in."""
        ...

    @property
    def api_key(self) -> str | None:
        """The key to deliver with; None: nothing is delivered at exit."""
        ...

    @property
    def base_url(self) -> str | None:
        """Roark's address; None for the configured default."""
        ...

    @property
    def deliver(self) -> bool:
        """Whether the observer delivers at all (False: record only)."""
        ...

    @property
    def exit_drain_s(self) -> float:
        """The longest the exit drain may take for these calls; 0 skips it."""
        ...

    @property
    def keep_delivered_audio(self) -> bool:
        """Keep chunk files once Roark has the whole call."""
        ...


def run_exit_drain(targets: Sequence[DeliveryTarget]) -> None:
    """Deliver what this process recorded, bounded by each target's ``exit_drain_s``.

    Runs in a thread of its own with a fresh event loop: the bot's loop may be gone, or
    blocked in the main thread, and neither may be touched.
    """
    targets = [t for t in targets if t.api_key and t.exit_drain_s > 0]
    if not targets:
        return
    budget = max(t.exit_drain_s for t in targets)
    deadline = time.monotonic() + budget

    def drain_all() -> None:
        asyncio.run(_drain_targets(targets, deadline))

    thread = threading.Thread(target=drain_all, name="pipecat-roark-exit-drain", daemon=True)
    thread.start()
    thread.join(budget + 0.5)
    if thread.is_alive():
        logger.warning(
            f"pipecat-roark: the final drain did not finish within {budget:.0f} s; what is left "
            "stays on disk for `pipecat-roark drain` (mount a volume on ephemeral containers)"
        )


async def _drain_targets(targets: Sequence[DeliveryTarget], deadline: float) -> None:
    for target in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            assert target.api_key is not None  # filtered by run_exit_drain
            _release_leases_of_this_process(target.directory)
            policy = DrainPolicy(keep_delivered_audio=target.keep_delivered_audio)
            drainer = Drainer(
                target.directory, target.api_key, target.base_url, policy, inline_db=True
            )
            await drainer.run_once(budget_s=remaining)
        except Exception as exc:
            logger.error(f"pipecat-roark: final drain of {target.directory} failed: {exc}")


def _release_leases_of_this_process(directory: Path) -> None:
    """The process's own drainers are gone or stuck: what they held is the exit drain's now.

    A row they did send goes again with the same idempotency key.
    """
    conn = connect(directory)
    try:
        released = release_process_leases(conn, current_owner())
    finally:
        conn.close()
    if released:
        logger.debug(f"pipecat-roark: the exit drain took back {released} lease(s) of this process")


async def deliver_before_exit(
    directory: Path,
    api_key: str,
    base_url: str | None,
    call_id: str,
    limit_s: float,
    *,
    keep_delivered_audio: bool = False,
) -> None:
    """A call ended while its host shuts down: deliver it now, bounded, in this loop.

    A host like uvicorn restores the default SIGTERM action once its requests are done
    and re-raises the signal, so the process may die without running atexit.
    """
    if limit_s <= 0:
        return
    try:
        policy = DrainPolicy(keep_delivered_audio=keep_delivered_audio)
        drainer = Drainer(directory, api_key, base_url, policy)
        await asyncio.wait_for(drainer.run_once(call_id=call_id, budget_s=limit_s), limit_s)
    except Exception as exc:  # TimeoutError included: what is left stays on disk
        logger.warning(
            f"pipecat-roark: call {call_id} was not fully delivered before shutdown ({exc!r}); "
            "it stays on disk for `pipecat-roark drain`"
        )
