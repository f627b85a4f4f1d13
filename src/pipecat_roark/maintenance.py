"""What an operator does to the WAL: prune, forget, export a recording.

Each is a library function the CLI wraps (and the drainer calls ``prune_delivered`` for
automatic retention; checks and repair are ``doctor``'s). Nothing here deletes undelivered data. The statements are the
tables' owners' (``calls_table``, ``chunks_table``, ``events_table``, ``outbox``); this
module composes them in its transactions.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import calls_table, chunks_table, events_table, outbox, spool
from .errors import ConfigError, PipecatRoarkError
from .store import transaction

__all__ = [
    "ExportResult",
    "PruneResult",
    "ForgetResult",
    "discard_delivered_audio",
    "export_wav",
    "forget_call",
    "parse_duration",
    "private_file",
    "prune_delivered",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' or plain seconds → seconds.

    Returns:
        The duration in seconds.

    Raises:
        ConfigError: ``text`` is not a number with an optional unit (s, m, h, d, w).
    """
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"{text!r} is not a duration: use e.g. 90s, 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class PruneResult:
    """What ``prune_delivered`` removed: calls, and bytes of audio freed."""

    calls: int
    bytes: int


def prune_delivered(
    conn: sqlite3.Connection, directory: Path, older_than_s: float, *, now: int
) -> PruneResult:
    """Delete ended calls that were delivered whole (every row) and ended before the cutoff.

    Returns:
        How many calls were deleted, and the bytes of their chunk files.
    """
    cutoff = now - int(older_than_s * 1e6)
    victims = calls_table.delivered_whole_ended_before(conn, cutoff)
    freed = 0
    for call_id in victims:
        paths = chunks_table.chunk_paths(conn, call_id)
        with transaction(conn):
            calls_table.delete_call(conn, call_id)  # rows cascade
        freed += spool.remove_call(directory, call_id, paths)
    return PruneResult(len(victims), freed)


def discard_delivered_audio(
    conn: sqlite3.Connection, directory: Path, call_id: str, *, now: int
) -> int:
    """Delete a call's chunk files once Roark has the whole call.

    "Whole" means the call ended and every one of its rows is delivered: a call with a
    dead row keeps its audio for inspection and ``retry``. The rows stay (marked
    ``discarded_at``) until retention prunes the call, so ``show`` and ``calls`` still
    tell its story.

    Returns:
        The bytes freed (0 when the call is not delivered whole).
    """
    if not calls_table.delivered_whole(conn, call_id):
        return 0
    rows = chunks_table.delivered_chunks_on_disk(conn, call_id)
    freed = 0
    for _idx, rel, size in rows:
        spool.discard_chunk(directory, rel)
        freed += int(size)
    if rows:
        with transaction(conn):
            chunks_table.mark_discarded(conn, call_id, [idx for idx, _, _ in rows], now)
    return freed


@dataclass(frozen=True)
class ForgetResult:
    """What ``forget_call`` erased: the call's state then, its rows and its audio bytes."""

    call_id: str
    state: str
    rows: int
    bytes: int


def forget_call(
    conn: sqlite3.Connection, directory: Path, call_id: str, *, force: bool = False
) -> ForgetResult:
    """Erase one call's local data (rows, events, chunks), delivered or not: erasure requests.

    An open call is refused unless ``force``: its process may still be recording it, and
    would write into a call that no longer exists.

    Returns:
        The call's state before, and how many rows and audio bytes were erased.

    Raises:
        PipecatRoarkError: there is no such call, or it is open and ``force`` is not set.
    """
    state = calls_table.call_record_state(conn, call_id)
    if state is None:
        raise PipecatRoarkError(
            f"no call {call_id!r} in {directory}; list them with `pipecat-roark calls`"
        )
    if state == "open" and not force:
        raise PipecatRoarkError(
            f"call {call_id!r} is still open (a process may be recording it); end it first, "
            "or pass --force to erase it anyway"
        )
    with transaction(conn):
        rows = (
            events_table.count_for_call(conn, call_id)
            + chunks_table.count_for_call(conn, call_id)
            + outbox.count_for_call(conn, call_id)
        )
        calls_table.delete_call(conn, call_id)  # the rest cascades
    freed = spool.remove_call(directory, call_id)
    return ForgetResult(call_id, state, rows + 1, freed)


@dataclass(frozen=True)
class ExportResult:
    """The WAV ``export_wav`` wrote: where, from how many chunks, and its format."""

    path: Path
    chunks: int
    bytes: int
    sample_rate: int
    num_channels: int


def export_wav(conn: sqlite3.Connection, directory: Path, call_id: str, out: Path) -> ExportResult:
    """Rebuild the recording from the chunk files, in index order, as a 16-bit WAV (0600).

    Returns:
        The file written, with its chunk count, audio bytes, rate and channels.

    Raises:
        PipecatRoarkError: the call has no audio, a chunk row is missing (a gap), a
            chunk file is gone, or ``out`` cannot be written. Nothing is left at ``out``
            then.
    """
    rows = chunks_table.recorded_chunks(conn, call_id)
    if not rows:
        raise PipecatRoarkError(f"call {call_id!r} has no recorded audio to export")
    indexes = [r[0] for r in rows]
    if indexes != list(range(len(rows))):
        missing = sorted(set(range(indexes[-1] + 1)) - set(indexes))
        raise PipecatRoarkError(
            f"call {call_id!r} is missing chunk rows {missing}: the WAV would have a gap"
        )
    sample_rate, num_channels = rows[0][3], rows[0][4]
    total = 0
    with private_file(out) as raw, wave.open(raw, "wb") as wav:
        wav.setnchannels(num_channels)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        for idx, rel, _size, _, _, discarded in rows:
            try:
                data = spool.read_chunk(directory, rel)
            except FileNotFoundError:
                raise PipecatRoarkError(
                    f"chunk {idx} of call {call_id!r} is missing on disk ({directory / rel})"
                    + (
                        ": it was deleted once Roark had the call (keep it with "
                        "keep_delivered_audio=True or `drain --keep-delivered-audio`)"
                        if discarded
                        else ""
                    )
                ) from None
            wav.writeframes(data)
            total += len(data)
    return ExportResult(out, len(rows), total, sample_rate, num_channels)


@contextmanager
def private_file(out: Path) -> Iterator[BinaryIO]:
    """Write ``out`` whole or not at all, 0600, never through a link planted for us.

    The temp file comes from mkstemp (O_EXCL, 0600, an unguessable name) in the
    target's folder and is renamed over ``out`` only when complete: a rename replaces
    a symlink at ``out`` itself, never writing or chmodding what it points at.

    Yields:
        The temp file, open for binary writing; it becomes ``out`` if the block ends
        without an exception, and is removed otherwise.

    Raises:
        PipecatRoarkError: the file cannot be created or put in place.
    """
    try:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise PipecatRoarkError(
            f"cannot write {out}: {exc.strerror or exc}; choose a path in a writable folder"
        ) from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as raw:
            yield raw
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.replace(tmp, out)
        except OSError as exc:
            raise PipecatRoarkError(
                f"cannot write {out}: {exc.strerror or exc}; choose another file name"
            ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
