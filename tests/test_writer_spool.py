"""The writer writes a batch's chunk files side by side: what the serial writer recorded
for a call, it still records. Real Writer, real SQLite file, real chunk files.

Each test holds the writer thread on a barrier that waits for a gate, so the ops queued
behind it are taken as one batch and their files go through the spool threads.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import LogCapture
from pipecat_roark import faultpoints
from pipecat_roark.events import CallOpened, UserText, decode_event
from pipecat_roark.ops import BarrierOp, ChunkOp, EventOp, FinalizeOp, OpenOp
from pipecat_roark.writer import Writer

CHUNK = bytes(range(256)) * 4  # 1 KiB


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    faultpoints.clear()


def _gate() -> tuple[threading.Event, Callable[[], None]]:
    """A barrier release that holds the writer thread until the event is set."""
    gate = threading.Event()

    def hold() -> None:
        gate.wait(30)

    return gate, hold


def _chunk_rows(directory: Path, call_id: str) -> list[tuple[int, str]]:
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        rows = conn.execute(
            "SELECT idx, path FROM chunks WHERE call_id = ? ORDER BY idx", (call_id,)
        ).fetchall()
    finally:
        conn.close()
    return [(int(idx), str(path)) for idx, path in rows]


def test_a_chunk_is_kept_when_a_later_one_of_its_batch_hits_the_spool_cap(
    tmp_path: Path,
) -> None:
    """Two chunks of one call in one batch, the cap between them: the first is recorded
    (a gapless prefix), the second is skipped; the first's file is not discarded."""
    writer = Writer(tmp_path, max_spool_bytes=len(CHUNK) * 3 // 2, min_free_bytes=0)
    try:
        gate, hold = _gate()
        writer.submit(BarrierOp(hold))  # the next ops queue up together
        writer.submit(OpenOp("c", CallOpened(at=1, agent_id="a"), None))
        writer.submit(ChunkOp("c", 0, CHUNK, 16000, 2, 2))
        writer.submit(ChunkOp("c", 1, CHUNK, 16000, 2, 3))
        gate.set()
        assert writer.flush_sync(30)
    finally:
        assert writer.close()
    rows = _chunk_rows(tmp_path, "c")
    assert [idx for idx, _ in rows] == [0]
    assert (tmp_path / rows[0][1]).read_bytes() == CHUNK
    assert writer.stats.chunks_skipped == 1


def test_every_chunk_of_a_burst_from_many_calls_is_recorded_with_its_bytes(
    tmp_path: Path,
) -> None:
    """Twelve chunks of three calls in one batch: each row points at its own bytes."""
    writer = Writer(tmp_path, min_free_bytes=0)
    calls = ("a", "b", "c")
    try:
        gate, hold = _gate()
        writer.submit(BarrierOp(hold))
        for call_id in calls:
            writer.submit(OpenOp(call_id, CallOpened(at=1, agent_id="a"), None))
        for idx in range(4):
            for call_id in calls:
                data = f"{call_id}{idx}".encode() * 512
                writer.submit(ChunkOp(call_id, idx, data, 16000, 2, 2 + idx))
        gate.set()
        assert writer.flush_sync(30)
    finally:
        assert writer.close()
    for call_id in calls:
        rows = _chunk_rows(tmp_path, call_id)
        assert [idx for idx, _ in rows] == [0, 1, 2, 3]
        for idx, path in rows:
            assert (tmp_path / path).read_bytes() == f"{call_id}{idx}".encode() * 512
    assert writer.stats.chunks_skipped == 0


def test_a_failed_write_leaves_its_call_a_gapless_prefix_and_no_stray_files(
    tmp_path: Path,
) -> None:
    """One write of call "c" fails (whichever spool thread gets there first): its call
    keeps the chunks before it and none after, the later files of its batch are
    discarded, and the other call in the batch loses nothing."""
    faultpoints.inject("writer:chunk-file", ValueError("injected"), call_id="c", times=1)
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        gate, hold = _gate()
        writer.submit(BarrierOp(hold))
        for call_id in ("c", "d"):
            writer.submit(OpenOp(call_id, CallOpened(at=1, agent_id="a"), None))
        for idx in range(4):
            for call_id in ("c", "d"):
                writer.submit(ChunkOp(call_id, idx, CHUNK, 16000, 2, 2 + idx))
        gate.set()
        assert writer.flush_sync(30)
    finally:
        assert writer.close()
    kept = [idx for idx, _ in _chunk_rows(tmp_path, "c")]
    assert kept == list(range(len(kept))) and len(kept) < 4
    folder = tmp_path / "chunks" / "c"
    on_disk = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert on_disk == [f"{idx:06d}.pcm" for idx in kept]
    assert [idx for idx, _ in _chunk_rows(tmp_path, "d")] == [0, 1, 2, 3]


def _rows(directory: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{directory / 'wal.sqlite'}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def _timeline(directory: Path, call_id: str) -> list[str]:
    """The call's events in commit order, by kind (the tag ``events.py`` gives each)."""
    bodies = _rows(directory, "SELECT body FROM events WHERE call_id = ? ORDER BY id", call_id)
    return [type(decode_event(bytes(body))).__name__ for (body,) in bodies]  # type: ignore[arg-type]


def test_only_a_calls_chunk_rows_and_end_wait_for_its_chunk_file(tmp_path: Path) -> None:
    """Call "a"'s chunk file is held on its spool thread. Call "b" commits meanwhile, and
    so do "a"'s events (the timeline reads chunks by index, not by their place among the
    events); "a"'s end waits behind its chunk, and so do a flush (everything queued before
    it) and "a"'s own flush queued after its end. Released, the chunk row and then the
    call's end are committed (issue 12: one call's audio must not hold frame → committed)."""
    gate = threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(gate), call_id="a")
    writer = Writer(tmp_path, min_free_bytes=0)
    flushed, a_flushed, b_flushed = threading.Event(), threading.Event(), threading.Event()
    try:
        for call_id in ("a", "b"):
            writer.submit(OpenOp(call_id, CallOpened(at=1, agent_id="x"), None))
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        writer.submit(EventOp("a", UserText(at=3, text="after the chunk")))
        writer.submit(FinalizeOp("a", 4, "completed"))
        writer.submit(EventOp("a", UserText(at=5, text="after the end")))
        writer.submit(BarrierOp(a_flushed.set, "a"))
        writer.submit(BarrierOp(flushed.set))
        writer.submit(EventOp("b", UserText(at=3, text="b goes on")))
        writer.submit(FinalizeOp("b", 4, "completed"))
        writer.submit(BarrierOp(b_flushed.set, "b"))
        assert b_flushed.wait(30)
        assert _timeline(tmp_path, "b") == ["CallOpened", "UserText"]
        assert _timeline(tmp_path, "a") == ["CallOpened", "UserText"]
        assert _rows(tmp_path, "SELECT id, state FROM calls ORDER BY id") == [
            ("a", "open"),
            ("b", "ended"),
        ]
        assert _rows(tmp_path, "SELECT kind FROM deliveries WHERE call_id = 'a'") == [
            ("call-started",)
        ]
        assert not flushed.is_set() and not a_flushed.is_set()
        gate.set()
        assert writer.flush_sync(30)
        assert flushed.is_set() and a_flushed.is_set()
    finally:
        gate.set()
        assert writer.close()
    assert _timeline(tmp_path, "a") == ["CallOpened", "UserText", "ChunkRecorded", "UserText"]
    assert _rows(tmp_path, "SELECT state FROM calls WHERE id = 'a'") == [("ended",)]
    assert _rows(
        tmp_path, "SELECT kind, chunk_idx FROM deliveries WHERE call_id = 'a' ORDER BY id"
    ) == [("call-started", None), ("chunk", 0), ("call-ended", None)]
    assert (tmp_path / _chunk_rows(tmp_path, "a")[0][1]).read_bytes() == CHUNK


@pytest.mark.parametrize(
    ("point", "error", "times"),
    [
        # The file of chunk 0 cannot be written.
        ("writer:chunk-file", ValueError("injected"), 1),
        # Chunk 0's file is written but its row fails for good (in the batch, then alone),
        # so it is dropped.
        ("writer:chunk", RuntimeError("injected"), 2),
    ],
    ids=["file", "row"],
)
def test_a_chunk_not_recorded_leaves_no_later_chunk_of_its_call_and_keeps_its_events(
    tmp_path: Path, point: str, error: BaseException, times: int
) -> None:
    """Chunk 0 of "a" is not recorded while chunks 1 and 2 are already admitted and being
    written behind it: neither is recorded (a gap Roark cannot stitch) and their files are
    gone; the event queued between them and the call's end are still committed, in order."""
    faultpoints.inject(point, error, call_id="a", times=times)
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        gate, hold = _gate()
        writer.submit(BarrierOp(hold))
        writer.submit(OpenOp("a", CallOpened(at=1, agent_id="x"), None))
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        writer.submit(ChunkOp("a", 1, CHUNK, 16000, 2, 3))
        writer.submit(EventOp("a", UserText(at=4, text="still recorded")))
        writer.submit(ChunkOp("a", 2, CHUNK, 16000, 2, 5))
        writer.submit(FinalizeOp("a", 6, "completed"))
        gate.set()
        assert writer.flush_sync(30)
    finally:
        assert writer.close()
    assert _chunk_rows(tmp_path, "a") == []
    folder = tmp_path / "chunks" / "a"
    assert not folder.exists() or list(folder.iterdir()) == []
    assert _timeline(tmp_path, "a") == ["CallOpened", "UserText"]
    assert _rows(tmp_path, "SELECT kind FROM deliveries WHERE call_id = 'a' ORDER BY id") == [
        ("call-started",),
        ("call-ended",),
    ]


def test_a_batch_of_events_alone_is_stored_in_queue_order_in_one_statement(
    tmp_path: Path,
) -> None:
    """A batch of only events is one padded statement (one call into SQLite, issue 12):
    every event is stored once, in the order queued, whatever the statement's size."""
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        writer.submit(OpenOp("a", CallOpened(at=1, agent_id="x"), None))
        assert writer.flush_sync(30)
        for count in (1, 7, 8, 9, 64, 65, 300):
            gate, hold = _gate()
            writer.submit(BarrierOp(hold))  # the events queue up as one batch
            for n in range(count):
                writer.submit(EventOp("a", UserText(at=n, text=f"{count}:{n}")))
            gate.set()
            assert writer.flush_sync(30)
    finally:
        assert writer.close()
    bodies = _rows(tmp_path, "SELECT body FROM events WHERE call_id = 'a' ORDER BY id")
    texts = [getattr(decode_event(bytes(body)), "text", None) for (body,) in bodies]  # type: ignore[arg-type]
    expected = [f"{count}:{n}" for count in (1, 7, 8, 9, 64, 65, 300) for n in range(count)]
    assert texts == [None, *expected]
    assert writer.stats.events == 1 + len(expected)
    assert writer.stats.failed_batches == 0  # not stored by the one-op-at-a-time fallback


def test_a_call_id_reused_while_the_first_sessions_end_waits_records_nothing_of_the_second(
    tmp_path: Path,
) -> None:
    """Session 1 of "a" ends while its chunk file is still being written (its end waits);
    session 2 opens "a" meanwhile and is refused. Session 1's chunk and end are still
    committed, and nothing of session 2 reaches session 1's call: not the events queued
    with its refused open, nor those queued after session 1's end was committed. (The
    chunk's row fails once, so session 1's last ops are committed one by one.)"""
    gate = threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(gate), call_id="a")
    faultpoints.inject("writer:chunk", ValueError("once"), call_id="a", times=1)
    writer = Writer(tmp_path, min_free_bytes=0)
    screened = threading.Event()
    try:
        writer.submit(OpenOp("a", CallOpened(at=1, agent_id="x"), None))
        assert writer.flush_sync(30)  # session 2's open is refused as it is taken
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        writer.submit(FinalizeOp("a", 3, "completed"))
        writer.submit(OpenOp("a", CallOpened(at=10, agent_id="x"), None))
        writer.submit(EventOp("a", UserText(at=11, text="session 2, with its open")))
        writer.submit(BarrierOp(screened.set, "b"))  # all of the above is sorted by now
        assert screened.wait(30)
        gate.set()
        assert writer.flush_sync(30)  # session 1's chunk and end are committed
        writer.submit(EventOp("a", UserText(at=12, text="session 2, later")))
        writer.submit(FinalizeOp("a", 13, "session 2 ended"))
        assert writer.flush_sync(30)
    finally:
        gate.set()
        assert writer.close()
    assert _timeline(tmp_path, "a") == ["CallOpened", "ChunkRecorded"]
    assert _rows(tmp_path, "SELECT state FROM calls WHERE id = 'a'") == [("ended",)]
    assert _rows(
        tmp_path, "SELECT kind, chunk_idx FROM deliveries WHERE call_id = 'a' ORDER BY id"
    ) == [("call-started", None), ("chunk", 0), ("call-ended", None)]


def _until(condition: Callable[[], bool]) -> bool:
    """Wait for a condition of files or counters: bounded in count and time."""
    pause = threading.Event()
    for _ in range(3000):
        if condition():
            return True
        pause.wait(0.01)
    return condition()


class _Arrival(threading.Event):
    """A gate that also says when someone is waiting at it (a spool thread at a
    ``faultpoints.Hold``, or the writer thread in a flush's release)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.arrived.set()
        return super().wait(timeout)


def test_a_chunk_shed_by_a_full_disk_leaves_no_later_chunk_recorded(tmp_path: Path) -> None:
    """Chunk 0's row keeps meeting a full disk while chunk 1, admitted behind it, is
    still being written: chunk 1's file is given up first, then chunk 0 is shed. Chunk 1
    must not be recorded either (a gap Roark cannot stitch); the call's end is still
    committed. (Once the disk has room again after chunk 1 is given up, chunk 0 is kept:
    ``test_full_disk_audio``.)"""
    first, second = _Arrival(), threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(first), call_id="a")
    writer = Writer(tmp_path, min_free_bytes=0)
    sorted_ = threading.Event()
    try:
        writer.submit(OpenOp("a", CallOpened(at=1, agent_id="x"), None))
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        assert first.arrived.wait(30)  # chunk 0's file is held, its row not yet tried
        full = OSError(errno.ENOSPC, "No space left on device")
        faultpoints.inject("writer:chunk", full, call_id="a")
        faultpoints.inject("writer:chunk-file", faultpoints.Hold(second), call_id="a")
        writer.submit(ChunkOp("a", 1, CHUNK, 16000, 2, 3))
        writer.submit(BarrierOp(sorted_.set, "z"))
        assert sorted_.wait(30)  # chunk 1 is admitted, its file held
        first.set()
        assert _until(lambda: writer.stats.failed_batches == 1)  # chunk 0's row: shed
        second.set()
        writer.submit(FinalizeOp("a", 4, "completed"))
        assert writer.flush_sync(30)
    finally:
        first.set()
        second.set()
        assert writer.close()
    assert _chunk_rows(tmp_path, "a") == []
    folder = tmp_path / "chunks" / "a"
    assert not folder.exists() or list(folder.iterdir()) == []
    assert _rows(tmp_path, "SELECT kind FROM deliveries WHERE call_id = 'a' ORDER BY id") == [
        ("call-started",),
        ("call-ended",),
    ]


def _hold_writer() -> tuple[_Arrival, Callable[[], None]]:
    """A barrier release that holds the writer thread, and says when it does."""
    gate = _Arrival()

    def hold() -> None:
        gate.wait(30)

    return gate, hold


def test_a_chunk_file_that_cannot_be_discarded_costs_only_its_own_call(
    tmp_path: Path,
) -> None:
    """Chunk 0 of "a" cannot be written (another file has its name), so chunk 1, written
    behind it, is to be discarded; that fails too (its name now holds a folder unlink()
    cannot remove). Only "a"'s audio is lost: the writer thread goes on, "b" is recorded
    and a flush returns."""
    folder = tmp_path / "chunks" / "a"
    folder.mkdir(parents=True)
    (folder / "000000.pcm").write_bytes(b"other bytes")
    second_file = folder / "000001.pcm"
    files = threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(files), call_id="a")
    writer = _record_b_while_as_second_chunk_file_turns_into_a_folder(
        tmp_path, files, second_file.exists
    )
    assert writer.stats.restarts == 0
    assert _chunk_rows(tmp_path, "a") == []
    assert _timeline(tmp_path, "b") == ["CallOpened", "UserText"]
    assert _rows(tmp_path, "SELECT state FROM calls ORDER BY id") == [("open",), ("ended",)]


def _record_b_while_as_second_chunk_file_turns_into_a_folder(
    tmp_path: Path, files: threading.Event, written: Callable[[], bool]
) -> Writer:
    """Two chunks of "a" are written (held at ``files``, then let go until ``written``);
    chunk 1's name then holds a folder, so it cannot be discarded; then call "b" is
    recorded and flushed. Returns the closed writer."""
    second_file = tmp_path / "chunks" / "a" / "000001.pcm"
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        writer_gate, hold_writer = _hold_writer()
        writer.submit(OpenOp("a", CallOpened(at=1, agent_id="x"), None))
        writer.submit(ChunkOp("a", 0, CHUNK, 16000, 2, 2))
        writer.submit(ChunkOp("a", 1, CHUNK, 16000, 2, 3))
        writer.submit(BarrierOp(hold_writer, "z"))
        assert writer_gate.arrived.wait(30)  # both chunks started, held; the writer waits
        files.set()
        assert _until(written)
        second_file.unlink()
        second_file.mkdir()
        (second_file / "keep").write_bytes(b"x")
        writer_gate.set()
        writer.submit(OpenOp("b", CallOpened(at=1, agent_id="x"), None))
        writer.submit(EventOp("b", UserText(at=2, text="b goes on")))
        writer.submit(FinalizeOp("b", 3, "completed"))
        assert writer.flush_sync(30)
    finally:
        files.set()
        writer_gate.set()
        assert writer.close()
    return writer


def test_a_chunk_behind_a_failed_row_whose_file_will_not_go_costs_only_its_call(
    tmp_path: Path,
) -> None:
    """Chunk 0's row of "a" fails for good, so chunk 1 (written beside it) is not recorded
    and its file is to be deleted; that fails too (its name now holds a folder). The
    writer thread neither dies nor spins on it: "b" is recorded and a flush returns."""
    folder = tmp_path / "chunks" / "a"
    second_file = folder / "000001.pcm"
    files = threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(files), call_id="a")
    faultpoints.inject("writer:chunk", RuntimeError("injected"), call_id="a", times=2)
    writer = _record_b_while_as_second_chunk_file_turns_into_a_folder(
        tmp_path, files, lambda: (folder / "000000.pcm").exists() and second_file.exists()
    )
    assert writer.stats.restarts == 0
    assert _chunk_rows(tmp_path, "a") == []
    assert _timeline(tmp_path, "b") == ["CallOpened", "UserText"]


def test_a_call_that_cannot_be_opened_stays_unrecorded_while_its_chunk_file_is_in_flight(
    tmp_path: Path, logs: LogCapture
) -> None:
    """The open of "v" fails while its first chunk file is being written; its end arrives
    in a later batch, before that file is done. The end must wait behind the chunk, so
    the call stays "not recorded" until its last op: the chunk is discarded quietly, not
    committed against a call row that does not exist (one error line: the open's)."""
    files = threading.Event()
    faultpoints.inject("writer:chunk-file", faultpoints.Hold(files), call_id="v")
    faultpoints.inject("writer:open", KeyError("calls"), call_id="v")
    writer = Writer(tmp_path, min_free_bytes=0)
    try:
        writer.submit(OpenOp("v", CallOpened(at=1, agent_id="x"), None))
        writer.submit(ChunkOp("v", 0, CHUNK, 16000, 2, 2))
        opened = threading.Event()
        writer.submit(BarrierOp(opened.set, "v"))
        assert opened.wait(30)  # the open failed and was committed (not) before the end came
        writer.submit(FinalizeOp("v", 3, "completed"))
        writer.submit(OpenOp("b", CallOpened(at=1, agent_id="x"), None))
        b_done = threading.Event()
        writer.submit(BarrierOp(b_done.set, "b"))
        assert b_done.wait(30)  # the end of "v" was sorted while its chunk is in flight
        files.set()
        assert writer.flush_sync(30)
    finally:
        files.set()
        assert writer.close()
    assert _rows(tmp_path, "SELECT id FROM calls") == [("b",)]
    assert _chunk_rows(tmp_path, "v") == []
    folder = tmp_path / "chunks" / "v"
    assert not folder.exists() or list(folder.iterdir()) == []
    errors = [m for m in logs.messages("ERROR") if "'v'" in m]
    assert errors == [
        f"pipecat-roark: call 'v' could not be opened in {tmp_path} (KeyError: 'calls'); "
        "it is not recorded. Other calls are not affected"
    ]
