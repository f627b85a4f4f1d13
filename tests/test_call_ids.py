"""Any str is a valid call id: stored verbatim, or refused at the observer with one line.
Neither outcome touches another call; a reused id never changes an earlier call."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from devserver_fixture import RunningDevServer, running_dev_server
from helpers import LogCapture, stored_events
from pipecat_roark import spool
from pipecat_roark.capture import call_id_problem
from pipecat_roark.lifecycle import close_all_writers, writer_for
from test_capture_pipeline import timeline_without_audio
from test_cli import cli
from test_drain import assert_arrived_whole, chunk_files, record
from test_writer_bulkheads import deliver

pytestmark = pytest.mark.anyio


def rows(directory: Path, query: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(directory / "wal.sqlite") as conn:
        return conn.execute(query, params).fetchall()


def chunk_rows_match_files(directory: Path, call_id: str) -> list[str]:
    """The call's chunk paths, after checking each file still has the sha256 of its row."""
    found = rows(
        directory, "SELECT path, sha256 FROM chunks WHERE call_id = ? ORDER BY idx", call_id
    )
    for path, sha in found:
        assert hashlib.sha256((directory / str(path)).read_bytes()).hexdigest() == sha, path
    return [str(path) for path, _ in found]


async def test_a_call_id_no_database_can_store_is_refused_in_one_line_and_others_go_on(
    data_dir: Path, logs: LogCapture
) -> None:
    unusable = "réunion-\ud800-42"
    await asyncio.gather(record(data_dir, unusable), record(data_dir, "bystander"))

    assert await writer_for(data_dir).flush(10), "the writer thread still commits"
    assert rows(data_dir, "SELECT id, state FROM calls") == [("bystander", "ended")]
    [line] = logs.matching("will not be recorded")
    assert line.endswith(
        "call 'r\\xe9union-\\ud800-42' will not be recorded: it holds a lone surrogate "
        "('\\ud800') at position 8, which no database or file can store; pass a "
        "pipecat_call_id that is valid text"
    )
    assert len(chunk_rows_match_files(data_dir, "bystander")) >= 2


def _hashed_like(call_id: str) -> str:
    return "h-" + hashlib.sha256(call_id.encode()).hexdigest()[:32]


ODD_IDS = [
    "a\x00b",
    "line\nbreak",
    "../../etc/passwd",
    "..",
    ".",
    "/",
    " ",
    "x" * 10_000,
    "Call-1",
    "call-1",
    "réunion-42",
    "😀",
    "tab\there",
    "../x",
    _hashed_like("../x"),  # a plain name that spells the hashed folder of another id
]


async def test_odd_call_ids_are_stored_verbatim_with_folders_of_their_own(
    data_dir: Path,
) -> None:
    await asyncio.gather(*(record(data_dir, call_id) for call_id in ODD_IDS))
    close_all_writers()

    stored = {str(r[0]) for r in rows(data_dir, "SELECT id FROM calls WHERE state = 'ended'")}
    assert stored == set(ODD_IDS)
    folders: dict[str, str] = {}
    for call_id in ODD_IDS:
        paths = chunk_rows_match_files(data_dir, call_id)
        assert len(paths) >= 2, call_id
        folder = {Path(p).parent for p in paths}
        assert len(folder) == 1
        (only,) = folder
        assert (
            only.parent == Path("chunks")
            and (data_dir / only).resolve().parent == (data_dir / "chunks").resolve()
        ), f"{call_id!r} stays inside chunks/"
        folders[call_id] = str(only).lower()  # distinct even on a case-insensitive disk
    assert len(set(folders.values())) == len(ODD_IDS)
    assert not list((data_dir / "chunks").rglob("*.tmp"))


@pytest.mark.parametrize("same_process_writer", [True, False], ids=["same-writer", "new-writer"])
async def test_a_reused_call_id_is_refused_and_the_earlier_call_is_untouched(
    data_dir: Path, logs: LogCapture, same_process_writer: bool
) -> None:
    await record(data_dir, "dup", 0)
    assert await writer_for(data_dir).flush(10)
    before_events = stored_events(data_dir, "dup")
    before_chunks = rows(data_dir, "SELECT * FROM chunks ORDER BY idx")
    before_deliveries = rows(data_dir, "SELECT idempotency_key, state FROM deliveries")
    before_files = chunk_files(data_dir, "dup")
    if not same_process_writer:
        close_all_writers()  # as a later process would find it

    await record(data_dir, "dup", 1)  # other words, other audio phase: a different call
    assert await writer_for(data_dir).flush(10)

    assert stored_events(data_dir, "dup") == before_events
    assert rows(data_dir, "SELECT * FROM chunks ORDER BY idx") == before_chunks
    assert rows(data_dir, "SELECT idempotency_key, state FROM deliveries") == before_deliveries
    assert chunk_files(data_dir, "dup") == before_files
    chunk_rows_match_files(data_dir, "dup")
    [line] = logs.matching("is already recorded")
    assert line == (
        f"pipecat-roark: call id 'dup' is already recorded in {data_dir.resolve()}; this "
        "second session is not recorded and the earlier call is kept as it was. Give each "
        "call its own pipecat_call_id"
    )


async def test_two_live_sessions_with_one_id_record_only_the_first(
    data_dir: Path, tmp_path: Path, logs: LogCapture
) -> None:
    await asyncio.gather(record(data_dir, "twin"), record(data_dir, "twin"))
    await record(tmp_path / "reference", "twin")

    assert timeline_without_audio(data_dir, "twin") == timeline_without_audio(
        tmp_path / "reference", "twin"
    ), "one session's events, once each"
    chunk_rows_match_files(data_dir, "twin")
    [line] = logs.matching("will not be recorded")
    assert "another call in this process is recording under the same id" in line


CALL_IDS = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=40),
    st.text(st.sampled_from("./\\\x00\n\r\t \ud800\udfffé😀Hh-"), min_size=1, max_size=12),
    st.integers(1, 20_000).map(lambda n: "y" * n),
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(call_id=CALL_IDS)
def test_any_text_is_stored_verbatim_or_refused_and_never_touches_another_call(
    call_id: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("ids")
    bystander = f"bystander-{uuid.uuid4()}"
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")

    async def both() -> None:
        await asyncio.gather(record(directory, call_id), record(directory, bystander))

    try:
        asyncio.run(both())
        with running_dev_server(directory.parent / f"srv-{uuid.uuid4()}") as server:
            asyncio.run(deliver(directory, server, bystander))
            assert_arrived_whole(server, directory, bystander)
    finally:
        logger.remove(sink)
        close_all_writers()

    problem = call_id_problem(call_id)
    stored = [r[0] for r in rows(directory, "SELECT id FROM calls WHERE id != ?", bystander)]
    if problem is None:
        assert stored == [call_id]
        assert len(chunk_rows_match_files(directory, call_id)) >= 2
        assert lines == []
    else:
        assert stored == []
        assert len(lines) == 1 and problem in lines[0]


async def test_prune_removes_a_calls_folder_under_its_old_verbatim_name(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "Legacy-Call")
    close_all_writers()
    # As a version that named folders of ids with capitals verbatim left it:
    current = next((data_dir / "chunks").iterdir())
    current.rename(data_dir / "chunks" / "Legacy-Call")
    with sqlite3.connect(data_dir / "wal.sqlite") as conn:
        conn.execute(
            "UPDATE chunks SET path = 'chunks/Legacy-Call/' || substr(path, -10)"
            " WHERE call_id = 'Legacy-Call'"
        )
    conn.close()
    await deliver(data_dir, dev_server, "Legacy-Call")

    done = cli(data_dir, "prune", "--older-than", "0s")
    assert done.returncode == 0, done.stderr
    assert list((data_dir / "chunks").iterdir()) == []


def test_a_chunk_file_is_never_replaced_by_other_bytes(tmp_path: Path) -> None:
    first = spool.write_chunk(tmp_path, "same-id", 0, b"first call's audio")
    again = spool.write_chunk(tmp_path, "same-id", 0, b"first call's audio")  # a retried write
    assert again == first
    with pytest.raises(FileExistsError, match="a call id used twice"):
        spool.write_chunk(tmp_path, "same-id", 0, b"second call's audio")
    assert (tmp_path / first.relpath).read_bytes() == b"first call's audio"
    assert [p.name for p in (tmp_path / first.relpath).parent.iterdir()] == ["000000.pcm"]
