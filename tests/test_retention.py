"""Retention and the spool cap: delivered calls are pruned by the running drainer; the cap
counts only undelivered audio; nothing undelivered is ever deleted."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from devserver_fixture import RunningDevServer
from helpers import LogCapture
from pipecat_roark.drain import Drainer
from pipecat_roark.lifecycle import close_all_writers
from test_drain import KEY, QUICK, chunk_files, record

pytestmark = pytest.mark.anyio


def call_ids(directory: Path) -> list[str]:
    conn = sqlite3.connect(directory / "wal.sqlite")
    try:
        return sorted(r[0] for r in conn.execute("SELECT id FROM calls"))
    finally:
        conn.close()


async def test_the_running_drainer_prunes_delivered_calls_and_keeps_the_rest(
    data_dir: Path, dev_server: RunningDevServer
) -> None:
    await record(data_dir, "delivered-1", 0)
    await record(data_dir, "other-key", 1, key="rk_someone_else")
    kept = chunk_files(data_dir, "other-key")
    policy = dataclasses.replace(QUICK, retention_s=0.0, prune_every_s=0.0)
    drainer = Drainer(data_dir, KEY, dev_server.base_url, policy)
    stop = asyncio.Event()
    task = asyncio.create_task(drainer.run_forever(stop))
    try:
        for _ in range(300):  # bounded: at most 30 s
            if call_ids(data_dir) == ["other-key"]:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert dev_server.call("delivered-1")["eventCounts"] == {"callStarted": 1, "callEnded": 1}
    assert call_ids(data_dir) == ["other-key"], "the delivered call was pruned"
    assert not (data_dir / "chunks" / "delivered-1").exists()
    assert chunk_files(data_dir, "other-key") == kept, "undelivered audio is never pruned"


async def capped_call(directory: Path, call_id: str, cap: int) -> None:
    await record(directory, call_id, 0, max_spool_bytes=cap)
    close_all_writers()  # the next writer measures the spool afresh


async def test_the_spool_cap_stops_audio_loudly_keeps_events_and_ignores_delivered_audio(
    data_dir: Path, dev_server: RunningDevServer, logs: LogCapture
) -> None:
    reference = data_dir.parent / "reference"
    await capped_call(reference, "ref", 1 << 30)
    uncapped = chunk_files(reference, "ref")
    assert len(uncapped) > 3
    cap = sum(map(len, uncapped[:3]))
    await capped_call(data_dir, "first", cap)
    assert chunk_files(data_dir, "first") == uncapped[:3], "audio stopped at the cap"
    [line] = logs.matching("over its cap")
    assert "no more audio is recorded for call 'first' (events still are)" in line
    report = await Drainer(data_dir, KEY, dev_server.base_url, QUICK).run_once()
    assert report.complete
    transcript = dev_server.call("first")["callEnded"]["transcript"]
    assert [t["content"] for t in transcript] == ["Hello 0.", "Question 0?", "Answer 0"]

    await capped_call(data_dir, "second", cap)
    assert chunk_files(data_dir, "second") == uncapped[:3], "delivered audio does not count"
    await capped_call(data_dir, "third", cap)
    assert chunk_files(data_dir, "third") == [], "undelivered audio does count"
