"""The lock a writer child holds while it may still write its bot's calls.

A bot recording with ``writer_process=True`` can die (even of SIGKILL) while its writer
child still has records of the bot's calls to commit: the child reads what is left in its
pipe, commits it and exits. Those calls carry the bot's owner identity, whose pid is then
dead; a drainer judging by that pid alone ended them as ``observer-lost`` and delivered
call-ended, and the child's later records landed after it (chunks refused by Roark,
transcript never sent).

So, for as long as the child lives, an exclusive ``flock`` is held on a file in the data
directory named from a hash of the bot's owner token (``owner-<hash>.lock``, 0600; the
token holds no secret, and the name not even the token). The bot takes it before it
starts the child and hands the open file over (a ``flock`` belongs to the open file, so it
goes with it): there is no moment when the child may write and holds nothing. A drainer
that finds an owner's lock held leaves its calls open until a later pass. A ``flock``
dies with the last process that holds it, so a child killed with SIGKILL leaves a file
that holds nothing: the drainer ends the calls at once and sweeps the file away. A child
that exits cleanly removes its file itself.

A filesystem that cannot lock (some network and FUSE filesystems) is said once per
writer child, and then nothing is held: calls are judged as before, by pid or heartbeat.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
from pathlib import Path

from loguru import logger

__all__ = ["PATTERN", "is_held", "lock_path", "release", "sweep", "take"]

PATTERN = "owner-*.lock"
"""The names of lock files in a data directory."""
_TAKE_TRIES = 100
"""How often ``take`` tries for the lock, ``_TAKE_WAIT_S`` apart (a drainer's look is brief)."""
_TAKE_WAIT_S = 0.01
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
"""What ``flock`` answers on a filesystem that cannot lock."""


def lock_path(directory: Path, token: str) -> Path:
    """Where the lock of the owner with ``token`` lives.

    Returns:
        ``DIR/owner-<first 32 hex digits of sha256(token)>.lock``.
    """
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    return directory / f"owner-{digest}.lock"


def take(directory: Path, token: str) -> int | None:
    """Hold the owner's lock (exclusive) in a new open file, created 0600 if need be.

    Blocks for at most about a second (a drainer looking holds it for a moment); call
    it from a thread, never from an event loop.

    Returns:
        The open file descriptor that holds the lock (not inheritable; pass it on
        explicitly), or None, said once, where it cannot be held: the filesystem cannot
        lock, the directory refuses the file, or another process holds it.
    """
    path = lock_path(directory, token)
    for _ in range(_TAKE_TRIES):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            _cannot_hold(path, f"it cannot be created ({exc})")
            return None
        try:
            os.fchmod(fd, 0o600)  # a file left wider by someone else does not stay so
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            time.sleep(_TAKE_WAIT_S)
            continue
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                with contextlib.suppress(OSError):
                    path.unlink()
                _cannot_hold(path, "this filesystem cannot lock files")
            else:
                _cannot_hold(path, f"it cannot be locked ({exc})")
            return None
        if _names(fd, path):
            return fd
        os.close(fd)  # a sweep removed the file between our open and our lock: again
    _cannot_hold(path, "another process holds it")
    return None


def _cannot_hold(path: Path, why: str) -> None:
    logger.warning(
        f"pipecat-roark: the writer process cannot hold {path} ({why}); if the bot dies "
        "while the writer process still commits, a drainer may end its calls first"
    )


def _names(fd: int, path: Path) -> bool:
    """Is the open file ``fd`` still the one at ``path`` (no sweep removed it)?

    Returns:
        True if ``path`` exists and is the same file.
    """
    try:
        at_path = path.lstat()
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def is_held(directory: Path, token: str) -> bool:
    """Does a live process hold the lock of the owner with ``token`` (a writer child)?

    Looks without creating anything: a shared, non-blocking lock taken and let go.

    Returns:
        True only while another process holds the lock; False when there is no file,
        nobody holds it, or the filesystem cannot tell.
    """
    try:
        fd = os.open(lock_path(directory, token), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # lets go of the shared lock if it was taken
    return False


def sweep(directory: Path) -> int:
    """Remove the lock files that no process holds (their writer children were killed).

    Each is removed under a shared lock: no writer child holds it, none can take it
    meanwhile, and a drainer looking at the same moment still sees it free (a ``take``
    that opened it before it went checks that the file it locked is still the one at its
    path, and starts again).

    Returns:
        How many files were removed.
    """
    removed = 0
    for path in directory.glob(PATTERN):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if _names(fd, path):
                path.unlink()
                removed += 1
        except OSError:  # held (a live child), or the filesystem cannot lock: left alone
            pass
        finally:
            os.close(fd)
    return removed


def release(directory: Path, token: str, fd: int) -> None:
    """At a writer child's clean exit: remove its lock file, then let go of the lock."""
    path = lock_path(directory, token)
    try:
        if _names(fd, path):
            path.unlink()
    except OSError as exc:
        logger.warning(f"pipecat-roark: could not remove {path} ({exc}); a drainer will")
    finally:
        os.close(fd)
