"""Faults of the writer child (``writer_process``): each test is a defect found in review.

Real parts only: a real ``ProcessWriter`` starting a real ``python -m
pipecat_roark.writer_child``, real SQLite files, real SIGKILLs. A child is made to die at
an exact moment with ``PIPECAT_ROARK_CRASH_AT`` in the environment it inherits (this
process read its own crash point at import, so only the child is armed).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from helpers import stored_events
from pipecat_roark.events import CallOpened, UserText
from pipecat_roark.ops import EventOp, FinalizeOp, OpenOp
from pipecat_roark.store import now_us
from pipecat_roark.writer_process import ProcessWriter

CLOSE_S = 60.0
"""Generous: these are not speed tests; a close that cannot finish fails them otherwise."""


def process_writer(directory: Path) -> ProcessWriter:
    return ProcessWriter(directory, max_spool_bytes=1 << 30, min_free_bytes=0)


def open_op(call_id: str) -> OpenOp:
    return OpenOp(call_id, CallOpened(at=now_us(), agent_id="agent"), None)


def said(call_id: str, text: str) -> EventOp:
    return EventOp(call_id, UserText(at=now_us(), text=text))


def user_texts(directory: Path, call_id: str) -> list[str]:
    return [e.text for e in stored_events(directory, call_id) if isinstance(e, UserText)]


def call_state(directory: Path, call_id: str) -> str | None:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        row = conn.execute("SELECT state FROM calls WHERE id = ?", (call_id,)).fetchone()
    return None if row is None else str(row[0])


def test_close_keeps_what_a_child_dying_during_close_did_not_commit(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child dies before committing the last frame, while the bot closes: the bot
    records that frame itself (it used to see the child's end as the close's own, and
    lose the frame)."""
    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:2")
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    assert writer.flush_sync(CLOSE_S), "the first frame is committed by the child"
    for text in ("one", "two", "three"):
        writer.submit(said("call-1", text))
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None, "the child was killed at its second commit"
    assert user_texts(data_dir, "call-1") == ["one", "two", "three"]
    assert call_state(data_dir, "call-1") == "ended"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("crash", [None, "before-commit"], ids=["clean", "child-killed"])
def test_close_leaves_no_pipe_to_the_child_open(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, crash: str | None
) -> None:
    """Once closed (after a clean exit of the child, or after it was killed and this
    process recorded in its place), no end of the child's pipes is left open here."""
    if crash is not None:
        monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", crash)
    process_writer(data_dir).close(CLOSE_S)  # the database exists: its files stay out
    before = open_fds()
    writer = process_writer(data_dir)
    writer.submit(open_op("call-1"))
    writer.submit(FinalizeOp("call-1", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert (writer.fell_back is not None) == (crash is not None)
    assert open_fds() - before == set(), "the writer (still referenced) holds no pipe end"


def test_a_session_refused_for_a_reused_call_id_stays_unrecorded_after_a_fallback(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call id already recorded: the child refuses the second session, then dies. The
    bot's own writer must go on refusing it, not append the second session's records to
    the earlier call (it did: the refusal lived only in the dead child)."""
    earlier = process_writer(data_dir)
    earlier.submit(open_op("reused"))
    earlier.submit(said("reused", "the earlier call"))
    earlier.submit(FinalizeOp("reused", now_us(), "completed"))
    assert earlier.close(CLOSE_S)

    monkeypatch.setenv("PIPECAT_ROARK_CRASH_AT", "before-commit:2")
    writer = process_writer(data_dir)
    writer.submit(open_op("reused"))  # refused by the child: the id is recorded
    writer.submit(open_op("bystander"))  # the child's first commit
    assert writer.flush_sync(CLOSE_S)
    writer.submit(said("reused", "the second session"))
    writer.submit(said("bystander", "still here"))  # the child dies before this commit
    assert writer.flush_sync(CLOSE_S)
    writer.submit(said("reused", "the second session, after the fallback"))
    writer.submit(FinalizeOp("reused", now_us(), "completed"))
    writer.submit(FinalizeOp("bystander", now_us(), "completed"))
    assert writer.close(CLOSE_S)
    assert writer.fell_back is not None
    assert user_texts(data_dir, "reused") == ["the earlier call"]
    assert user_texts(data_dir, "bystander") == ["still here"]
    assert call_state(data_dir, "bystander") == "ended"
