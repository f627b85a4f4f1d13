"""What goes wrong in the dev server on purpose.

The settings (``Faults``, changeable at run time through ``POST /_dev/config``) and how
each request meets them (``FaultInjector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .state import error_response

__all__ = ["Abort", "FaultInjector", "Faults", "connected"]


@dataclass
class Faults:
    """What goes wrong, on purpose. Changeable at runtime through ``POST /_dev/config``."""

    fail_rate: float = 0.0
    """Fraction of requests answered 503 (seeded)."""
    latency_ms: int = 0
    status_sequence: list[int] = field(default_factory=list)
    """Statuses served to the next requests, in order, before normal service resumes."""
    reset_rate: float = 0.0
    """Fraction of requests whose connection is dropped without an answer."""
    url_ttl_s: float = 900.0
    garbage_rate: float = 0.0
    """Fraction of chunk-upload-url answers that are 200 with a truncated body."""
    retry_after_s: float = 1.0
    accepted_keys: list[str] = field(default_factory=list)
    """Empty: any non-empty key is accepted."""
    bare_url_response: bool = False
    upload_answer_patch: dict[str, Any] = field(default_factory=dict)
    """Fields that override the chunk-upload-url answer (a bad ``uploadUrl``, say)."""
    trickle_s: float = 0.0
    """Roark answers are sent a byte at a time over this many seconds (a stuck peer)."""
    seed: int = 0
    strict_order: bool = False
    """Refuse (409) requests of a call that arrive out of order, instead of accepting them."""
    rendezvous: int = 0
    """Hold the next N requests until all N are in flight (at most 30 s), then answer them:
    proves that N clients really work at the same time."""


class Abort(Exception):
    """Drop the connection without an answer."""


class FaultInjector:
    """Applies the ``Faults`` to each request, with seeded chances so a run can be replayed.

    Args:
        faults: the settings, kept and changed in place by ``configure``.
    """

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._rendezvous: list[asyncio.Event] = []

    def configure(self, **changes: Any) -> None:
        """Change settings by name; a new ``seed`` restarts the chances.

        Raises:
            ValueError: a name ``Faults`` does not have (the settings before it are applied).
        """
        for name, value in changes.items():
            if not hasattr(self.faults, name):
                raise ValueError(f"unknown dev-server setting {name!r}")
            setattr(self.faults, name, value)
        if "seed" in changes:
            self._rng = random.Random(self.faults.seed)

    def chance(self, rate: float) -> bool:
        """Whether this call is one of the seeded fraction ``rate`` that meets the fault.

        Returns:
            True for about ``rate`` of the calls; False without drawing when ``rate`` is 0.
        """
        return bool(rate) and self._rng.random() < rate

    async def before_answer(self) -> web.Response | None:
        """The injected answer for this request, if any, after any injected wait.

        Returns:
            An error response to send instead of the real answer, or None to answer normally.

        Raises:
            Abort: the connection is to be dropped without an answer (a status 0 in
                ``status_sequence``, or a ``reset_rate`` draw).
        """
        faults = self.faults
        if faults.rendezvous:
            await self._meet()
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.status_sequence:
            status = faults.status_sequence.pop(0)
            if status == 0:
                raise Abort
            if status >= 300:
                return error_response(
                    status,
                    f"injected {status}",
                    retry_after=faults.retry_after_s if status == 429 else None,
                )
        if self.chance(faults.reset_rate):
            raise Abort
        if self.chance(faults.fail_rate):
            return error_response(503, "injected 503: service unavailable")
        return None

    async def _meet(self) -> None:
        """One of the next ``rendezvous`` requests: wait until all of them have arrived."""
        arrived = asyncio.Event()
        self._rendezvous.append(arrived)
        if len(self._rendezvous) >= self.faults.rendezvous:
            self.faults.rendezvous = 0
            for event in self._rendezvous:
                event.set()
            self._rendezvous = []
            return
        with contextlib.suppress(TimeoutError):  # the others never came: answer anyway
            await asyncio.wait_for(arrived.wait(), timeout=30)

    async def trickle(self, request: web.Request, response: web.Response) -> web.StreamResponse:
        """Send the answer a byte at a time over ``trickle_s``, a peer that is stuck but alive.

        Each byte comes well within any per-read timeout, the whole answer does not. Stops
        when the client hangs up.

        Returns:
            The streamed response, complete or cut short where the client went away.
        """
        assert isinstance(response.body, bytes)
        body = response.body
        stream = web.StreamResponse(status=response.status)
        stream.content_type = response.content_type
        stream.content_length = len(body)
        await stream.prepare(request)
        step = self.faults.trickle_s / max(1, len(body))
        try:
            for i in range(len(body)):
                started = time.monotonic()
                while time.monotonic() - started < step:
                    if not connected(request):
                        return stream
                    await asyncio.sleep(min(0.01, step))
                await stream.write(body[i : i + 1])
            await stream.write_eof()
        except ConnectionError:  # the client hung up between two checks
            pass
        return stream


def connected(request: web.Request) -> bool:
    """Whether the client of ``request`` is still there to read an answer.

    Returns:
        True while the request's transport is open and not closing.
    """
    transport = request.transport
    return transport is not None and not transport.is_closing()
