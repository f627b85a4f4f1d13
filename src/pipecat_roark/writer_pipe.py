"""What travels between a bot and its writer child (``writer_process``), both ways.

Bot → child, on the child's stdin: frames, each a 4-byte length and a pickle of
``(seq, ops)``. The ops are the writer's own (``ops.py``), except that a flush's
callback cannot cross a process: it travels as a ``RemoteBarrier`` with a number.

Child → bot, on a pipe of their own (``--answers-fd``; the child's stdout is the bot's,
for whatever its interpreter prints): 9-byte messages, a kind and a number:
``COMMITTED`` (every frame up to this seq is committed), ``RELEASED`` (this barrier's
records are committed), ``DELIVERIES`` (a commit added deliveries: wake a drainer), and
``LOG``, followed by that many bytes: a log line of the child (``LEVEL<tab>message``),
which the bot logs through its own loguru, so the user's sinks see it like any other line.

Pickle is safe here: both ends are this package, in processes of the same user, and
the pipe is private to them. It is also the cheapest encoding of the ops on the bot's
side (one C call per frame).
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any, NamedTuple

from loguru import logger

from .ops import Op

__all__ = [
    "COMMITTED",
    "DELIVERIES",
    "LOG",
    "MESSAGE",
    "RELEASED",
    "RemoteBarrier",
    "decode_frame",
    "encode_frame",
    "log_child_line",
    "read_exactly",
    "split_answers",
    "write_all",
]

COMMITTED = b"C"
RELEASED = b"R"
DELIVERIES = b"D"
LOG = b"L"
MESSAGE = struct.Struct("<cQ")
"""Child → bot: a kind and a number (a seq, a barrier's number, or 0)."""
_LENGTH = struct.Struct("<I")


class RemoteBarrier(NamedTuple):
    """A ``BarrierOp`` on its way to the child: the bot keeps its callback by ``number``."""

    number: int
    call_id: str | None


def encode_frame(seq: int, ops: list[Any]) -> bytes:
    """One frame of ops for the child's stdin.

    Returns:
        The length-prefixed pickle of ``(seq, ops)``.
    """
    body = pickle.dumps((seq, ops), protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def decode_frame(fd: int) -> tuple[int, list[Op | RemoteBarrier]] | None:
    """Read the next frame from ``fd`` (blocking).

    Returns:
        ``(seq, ops)``, or None at a clean end of the stream (the bot closed it or died
        between frames).

    Raises:
        EOFError: the stream ended inside a frame (the bot died while writing it).
    """
    header = _read_upto(fd, _LENGTH.size)
    if not header:
        return None
    if len(header) < _LENGTH.size:
        raise EOFError("the stream ended inside a frame's length")
    (size,) = _LENGTH.unpack(header)
    body = read_exactly(fd, size)
    if body is None:
        raise EOFError("the stream ended inside a frame")
    seq, ops = pickle.loads(body)
    return int(seq), list(ops)


def split_answers(buffer: bytearray) -> list[tuple[bytes, int, bytes]]:
    """Take the whole answers off the front of ``buffer`` (bytes read from the child so far).

    A message cut short by a read stays in ``buffer`` for the next read's bytes.

    Returns:
        ``(kind, number, log line)`` per answer; the line is empty but for ``LOG``.
    """
    answers = []
    size = MESSAGE.size
    start = 0
    while len(buffer) - start >= size:
        kind, number = MESSAGE.unpack_from(buffer, start)
        end = start + size + (number if kind == LOG else 0)
        if len(buffer) < end:
            break  # the rest of the line comes with the next read
        answers.append((kind, number, bytes(buffer[start + size : end])))
        start = end
    del buffer[:start]
    return answers


def read_exactly(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``, or None if it ends first (blocking, releases the GIL).

    Returns:
        The bytes, or None at end of stream (also part-way: the sender died mid-write).
    """
    data = _read_upto(fd, size)
    return data if len(data) == size else None


def _read_upto(fd: int, size: int) -> bytes:
    """``size`` bytes from ``fd``, or fewer if it ends first (blocking, releases the GIL).

    Returns:
        The bytes read: short only at end of stream.
    """
    parts: list[bytes] = []
    left = size
    while left:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking ``fd`` (a pipe may take it in several writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def log_child_line(line: bytes) -> None:
    """A ``LOG`` answer's line (``LEVEL<tab>message``), through this process's loguru."""
    level, _, text = line.decode(errors="replace").partition("\t")
    try:
        logger.log(level, text)
    except ValueError:  # a level this loguru does not know
        logger.error(text)
