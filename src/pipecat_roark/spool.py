"""Recording chunks as files: ``<dir>/chunks/<call>/<index>.pcm``.

A chunk is written to a temporary name, fsynced, renamed and its folder fsynced, and
only then recorded in the database: a row always points at a complete file, and a
crash between the two leaves at worst an unreferenced file, never a truncated chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import crashpoints

__all__ = [
    "SpooledChunk",
    "call_folder",
    "chunk_relpath",
    "discard_chunk",
    "read_chunk",
    "remove_call",
    "write_chunk",
]

_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,80}$")


@dataclass(frozen=True, slots=True)
class SpooledChunk:
    relpath: str
    size: int
    sha256: str


def call_folder(call_id: str) -> str:
    """A folder name for a call id: the id itself when it is filesystem-safe, else a hash."""
    if _SAFE.match(call_id) and call_id not in (".", ".."):
        return call_id
    return "h-" + hashlib.sha256(call_id.encode()).hexdigest()[:32]


def chunk_relpath(call_id: str, index: int) -> str:
    return f"chunks/{call_folder(call_id)}/{index:06d}.pcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_private(path: Path) -> bool:
    """mkdir 0700; True when it was created (its parent then needs an fsync)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def write_chunk(root: Path, call_id: str, index: int, data: bytes) -> SpooledChunk:
    """Write one chunk durably (tmp → fsync → rename → fsync folder). Raises OSError."""
    rel = chunk_relpath(call_id, index)
    target = root / rel
    folder = target.parent
    if _mkdir_private(folder.parent):
        _fsync_dir(root)
    if _mkdir_private(folder):
        _fsync_dir(folder.parent)
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        half = len(data) // 2
        written = os.write(fd, view[:half]) if half else 0
        view = view[written:]
        crashpoints.reached("chunk-half-written")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(folder)
    return SpooledChunk(rel, len(data), hashlib.sha256(data).hexdigest())


def read_chunk(root: Path, relpath: str) -> bytes:
    """The bytes of a recorded chunk. Raises OSError (e.g. FileNotFoundError)."""
    return (root / relpath).read_bytes()


def discard_chunk(root: Path, relpath: str) -> None:
    """Delete one chunk file (already gone is fine), and its call folder once empty."""
    target = root / relpath
    target.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty yet, or already gone
        target.parent.rmdir()


def remove_call(root: Path, call_id: str) -> int:
    """Delete a call's chunk folder; returns the bytes freed."""
    folder = root / "chunks" / call_folder(call_id)
    if not folder.is_dir():
        return 0
    freed = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    shutil.rmtree(folder, ignore_errors=True)
    return freed
