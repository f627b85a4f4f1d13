"""Recording chunks as files: ``<dir>/chunks/<call>/<index>.pcm``.

A chunk is written to a temporary name, fsynced, linked to its name and its folder
fsynced, and only then recorded in the database: a row always points at a complete
file, and a crash between the two leaves at worst an unreferenced file, never a
truncated chunk. An existing chunk file is never replaced (a call id used twice must
not change the audio an earlier row's sha256 vouches for): writing the same bytes
again is a no-op, other bytes fail with FileExistsError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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

_SAFE = re.compile(r"^[a-z0-9._-]{1,80}$")
"""Ids used verbatim as folder names: lower case only (case-insensitive filesystems would
merge ``Call-1`` and ``call-1``), and never ``h-…``, the prefix of hashed names."""


@dataclass(frozen=True, slots=True)
class SpooledChunk:
    """A chunk file made durable: where it is (relative to the data dir), its size and hash."""

    relpath: str
    size: int
    sha256: str


def call_folder(call_id: str) -> str:
    """A folder name for a call id: the id itself when it is filesystem-safe, else a hash.

    Distinct ids get distinct folders: a verbatim name cannot start with ``h-``, and the
    hash (128 bits of SHA-256 of the UTF-8 id) does not collide in practice. Ids that
    UTF-8 cannot encode are refused earlier, by ``capture.call_id_problem``.

    Returns:
        The id itself, or ``h-`` and 32 hex digits of its hash.
    """
    if _SAFE.match(call_id) and call_id not in (".", "..") and not call_id.startswith("h-"):
        return call_id
    return "h-" + hashlib.sha256(call_id.encode()).hexdigest()[:32]


def chunk_relpath(call_id: str, index: int) -> str:
    """Where chunk ``index`` of a call lives.

    Returns:
        ``chunks/<call folder>/<index, 6 digits>.pcm``, relative to the data directory.
    """
    return f"chunks/{call_folder(call_id)}/{index:06d}.pcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_private(path: Path) -> bool:
    """Make the folder 0700 if it is missing.

    Returns:
        True when it was created (its parent then needs an fsync).
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def write_chunk(root: Path, call_id: str, index: int, data: bytes) -> SpooledChunk:
    """Write one chunk durably (tmp → fsync → rename → fsync folder).

    Returns:
        Where the chunk file is, with its size and sha256, for its row.

    Raises:
        OSError: the file could not be written (FileExistsError: another chunk file
            already has its name).
    """
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
    try:
        _link_no_clobber(tmp, target, data)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    return SpooledChunk(rel, len(data), hashlib.sha256(data).hexdigest())


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _link_no_clobber(tmp: Path, target: Path, data: bytes) -> None:
    """Give ``tmp`` the name ``target`` unless that name exists (unlike a rename).

    Where the filesystem has no hard links (some network and FUSE mounts), a rename
    after an existence check does it: only this process's writer names its calls' chunks.

    Raises:
        FileExistsError: ``target`` holds other bytes (it is kept as it is).
        OSError: the link or rename failed otherwise.
    """
    try:
        os.link(tmp, target)
    except FileExistsError:
        _same_or_refuse(target, data)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if target.exists():
            _same_or_refuse(target, data)
        else:
            os.replace(tmp, target)


def _same_or_refuse(target: Path, data: bytes) -> None:
    """Writing a chunk again with the same bytes is a no-op; other bytes never replace it.

    Raises:
        FileExistsError: ``target`` holds other bytes.
    """
    if target.read_bytes() != data:
        raise FileExistsError(
            errno.EEXIST,
            "a different chunk file already has this name (a call id used twice?); "
            "it is kept as it is",
            str(target),
        )


def read_chunk(root: Path, relpath: str) -> bytes:
    """The bytes of a recorded chunk.

    Returns:
        The whole file.

    Raises:
        OSError: it cannot be read (FileNotFoundError when it is gone).
    """
    return (root / relpath).read_bytes()


def discard_chunk(root: Path, relpath: str) -> None:
    """Delete one chunk file (already gone is fine), and its call folder once empty."""
    target = root / relpath
    target.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty yet, or already gone
        target.parent.rmdir()


def remove_call(root: Path, call_id: str, relpaths: Iterable[str] = ()) -> int:
    """Delete a call's chunk folder.

    ``relpaths`` are the call's chunk rows: their folder is the call's whatever scheme
    named it (folder names changed once: ids with capitals were verbatim before).

    Returns:
        The bytes of the files deleted.
    """
    freed = 0
    names = {call_folder(call_id)} | {PurePosixPath(p).parent.name for p in relpaths}
    for name in names:
        folder = root / "chunks" / name
        if not name or not folder.is_dir():
            continue
        freed += sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return freed
