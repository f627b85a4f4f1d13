"""A drainer's view of its API key's pause: refused by Roark, tried again, lifted.

A refused key pauses deliveries for it in every process sharing the database (a
``paused_keys`` row) and drops nothing. The drainer tries the key again every
``auth_probe_s`` (and at the start of every ``run_once``); the first delivery that
succeeds lifts the pause.
"""

from __future__ import annotations

import time

from loguru import logger

from . import paused_keys
from .drain_db import DrainDatabase
from .errors import AuthError
from .store import now_us

__all__ = ["KeyPause"]


class KeyPause:
    """Whether this drainer's key is paused, and the database row that says so.

    Args:
        db: the drainer's database, where the ``paused_keys`` row lives.
        key_fp: the key's fingerprint (never the key), as the row names it.
        probe_every_s: how often a refused key is tried again.
    """

    def __init__(self, db: DrainDatabase, key_fp: str | None, probe_every_s: float) -> None:
        self._db = db
        self._key_fp = key_fp
        self._probe_every_s = probe_every_s
        self._paused_at: float | None = None
        self._maybe_paused = True  # until a delivery succeeds, a pause row may be in the database

    def probe(self) -> None:
        """Try a paused key again; the pause is lifted by the first delivery that succeeds."""
        self._paused_at = None
        self._maybe_paused = True

    def probe_due(self) -> bool:
        """A key paused by this drainer is due to be tried again.

        Returns:
            True once ``probe_every_s`` has passed since this drainer saw the key refused.
        """
        return (
            self._paused_at is not None
            and time.monotonic() - self._paused_at >= self._probe_every_s
        )

    async def refused(self, exc: AuthError) -> None:
        """Roark refused the key: record the pause (said once across processes)."""
        try:
            first = await self._db.run(self._pause, str(exc))
        except Exception as db_exc:
            logger.warning(f"pipecat-roark: could not record the key's pause: {db_exc}")
            first = True
        self._paused_at = time.monotonic()
        self._maybe_paused = True
        if first:
            logger.error(
                f"pipecat-roark: Roark refused the API key {self._key_fp} (HTTP {exc.status}): "
                "deliveries for it are paused and nothing is dropped; set a valid ROARK_API_KEY "
                "and run `pipecat-roark drain`"
            )

    async def accepted(self) -> None:
        """A delivery with the key succeeded: lift a pause that may be recorded."""
        if self._maybe_paused:
            await self._db.guarded("lift the key's pause", self._clear_pause)

    def _pause(self, reason: str) -> bool:
        assert self._key_fp is not None
        return paused_keys.pause_key(self._db.conn(), self._key_fp, reason, now_us())

    def _clear_pause(self) -> None:
        assert self._key_fp is not None
        self._maybe_paused = False
        if paused_keys.unpause_key(self._db.conn(), self._key_fp):
            logger.info(
                f"pipecat-roark: Roark accepts the API key {self._key_fp} again; deliveries resumed"
            )
