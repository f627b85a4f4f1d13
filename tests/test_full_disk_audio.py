"""A full disk costs a call only the audio that did not fit: the longest gapless prefix of
its chunks is kept, and its events, its end and its deliveries are all recorded.

Each test forces one interleaving of the spool threads, the writer's commits and a full
disk that under load happened by chance (``test_capture_bad_input``'s full-disk test then
kept no audio at all). A real ``Writer`` on a real 1 MiB tmpfs filled to an exact level,
or a fault point where a real disk cannot be made to fail on cue; spool threads and the
writer thread are held on ``faultpoints.Hold`` gates to pick the order.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import stored_events
from pipecat_roark import faultpoints
from pipecat_roark.chunk_spooler import DATABASE_RESERVE_BYTES
from pipecat_roark.events import CallOpened, UserText
from pipecat_roark.ops import BarrierOp, ChunkOp, EventOp, FinalizeOp, OpenOp
from pipecat_roark.writer import Writer
from test_capture_bad_input import tmpfs

CHUNK = bytes(range(256)) * 256  # 64 KiB: sixteen pages of the tmpfs
BIG_CHUNK = CHUNK * 2  # 128 KiB


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faultpoints.clear()
    yield
    faultpoints.clear()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem: a write past its end fails with a real ENOSPC."""
    with tmpfs(tmp_path / "tiny", "1m") as mount:
        yield mount


class Gate(threading.Event):
    """A gate for ``faultpoints.Hold`` (or a held writer) that counts who came to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals = 0
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            self.arrivals += 1
        return super().wait(timeout)


def until(condition: Callable[[], bool]) -> bool:
    """Wait for a condition of files, gates or counters: bounded in count and time."""
    pause = threading.Event()
    for _ in range(3000):
        if condition():
            return True
        pause.wait(0.01)
    return condition()


def free_bytes(mount: Path) -> int:
    stat = os.statvfs(mount)
    return stat.f_bavail * stat.f_frsize


def fill_to(mount: Path, free: int) -> None:
    """Take the disk's room with a filler file until exactly ``free`` bytes are left."""
    with (mount / "filler").open("ab") as filler:
        filler.write(bytes(free_bytes(mount) - free))
        filler.flush()
        os.fsync(filler.fileno())
    assert free_bytes(mount) == free


def rows(directory: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{directory / 'wal.sqlite'}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def open_call(writer: Writer, call_id: str = "a") -> None:
    """The call's open is committed (a barrier on the call is released after its commit)."""
    opened = threading.Event()
    writer.submit(OpenOp(call_id, CallOpened(at=1, agent_id="x"), None))
    writer.submit(BarrierOp(opened.set, call_id))
    assert opened.wait(30)


def end_call(writer: Writer, call_id: str = "a") -> None:
    writer.submit(EventOp(call_id, UserText(at=8, text="still here")))
    writer.submit(FinalizeOp(call_id, 9, "completed"))
    assert writer.flush_sync(10), "the writer commits the call's end (it does not spin)"


def assert_call_kept(directory: Path, chunks: list[int]) -> None:
    """The call has exactly ``chunks`` (with their bytes on disk and nothing else), every
    event, its end, and a delivery for each."""
    kept = rows(directory, "SELECT idx, path FROM chunks WHERE call_id = 'a' ORDER BY idx")
    assert [idx for idx, _ in kept] == chunks
    folder = directory / "chunks" / "a"
    on_disk = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert on_disk == [Path(str(path)).name for _, path in kept], "no stray or .tmp file"
    assert rows(directory, "SELECT state, end_reason FROM calls") == [("ended", "completed")]
    events = stored_events(directory, "a")
    assert [e.text for e in events if isinstance(e, UserText)][-1] == "still here"
    assert isinstance(events[0], CallOpened)
    deliveries = rows(directory, "SELECT kind, chunk_idx FROM deliveries ORDER BY id")
    assert deliveries == [
        ("call-started", None),
        *(("chunk", idx) for idx in chunks),
        ("call-ended", None),
    ]


def test_chunks_admitted_together_do_not_take_the_room_an_earlier_chunk_was_given(
    disk: Path,
) -> None:
    """Under load the writer takes a burst of a call's chunks in one batch and admits them
    all before any file is written. Chunk 0's file is still being written; chunks 1-3 come
    in one batch, with room above the database's reserve for one and a half more. Only
    chunk 0 may be admitted: before, all three were (each saw the same free space), their
    files took the last of the disk, chunk 0's file then met ENOSPC and the call kept no
    audio (its later files discarded behind it: kept, they would leave a gap)."""
    first, later = Gate(), Gate()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(first), call_id="a")
    writer = Writer(disk, min_free_bytes=0)
    try:
        open_call(writer)
        writer.submit(ChunkOp("a", 0, BIG_CHUNK, 16000, 2, 2))
        assert until(lambda: first.arrivals == 1)  # chunk 0 admitted, its file not written
        faultpoints.inject("writer:chunk-file", faultpoints.Hold(later), call_id="a")
        fill_to(disk, DATABASE_RESERVE_BYTES + 3 * len(BIG_CHUNK) // 2)
        sorted_ = threading.Event()
        for idx in (1, 2, 3):
            writer.submit(ChunkOp("a", idx, BIG_CHUNK, 16000, 2, 2 + idx))
        writer.submit(BarrierOp(sorted_.set, "z"))
        assert sorted_.wait(30)
        # Each of chunks 1-3 is refused, or admitted and held before its file (a spool
        # thread each: one of the four holds chunk 0).
        assert until(lambda: later.arrivals + writer.stats.chunks_skipped == 3)
        later.set()
        folder = disk / "chunks" / "a"
        assert until(
            lambda: (
                writer.stats.chunks_skipped == 3
                or all((folder / f"{idx:06d}.pcm").exists() for idx in (1, 2, 3))
            )
        )
        first.set()
        end_call(writer)
    finally:
        first.set()
        later.set()
        assert writer.close()
    assert_call_kept(disk, [0])
    assert (disk / "chunks" / "a" / "000000.pcm").read_bytes() == BIG_CHUNK


def test_a_chunk_row_refused_by_a_full_disk_waits_for_the_later_file_being_written(
    disk: Path,
) -> None:
    """Chunk 0's file takes the last of the disk, so its row's commit meets a real ENOSPC;
    chunk 1's file, written meanwhile, is on disk but its spool thread has not told the
    writer yet (a starved thread). The writer must wait for that file and give it up (a
    later chunk makes room for an earlier one): before, it saw no newer file written,
    shed chunk 0 and then discarded chunk 1 behind it, and the call kept no audio."""
    first, written = Gate(), Gate()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(first), call_id="a", times=1)
    writer = Writer(disk, min_free_bytes=0)
    try:
        open_call(writer)
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        assert until(lambda: first.arrivals == 1)
        faultpoints.inject(
            "writer:chunk-file-written", faultpoints.Hold(written), call_id="a", times=1
        )
        writer.submit(ChunkOp("a", 1, CHUNK, 16000, 2, 3))
        assert until(lambda: written.arrivals == 1)  # chunk 1's file is durable, unreported
        fill_to(disk, len(CHUNK))  # room for chunk 0's file and not one page more
        first.set()
        assert until(lambda: writer.stats.failed_batches >= 1)  # chunk 0's row: disk full
        written.set()
        end_call(writer)
    finally:
        first.set()
        written.set()
        assert writer.close()
    assert_call_kept(disk, [0])
    assert (disk / "chunks" / "a" / "000000.pcm").read_bytes() == CHUNK


def test_a_disk_that_stays_full_sheds_the_chunk_once_its_later_files_are_given_up(
    tmp_path: Path,
) -> None:
    """Chunk 0's row keeps meeting a full disk (injected: something else takes whatever
    is freed). Chunk 1's file is still being written and chunk 2's is written, both
    parked behind it. Each later file is given up once, then chunk 0 is shed and the
    call's end committed: before, the writer gave up chunk 2's file again and again (it
    was still parked, so still "newer") and spun on the commit forever."""
    gates = [Gate(), Gate(), Gate()]
    writer_gate = Gate()
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        open_call(writer)
        for idx, gate in enumerate(gates):  # each chunk's file held by its own gate
            faultpoints.inject("writer:chunk-file", faultpoints.Hold(gate), call_id="a", times=1)
            writer.submit(ChunkOp("a", idx, CHUNK, 16000, 2, 2 + idx))
            assert until(lambda gate=gate: gate.arrivals == 1)  # type: ignore[misc]
        writer.submit(BarrierOp(lambda: writer_gate.wait(30), "z"))
        assert until(lambda: writer_gate.arrivals == 1)  # the writer thread is held
        gates[2].set()
        assert until(lambda: writer.queue_depth >= 1)  # chunk 2's file is written, reported
        full = OSError(errno.ENOSPC, "No space left on device")
        faultpoints.inject("writer:chunk", full, call_id="a")
        writer_gate.set()
        gates[0].set()
        assert until(lambda: writer.stats.failed_batches >= 1)  # chunk 0's row: disk full
        gates[1].set()
        end_call(writer)
    finally:
        faultpoints.clear()  # before, this is what stopped the spinning thread
        for gate in (*gates, writer_gate):
            gate.set()
        assert writer.close()
    assert_call_kept(tmp_path, [])


def test_a_chunk_row_refused_by_a_full_disk_is_kept_when_the_wal_can_give_way(
    disk: Path,
) -> None:
    """The -wal holds many stale copies of pages the database already has (it grows until
    its checkpoint at ~4 MB); chunk 0's file takes the last of the disk, so its row's
    commit meets a real ENOSPC, and no later chunk can give way. A checkpoint frees the
    room and loses nothing: it must come before the chunk is shed (before, the written
    chunk was shed at once and the call kept no audio)."""
    first = Gate()
    writer = Writer(disk, min_free_bytes=0)
    try:
        open_call(writer)
        for at in range(40):  # the database gets its pages, then the -wal grows on them
            writer.submit(EventOp("a", UserText(at=2 + at, text="hello?")))
            assert writer.flush_sync(10)
            if at == 9:
                conn = sqlite3.connect(disk / "wal.sqlite")
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                conn.close()
        faultpoints.inject("writer:chunk-file", faultpoints.Hold(first), call_id="a")
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 50))
        assert until(lambda: first.arrivals == 1)
        fill_to(disk, len(CHUNK))
        first.set()
        assert until(lambda: writer.stats.failed_batches >= 1)
        end_call(writer)
    finally:
        first.set()
        assert writer.close()
    assert_call_kept(disk, [0])
