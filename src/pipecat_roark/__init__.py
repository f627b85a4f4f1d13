"""pipecat-roark: ship every Pipecat voice call to Roark through a local SQLite WAL.

    from pipecat_roark import RoarkObserver

The public API is what ``__all__`` names: the observer and its audio processor, the
drainer (``Drainer``, ``DrainPolicy``, ``DrainReport``) and the errors. Besides this
root, ``pipecat_roark.testing`` and ``pipecat_roark.devserver`` are supported for import;
every other module is internal. The observer (and Pipecat with it) and the drainer are
imported lazily, so the ``pipecat-roark`` CLI starts fast and works where only the
database is at hand.
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
    from .drain import Drainer, DrainPolicy, DrainReport
    from .observer import RoarkAudioBufferProcessor, RoarkObserver

try:
    __version__ = version("pipecat-roark")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"

__all__ = [
    "AuthError",
    "ConfigError",
    "DeliveryError",
    "DrainPolicy",
    "DrainReport",
    "Drainer",
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

_FROM_OBSERVER = frozenset({"RoarkObserver", "RoarkAudioBufferProcessor"})
_FROM_DRAIN = frozenset({"Drainer", "DrainPolicy", "DrainReport"})


def __getattr__(name: str) -> Any:
    """Import on first use: the observer brings Pipecat, the drainer httpx (CLI speed).

    Returns:
        The public name ``name``, from the module that defines it.

    Raises:
        AttributeError: ``name`` is not one of the lazily imported names.
    """
    if name in _FROM_OBSERVER:
        from . import observer

        return getattr(observer, name)
    if name in _FROM_DRAIN:
        from . import drain

        return getattr(drain, name)
    raise AttributeError(f"module 'pipecat_roark' has no attribute {name!r}")
