"""IdleWatchdog: ends a call whose session vanished without an EndFrame.

A live pipeline produces audio frames continuously, even in silence, so a call that
has seen no frame for ``idle_timeout_s`` is gone (a Pipecat Cloud session that vanished,
a transport that died quietly). The watchdog is a timer in the event loop, re-armed
at a fraction of the timeout, never a task that polls per frame: the frame path only
stores ``last_frame``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

__all__ = ["DEFAULT_IDLE_TIMEOUT_S", "IdleWatchdog"]

DEFAULT_IDLE_TIMEOUT_S = 600.0
"""No frame at all for this long means the session vanished (the pipeline produces audio
frames continuously while a call lives, even in silence)."""


class IdleWatchdog:
    """Calls ``on_vanished`` once no frame came for ``idle_timeout_s`` (None: never)."""

    def __init__(
        self,
        idle_timeout_s: float | None,
        *,
        who: Any,
        call_id: str,
        ended: Callable[[], bool],
        on_vanished: Callable[[], Coroutine[Any, Any, None]],
        guard: Callable[..., None],
    ) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._who = who
        self._call_id = call_id
        self._ended = ended
        self._on_vanished = on_vanished
        self._guard = guard
        self.last_frame = time.monotonic()
        """Monotonic time of the observer's latest frame."""
        self._timer: asyncio.TimerHandle | None = None
        self._vanished: asyncio.Task[None] | None = None

    def start(self) -> None:
        """The call opened: count idleness from now."""
        self.last_frame = time.monotonic()
        self._arm()

    def cancel(self) -> None:
        """The call ended: nothing left to watch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._idle_timeout_s is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        remaining = self._idle_timeout_s - (time.monotonic() - self.last_frame)
        delay = max(0.05, min(remaining, self._idle_timeout_s / 4, 30.0))
        self._timer = loop.call_later(delay, self._guard, self._watchdog_tick)

    def _watchdog_tick(self) -> None:
        self._timer = None
        if self._ended() or self._idle_timeout_s is None:
            return
        idle = time.monotonic() - self.last_frame
        if idle < self._idle_timeout_s:
            self._arm()
            return
        logger.warning(
            f"{self._who}: no frame for {idle:.0f} s: the session vanished without an EndFrame; "
            f"finalizing call {self._call_id} (reason session-vanished). Call "
            "`await roark.aflush()` when your client disconnects to end calls sooner"
        )
        self._vanished = asyncio.ensure_future(self._on_vanished())
