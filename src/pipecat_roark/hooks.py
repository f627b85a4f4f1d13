"""HookGuard: nothing a call's callbacks raise reaches the pipeline, and each kind is said once.

Observer hooks, processor callbacks and timers of one call all run through it: an
exception there would otherwise silence the observer for good, or stall the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loguru import logger

__all__ = ["HookGuard"]


class HookGuard:
    """Logs a failure of one call's callbacks once per place and exception class.

    Args:
        who: what the log lines name as failing (the observer).
        call_id: the call whose callbacks these are.
    """

    def __init__(self, who: object, call_id: str) -> None:
        self._who = who
        self._call_id = call_id
        self._seen: set[str] = set()

    def guard(self, function: Callable[..., object], *args: Any) -> None:
        """Run a callback; log and swallow what it raises (nothing reaches the pipeline)."""
        try:
            function(*args)
        except Exception as exc:
            self.failed(getattr(function, "__name__", "callback"), exc)

    def failed(self, where: str, exc: BaseException) -> None:
        """Log one failure, once per place and exception class: the call goes on."""
        key = f"{where}:{type(exc).__name__}"
        if key in self._seen:
            return
        self._seen.add(key)
        logger.opt(exception=exc).error(
            f"{self._who}: {where} failed ({type(exc).__name__}: {exc}); that frame was skipped "
            f"and call {self._call_id} goes on. Please report this with the traceback"
        )
