"""pipecat-roark: ship every Pipecat voice call to Roark through a local SQLite WAL.

    from pipecat_roark import RoarkObserver

The observer (and Pipecat with it) is imported lazily, so the ``pipecat-roark`` CLI
starts fast and works where only the database is at hand.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthError,
    ConfigError,
    DeliveryError,
    PermanentError,
    PipecatRoarkError,
    RetryableError,
    StoreCorrupt,
    StoreError,
    StoreForeign,
    StoreFromFuture,
    StoreUnavailable,
    UploadUrlExpired,
)

if TYPE_CHECKING:
    from .observer import RoarkAudioBufferProcessor, RoarkObserver

try:
    __version__ = version("pipecat-roark")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"

__all__ = [
    "AuthError",
    "ConfigError",
    "DeliveryError",
    "PermanentError",
    "PipecatRoarkError",
    "RetryableError",
    "RoarkAudioBufferProcessor",
    "RoarkObserver",
    "StoreCorrupt",
    "StoreError",
    "StoreForeign",
    "StoreFromFuture",
    "StoreUnavailable",
    "UploadUrlExpired",
    "__version__",
]

_LAZY = {"RoarkObserver", "RoarkAudioBufferProcessor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import observer

        return getattr(observer, name)
    raise AttributeError(f"module 'pipecat_roark' has no attribute {name!r}")
