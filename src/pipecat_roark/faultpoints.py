"""Named places where tests make one call's work raise an arbitrary exception.

The crash suite (``crashpoints``) proves what survives a SIGKILL; this proves the
bulkheads: an exception raised while handling one call's op or row must touch only
that call. ``inject(point, exc, call_id=…)`` arms a point in this process; the writer
and the drainer call ``reached(point, call_id)`` at each step. Armed with a ``Hold``,
the point waits for a gate instead of raising: one call's step is slow, and a test
proves the other calls do not wait for it. Nothing is armed in production, where
``reached`` is one truth test of an empty dict.

Points (each is a step that handles one call's data):

- writer: ``writer:open``, ``writer:event``, ``writer:chunk-file``, ``writer:chunk``,
  ``writer:finalize``; and ``writer:chunk-file-written``, for a ``Hold`` only: a chunk's
  file is durable on disk and its spool thread has not told the writer yet (what a
  starved spool thread looks like to the writer)
- drainer: ``drain:load``, ``drain:assemble``, ``drain:mint-url``, ``drain:read-chunk``,
  ``drain:put``, ``drain:post``, ``drain:mark-delivered``, ``drain:finalize-orphan``
"""

from __future__ import annotations

import threading

__all__ = ["HOLD_LIMIT_S", "POINTS", "Hold", "clear", "inject", "reached"]

POINTS = (
    "writer:open",
    "writer:event",
    "writer:chunk-file",
    "writer:chunk-file-written",
    "writer:chunk",
    "writer:finalize",
    "drain:load",
    "drain:assemble",
    "drain:mint-url",
    "drain:read-chunk",
    "drain:put",
    "drain:post",
    "drain:mark-delivered",
    "drain:finalize-orphan",
)

HOLD_LIMIT_S = 30.0
"""A held point goes on after this long even if its gate is never opened."""


class Hold(BaseException):
    """Armed in place of an error: the point waits for ``gate`` (at most ``HOLD_LIMIT_S``)."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__("held by a test")
        self.gate = gate


_ARMED: dict[str, tuple[str | None, BaseException, int]] = {}
_LOCK = threading.Lock()


def inject(point: str, exc: BaseException, *, call_id: str | None = None, times: int = -1) -> None:
    """Raise ``exc`` whenever ``point`` is reached for ``call_id`` (any call if None).

    ``times`` limits how often it fires (-1: every time), so a test can prove a retry.

    Raises:
        ValueError: ``point`` is not one of ``POINTS`` (a typo would never fire).
    """
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    with _LOCK:
        _ARMED[point] = (call_id, exc, times)


def clear() -> None:
    """Disarm every point."""
    with _LOCK:
        _ARMED.clear()


def reached(point: str, call_id: str) -> None:
    """Raise the exception armed at ``point`` for this call, if any."""
    if not _ARMED:
        return
    with _LOCK:
        armed = _ARMED.get(point)
        if armed is None:
            return
        target, exc, times = armed
        if target is not None and target != call_id:
            return
        if times == 0:
            return
        if times > 0:
            _ARMED[point] = (target, exc, times - 1)
    if isinstance(exc, Hold):
        exc.gate.wait(HOLD_LIMIT_S)
        return
    raise exc
