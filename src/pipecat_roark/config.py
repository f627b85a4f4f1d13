"""Settings from arguments and the environment, and the API-key fingerprint.

The key itself is never stored or logged; the fingerprint is what ties a recorded call
to the key that may deliver it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
from loguru import logger

from .errors import ConfigError

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MIN_FREE_BYTES",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_DIR",
    "ENV_DELIVERY_PROCESS",
    "ENV_WRITER_PROCESS",
    "child_environment",
    "key_fingerprint",
    "registry_key",
    "resolve_api_key",
    "resolve_base_url",
    "resolve_dir",
    "resolve_delivery_process",
    "resolve_writer_process",
]

DEFAULT_BASE_URL = "https://api.roark.ai"
ENV_API_KEY = "ROARK_API_KEY"
ENV_BASE_URL = "ROARK_BASE_URL"
ENV_DIR = "PIPECAT_ROARK_DIR"
ENV_WRITER_PROCESS = "PIPECAT_ROARK_WRITER_PROCESS"
ENV_DELIVERY_PROCESS = "PIPECAT_ROARK_DELIVERY_PROCESS"
DEFAULT_MIN_FREE_BYTES = 64 << 20
"""Free disk space to leave alone (64 MiB): below it new audio is not recorded, so the
events of every call can still commit; ``doctor`` warns below it."""

_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}

_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW(OR)?D|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)
"""Names of variables a child of ours has no use for and should not hold: a bot's
environment carries its other services' keys (OpenAI, Deepgram, Daily, cloud tokens)."""


def child_environment(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment for a child of ours, without what looks like a secret.

    The children only write our database or deliver to Roark; every other key stays in
    the bot. The Roark key is set again by the one child that needs it.

    Returns:
        A copy of ``os.environ`` without secret-looking names and without ``drop``.
    """
    return {
        name: value
        for name, value in os.environ.items()
        if name not in drop and not _SECRET_NAME.search(name)
    }


def resolve_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: the argument, else ``PIPECAT_ROARK_DIR``, else the user state dir.

    Returns:
        The directory with ``~`` expanded (it may not exist yet).
    """
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_state_dir("pipecat-roark", appauthor=False))


def resolve_writer_process(explicit: bool | None = None) -> bool:
    """The argument, else ``PIPECAT_ROARK_WRITER_PROCESS`` (``1``/``true``/``yes``).

    Returns:
        Whether calls are recorded from a writer child process; a value it cannot read
        is said once in the log and means no.
    """
    return _switch(explicit, ENV_WRITER_PROCESS, "recording in this process")


def resolve_delivery_process(explicit: bool | None = None) -> bool:
    """The argument, else ``PIPECAT_ROARK_DELIVERY_PROCESS`` (``1``/``true``/``yes``).

    Returns:
        Whether calls are delivered from a delivery child process; a value it cannot
        read is said once in the log and means no.
    """
    return _switch(explicit, ENV_DELIVERY_PROCESS, "delivering from this process")


def _switch(explicit: bool | None, name: str, otherwise: str) -> bool:
    """A yes/no setting: ``explicit``, else environment variable ``name``, else no.

    Returns:
        The setting; a value of ``name`` that is neither yes nor no is said once (with
        ``otherwise``, what the process does instead) and means no.
    """
    if explicit is not None:
        return explicit
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw not in ("", "0", "false", "no", "off"):
        _warn_once(f"pipecat-roark: {name}={raw!r} is not 1 or 0; {otherwise}")
    return False


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def registry_key(directory: Path) -> Path:
    """The one spelling of a data directory that the process's registries are keyed by.

    Returns:
        The directory, ``~`` expanded and resolved.
    """
    return directory.expanduser().resolve()


def resolve_api_key(explicit: str | None = None) -> str | None:
    """The argument, else ``ROARK_API_KEY``; blank counts as missing.

    Returns:
        The key without surrounding whitespace, or None.
    """
    key = explicit if explicit is not None else os.environ.get(ENV_API_KEY)
    key = (key or "").strip()
    return key or None


def resolve_base_url(explicit: str | None = None) -> str:
    """The Roark base URL: the argument, else ``ROARK_BASE_URL``, else Roark's own.

    Returns:
        The URL without a trailing slash.

    Raises:
        ConfigError: it is not an http(s) URL, or uses plain http to a non-loopback host.
    """
    url = (explicit or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{ENV_BASE_URL}={url!r} is not an http(s) URL: set it to e.g. {DEFAULT_BASE_URL}"
        )
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ConfigError(
            f"{ENV_BASE_URL}={url!r} uses plain http to a non-loopback host: use https "
            "(plain http is allowed only for localhost / 127.0.0.1 / ::1)"
        )
    return url


def key_fingerprint(key: str | None) -> str | None:
    """A short, non-reversible tag of the key, safe for disk and logs.

    Returns:
        ``sha256:`` and 12 hex digits, or None without a key.
    """
    if not key:
        return None
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]
