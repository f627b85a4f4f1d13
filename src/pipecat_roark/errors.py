"""Every error pipecat-roark raises, in one tree.

    PipecatRoarkError
    ├── ConfigError                  bad argument or environment (CLI exit 2)
    ├── StoreError                   the local WAL cannot be used as it is
    │   ├── StoreUnavailable         directory missing/unwritable, disk full, locked
    │   ├── StoreCorrupt             not a database, or integrity check failed
    │   ├── StoreForeign             a SQLite file that is not ours
    │   └── StoreFromFuture          written by a newer pipecat-roark: never altered
    └── DeliveryError                one delivery attempt to Roark failed
        ├── RetryableError           try again later (``retry_after`` seconds, if known):
        │   │                        transport errors, timeouts, 3xx, 408, 429, 5xx
        │   └── UploadUrlExpired     the presigned URL was refused: mint a new one
        ├── AuthError                Roark refused the API key: pause that key
        └── PermanentError           Roark refused the request, or gave an unusable
                                     upload URL: the row goes dead

The drainer acts on the class alone; ``client.py`` is the one boundary where transport
errors and HTTP statuses become these classes. Exceptions from anywhere else while a
row is handled (a decoder, an encoder, the disk, a bug) are classified by the drainer's
one per-row boundary (``RowDelivery.deliver``). Every message is one line that says what
happened and what to do.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "DeliveryError",
    "PermanentError",
    "PipecatRoarkError",
    "RetryableError",
    "StoreCorrupt",
    "StoreError",
    "StoreForeign",
    "StoreFromFuture",
    "StoreUnavailable",
    "UploadUrlExpired",
]


class PipecatRoarkError(Exception):
    """Base class of every error this package raises."""


class ConfigError(PipecatRoarkError):
    """A setting or argument is wrong; the message says which and how to fix it."""


class StoreError(PipecatRoarkError):
    """The local database or chunk directory cannot be used."""


class StoreUnavailable(StoreError):
    """The directory or database cannot be opened or written right now."""


class StoreCorrupt(StoreError):
    """The database file is damaged or not a database."""


class StoreForeign(StoreError):
    """The file is a SQLite database, but not a pipecat-roark one."""


class StoreFromFuture(StoreError):
    """The database schema is newer than this version understands.

    Args:
        message: what to tell the user.
        found: the schema version in the file.
        supported: the newest version this code knows.
    """

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class DeliveryError(PipecatRoarkError):
    """One attempt to deliver a row failed.

    Args:
        message: what went wrong, kept as the row's last error.
        status: the HTTP status, or None when no answer came.
        body: the start of the answer's body, for the operator.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class RetryableError(DeliveryError):
    """Transient: network trouble, a missed deadline, 3xx, 408, 429, 5xx.

    Args:
        message: as ``DeliveryError``.
        status: as ``DeliveryError``.
        body: as ``DeliveryError``.
        retry_after: the server's wish (Retry-After, in seconds), if it said one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class UploadUrlExpired(RetryableError):
    """Object storage refused the presigned PUT (expired or bad signature)."""


class AuthError(DeliveryError):
    """Roark answered 401/403: the API key is wrong or revoked."""


class PermanentError(DeliveryError):
    """Retrying will not help: Roark refused the request, or its upload URL cannot be used.

    Refused means a 4xx other than 401/403/408/429.
    """
